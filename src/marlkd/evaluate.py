"""Run controllers on seeds and tabulate their metrics.

Every controller, rule-based expert or trained student, is driven through the
same loop: observe, act, step, until the episode ends; the environment hands
back SUMO's episode figures.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from marlkd.envs.traffic.metrics import METRIC_KEYS, mean_over_episodes

logger = logging.getLogger(__name__)

Policy = Callable[..., dict[str, int]]
"""Maps (observations, masks[, state]) to one action per agent."""


def run_episode(env, policy, seed: int, progress: bool = False) -> dict:
    """One episode of ``policy`` on ``env`` with the given seed.

    Args:
        env: a traffic environment (``TrafficSignalEnv``).
        policy: a ``Teacher`` or any callable ``(observations, masks, state)``
            returning one action per agent.
        seed: seeds both the demand and SUMO.
        progress: show a progress bar over decisions.

    Returns:
        The network figures, ``seed`` and ``per_intersection`` figures.
    """
    if hasattr(policy, "reset"):
        policy.reset()
    needs_state = getattr(policy, "needs_state", False)
    observations, infos = env.reset(seed=seed)
    steps = int(round((env.end - env.begin) / env.config.delta_time)) - 1
    bar = tqdm(total=steps, desc=f"seed {seed}", leave=False, disable=not progress)
    while env.agents:
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        state = env.state() if needs_state else None
        actions = policy(observations, masks, state)
        observations, _, _, _, infos = env.step(actions)
        bar.update()
    bar.close()
    episode = env.last_episode
    return {
        "seed": seed,
        **episode.network,
        "per_intersection": episode.per_intersection,
    }


def simulate(
    env,
    policy,
    *,
    episodes: int,
    seed: int,
    progress: bool = True,
) -> dict:
    """Run ``episodes`` episodes on seeds ``seed, seed + 1, ...``.

    Returns:
        ``{"episodes": [...], "mean": {...}}`` with the keys of
        ``METRIC_KEYS`` in each episode and in the mean.
    """
    results = []
    for k in tqdm(range(episodes), desc="episodes", disable=not progress):
        result = run_episode(env, policy, seed + k, progress=progress)
        logger.info(
            "seed %d: avg_delay_s=%.2f throughput_veh=%d",
            result["seed"],
            result["avg_delay_s"],
            result["throughput_veh"],
        )
        results.append(result)
    networks = [
        {k: v for k, v in r.items() if k not in ("per_intersection", "seed")}
        for r in results
    ]
    return {"episodes": results, "mean": mean_over_episodes(networks)}


def format_table(
    rows: Sequence[tuple[str, dict]], keys: Sequence[str] = METRIC_KEYS
) -> str:
    """A Markdown table: one row per (label, metrics) pair."""
    header = "| | " + " | ".join(keys) + " |"
    rule = "|---" * (len(keys) + 1) + "|"
    lines = [header, rule]
    for label, metrics in rows:
        cells = [_cell(metrics.get(k)) for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float | np.floating) and not float(value).is_integer():
        return f"{value:.2f}"
    return f"{value:g}" if isinstance(value, float | np.floating) else str(value)
