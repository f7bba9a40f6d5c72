"""Collectors: run a behaviour policy, have the teacher label what it visits.

DAgger and behaviour cloning collect teacher-labelled samples; DQN and PPO
collect, through the same call, what their learners need (rewards, next
observations, global states), labelled only when kickstarting.
:class:`LocalCollector` runs the episodes in this process;
:class:`~marlkd.rollout.ray_collector.RayCollector` spreads them over Ray
actors, one simulation each. Both have the same ``collect`` and give the same
data; :func:`make_collector` picks one, and imports Ray only when asked to.
"""

from __future__ import annotations

import logging

from marlkd.rollout.local import LocalCollector

logger = logging.getLogger(__name__)


def make_collector(
    env,
    teacher,
    batcher,
    *,
    teacher_spec: str | None,
    workers: int = 0,
    ray_address: str | None = None,
    wrap=None,
):
    """The in-process collector, or a Ray one when ``workers`` or an address ask.

    Args:
        env: the driver's environment; Ray workers build their own from its
            scenario and settings.
        teacher: the driver's teacher, for the in-process collector; None for
            collections without labels.
        batcher: agent names and padded sizes of the dataset.
        teacher_spec: the teacher's name or checkpoint path, for Ray workers;
            None for collections without labels.
        workers: Ray actors to start; 0 with no address collects in process.
        ray_address: a Ray cluster to join.
        wrap: a picklable function that made ``env`` from the traffic
            environment (such as the neighbourhood views of a central
            teacher); Ray workers apply it to theirs.
    """
    if workers == 0 and not ray_address:
        return LocalCollector(env, teacher, batcher)
    from marlkd.rollout.ray_collector import RayCollector

    return RayCollector(
        env.scenario,
        env.config,
        teacher_spec,
        batcher,
        workers=workers,
        address=ray_address or None,
        wrap=wrap,
    )


def warn_idle_workers(collector, episodes: int, setting: str) -> None:
    """Warn when a collector has more workers than episodes to give them."""
    workers = len(getattr(collector, "workers", []))
    if workers > episodes:
        logger.warning(
            "%d rollout workers but %d episodes per collection: %d stay idle; "
            "set %s to %d",
            workers,
            episodes,
            workers - episodes,
            setting,
            workers,
        )


__all__ = ["LocalCollector", "make_collector", "warn_idle_workers"]
