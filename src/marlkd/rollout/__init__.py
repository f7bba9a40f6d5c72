"""Collectors: run a behaviour policy, have the teacher label what it visits."""

from marlkd.rollout.local import LocalCollector

__all__ = ["LocalCollector"]
