"""Collectors: run a behaviour policy, have the teacher label what it visits.

:class:`LocalCollector` runs the episodes in this process;
:class:`~marlkd.rollout.ray_collector.RayCollector` spreads them over Ray
actors, one simulation each. Both have the same ``collect`` and give the same
data; :func:`make_collector` picks one, and imports Ray only when asked to.
"""

from __future__ import annotations

from marlkd.rollout.local import LocalCollector


def make_collector(
    env,
    teacher,
    batcher,
    *,
    teacher_spec: str,
    workers: int = 0,
    ray_address: str | None = None,
):
    """The in-process collector, or a Ray one when ``workers`` or an address ask.

    Args:
        env: the driver's environment; Ray workers build their own from its
            scenario and settings.
        teacher: the driver's teacher, for the in-process collector.
        batcher: agent names and padded sizes of the dataset.
        teacher_spec: the teacher's name or checkpoint path, for Ray workers.
        workers: Ray actors to start; 0 with no address collects in process.
        ray_address: a Ray cluster to join.
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
    )


__all__ = ["LocalCollector", "make_collector"]
