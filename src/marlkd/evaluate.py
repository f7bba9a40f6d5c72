"""Run controllers on seeds and tabulate their metrics.

Every controller, rule-based expert or trained student, is driven through the
same loop: observe, act, step, until the episode ends; the environment hands
back SUMO's episode figures.
"""

from __future__ import annotations

import functools
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
        The network figures, ``seed``, ``per_intersection`` figures and
        ``queue_trace``: the vehicles queued on all signals' incoming lanes
        (``queue_veh``) at each decision's simulation time (``time_s``).
    """
    if hasattr(policy, "reset"):
        policy.reset()
    needs_state = getattr(policy, "needs_state", False)
    queue_at = {a: s.obs_slices()["in_queue_veh"] for a, s in env.specs.items()}
    trace_time, trace_queue = [], []

    def record(observations) -> None:
        trace_time.append(round(float(env.sim_time), 1))
        total = sum(float(np.sum(obs[queue_at[a]])) for a, obs in observations.items())
        trace_queue.append(round(total, 1))

    observations, infos = env.reset(seed=seed)
    record(observations)
    steps = int(round((env.end - env.begin) / env.config.delta_time)) - 1
    bar = tqdm(
        total=steps,
        desc=f"seed {seed}",
        leave=False,
        disable=None if progress else True,
    )
    while env.agents:
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        state = env.state() if needs_state else None
        actions = policy(observations, masks, state)
        observations, _, _, _, infos = env.step(actions)
        record(observations)
        bar.update()
    bar.close()
    episode = env.last_episode
    return {
        "seed": seed,
        **episode.network,
        "per_intersection": episode.per_intersection,
        "queue_trace": {"time_s": trace_time, "queue_veh": trace_queue},
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
    for k in tqdm(range(episodes), desc="episodes", disable=None if progress else True):
        result = run_episode(env, policy, seed + k, progress=progress)
        logger.info(
            "seed %d: avg_delay_s=%.2f throughput_veh=%d",
            result["seed"],
            result["avg_delay_s"],
            result["throughput_veh"],
        )
        results.append(result)
    networks = [
        {
            k: v
            for k, v in r.items()
            if k not in ("per_intersection", "seed", "queue_trace")
        }
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


# ---------------------------------------------------------------- run folders
TABLE_KEYS = (
    *METRIC_KEYS,
    "delay_vs_teacher",
    "agreement",
    "parameters",
    "latency_one_us",
    "latency_batch_per_agent_us",
)


class AgreementProbe:
    """Wraps a policy and counts how often it picks one of the teacher's best.

    Only decisions where an agent had a choice (two or more allowed actions)
    count; an action that ties with the teacher's best score agrees.
    """

    def __init__(self, policy, teacher):
        self.policy = policy
        self.teacher = teacher
        self.needs_state = getattr(teacher, "needs_state", False)
        self.agreed = 0
        self.decisions = 0

    def reset(self) -> None:
        for p in (self.policy, self.teacher):
            if hasattr(p, "reset"):
                p.reset()

    def __call__(self, observations, masks, state=None):
        actions = self.policy(observations, masks, state)
        label = self.teacher.act(observations, masks, state)
        for agent, action in actions.items():
            mask = np.asarray(masks[agent], dtype=bool)
            if mask.sum() < 2:
                continue
            scores = np.where(mask, label.scores[agent], -np.inf)
            best = scores.max()
            self.decisions += 1
            self.agreed += int(scores[action] >= best - 1e-6 * max(1.0, abs(best)))
        return actions

    @property
    def agreement(self) -> float:
        return self.agreed / self.decisions if self.decisions else float("nan")


def decision_latency_us(policy, observations, masks, repeats: int = 300) -> dict:
    """Median wall time of one decision, in microseconds.

    ``latency_one_us`` is one agent alone; ``latency_batch_per_agent_us`` is a
    decision for all agents at once divided by their number.
    """
    import time

    def median_us(obs, msk):
        policy(obs, msk)  # warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            policy(obs, msk)
            times.append(time.perf_counter() - start)
        return float(np.median(times) * 1e6)

    first = next(iter(observations))
    one = median_us({first: observations[first]}, {first: masks[first]})
    batch = median_us(observations, masks) / len(observations)
    return {"latency_one_us": one, "latency_batch_per_agent_us": batch}


def evaluate_run(
    run_dir,
    *,
    episodes: int | None = None,
    demand_scale: float | None = None,
    seed: int | None = None,
    controllers: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Teacher, student and baselines of a run on held-out seeds.

    Writes ``results.json`` and ``results.md`` into the run folder (or, when
    the demand is scaled, ``results-demand<X>.json``/``.md``) and returns the
    results.
    """
    from pathlib import Path

    from marlkd.config import load_config
    from marlkd.envs.traffic.env import TrafficSignalEnv
    from marlkd.errors import UserError
    from marlkd.rollout.batching import AgentBatcher
    from marlkd.students import AgentLayout
    from marlkd.students.checkpoint import check_layout, load_student
    from marlkd.students.policy import StudentPolicy
    from marlkd.teachers.registry import make_controller, make_teacher
    from marlkd.utils import atomic_write_text, run_checkpoint

    run_dir = Path(run_dir)
    checkpoint = run_checkpoint(run_dir)
    if episodes is not None and episodes < 1:
        raise UserError(f"--episodes is {episodes}: evaluate at least 1 episode")
    config = load_config(run_dir / "config.yaml")
    if demand_scale is not None:
        config.env.demand_scale = demand_scale
        config.env.validate()
    episodes = config.eval.episodes if episodes is None else episodes
    seed = config.eval.seed if seed is None else seed
    names = list(controllers or config.eval.controllers)

    env = TrafficSignalEnv(config.scenario.build(), config.env)
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
        student = load_student(checkpoint)
        check_layout(student.layout, layout)
        batcher = AgentBatcher(
            env.possible_agents, layout.max_obs_size, layout.max_actions
        )
        teacher = make_teacher(config.teacher, env)
        policies = {
            "teacher": teacher,
            "student": StudentPolicy(student, batcher),
        }
        observations, infos = env.reset(seed=seed)
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        state = env.state()

        results = {}
        for name in names:
            if name in policies:
                policy = policies[name]
            else:
                policy = make_controller(name, env, seed=seed)
            if name == "student":
                probe = AgreementProbe(policy, teacher)
                outcome = simulate(
                    env, probe, episodes=episodes, seed=seed, progress=progress
                )
                outcome["mean"]["agreement"] = probe.agreement
            else:
                outcome = simulate(
                    env, policy, episodes=episodes, seed=seed, progress=progress
                )
            entry = {"controller": getattr(policy, "name", name), **outcome}
            entry["mean"]["parameters"] = _parameters(policy)
            timed = (
                functools.partial(policy, state=state)
                if getattr(policy, "needs_state", False)
                else policy
            )
            entry["mean"].update(decision_latency_us(timed, observations, masks))
            results[name] = entry
    finally:
        env.close()

    if "teacher" in results:
        teacher_delay = results["teacher"]["mean"]["avg_delay_s"]
        for entry in results.values():
            entry["mean"]["delay_vs_teacher"] = (
                entry["mean"]["avg_delay_s"] / teacher_delay
                if teacher_delay > 0
                else float("nan")  # no vehicle was delayed, e.g. no demand
            )

    report = {
        "run": str(run_dir),
        "scenario": env.scenario.name,
        "teacher": config.teacher,
        "demand_scale": config.env.demand_scale,
        "seeds": list(range(seed, seed + episodes)),
        "controllers": results,
    }
    suffix = "" if demand_scale is None else f"-demand{config.env.demand_scale:g}"
    table = format_table([(k, v["mean"]) for k, v in results.items()], TABLE_KEYS)
    import json

    atomic_write_text(
        run_dir / f"results{suffix}.json", json.dumps(report, indent=2, default=float)
    )
    atomic_write_text(
        run_dir / f"results{suffix}.md",
        f"# {env.scenario.name}, demand x{config.env.demand_scale:g}, seeds "
        f"{seed}-{seed + episodes - 1}\n\n{table}\n",
    )
    report["table"] = table
    return report


def _parameters(policy) -> int:
    network = getattr(policy, "student", None)
    if network is None:
        return 0
    return int(sum(p.numel() for p in network.parameters()))
