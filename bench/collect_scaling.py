"""Collection speed in process and on 1, 2, ... Ray workers, and where it stops.

The same collection in every mode: ``--episodes`` simulated hours of
``--scenario`` labelled by the MaxPressure teacher, with an (untrained) phase
student acting with probability 1 - ``--beta``. Its figure is environment steps
(decisions of all signals at once) per second of wall time, from sending the
work to holding the samples; starting Ray and the workers is timed apart, as a
cost paid once per run. Every mode must give the in-process samples exactly,
or the script stops.

Per-step costs, from the workers' own timings:

- simulation: SUMO's ``simulationStep`` per environment step;
- episode: the whole decision loop (SUMO, the env's reads, teacher, student)
  per environment step;
- transfer: per episode, the driver's time from sending the task to holding
  its result, less the worker's episode time (scheduling, sending weights and
  samples, deserialising); ``fetch`` is the part the driver spends in
  ``ray.get``, the only part that runs in series on the driver;
- learner: one epoch of the distillation loss over the collected samples, per
  sample, in the driver.

From these, two limits on adding workers:

- the driver handles one episode's results at a time, so collection stops
  scaling near ``episode time / fetch time`` workers;
- DAgger trains between collections, so a round's speed-up is bounded by
  (collect + train) / train (Amdahl), shown for ``--train-epochs`` epochs.

The machine's load average is printed at the start and the end, and each
mode's CPU share (worker CPU time over wall time): another process on the same
cores slows the 2-worker mode most.

Usage::

    .venv/bin/python bench/collect_scaling.py [--scenario grid4x4]
        [--episodes 4] [--beta 0.5] [--workers 1 2] [--repeats 1]
        [--train-epochs 40] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from marlkd.config import TrainConfig
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.distill.trainer import Trainer
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.rollout import LocalCollector
from marlkd.rollout.batching import AgentBatcher
from marlkd.rollout.ray_collector import RayCollector
from marlkd.students import AgentLayout, make_student
from marlkd.students.checkpoint import student_state
from marlkd.students.policy import StudentPolicy
from marlkd.teachers.max_pressure import MaxPressure

TARGET_TWO_VS_ONE = 1.7
ROUND = 1


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def same(a: Transitions, b: Transitions) -> bool:
    return all(
        np.array_equal(getattr(a, k), getattr(b, k))
        for k in ("obs", "agent", "mask", "teacher_scores", "teacher_action")
    )


def summary(mode: str, runs: list[dict]) -> dict:
    """Median figures over repeats; per-episode timings pooled."""
    wall = statistics.median(r["collect_s"] for r in runs)
    timings = [t for r in runs for t in r["timings"]]
    steps = sum(t["decisions"] for t in runs[0]["timings"])
    out = {
        "mode": mode,
        "collect_s": wall,
        "steps": steps,
        "steps_per_s": steps / wall,
        "start_s": statistics.median(r["start_s"] for r in runs),
        "sim_ms_per_step": 1e3
        * sum(t["sumo_s"] for t in timings)
        / sum(t["decisions"] for t in timings),
        "episode_ms_per_step": 1e3
        * sum(t["episode_s"] for t in timings)
        / sum(t["decisions"] for t in timings),
        "episode_s": statistics.median(t["episode_s"] for t in timings),
        "cpu_share": sum(t["cpu_s"] for t in timings)
        / sum(r["collect_s"] for r in runs),
    }
    if "task_s" in timings[0]:
        out["transfer_s"] = statistics.median(
            t["task_s"] - t["episode_s"] for t in timings
        )
        out["fetch_s"] = statistics.median(t["fetch_s"] for t in timings)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="grid4x4")
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--train-epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    print(f"{platform.node()}: {os.cpu_count()} CPUs, load average {load()}")
    scenario = get_scenario(args.scenario)
    env_config = TrafficEnvConfig()
    seeds = [args.seed + j for j in range(args.episodes)]
    for seed in seeds:  # generate the demand before any timing
        scenario.route_files(seed)
    env = TrafficSignalEnv(scenario, env_config)
    layout = AgentLayout.from_traffic_specs(env.specs, env_config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    torch.manual_seed(0)
    student = make_student("phase", layout)
    policy = StudentPolicy(student, batcher)

    def rng():  # the same draws in every mode
        return np.random.default_rng([args.seed, ROUND])

    runs: dict[str, list[dict]] = {}
    reference = None
    for _ in range(args.repeats):
        local = LocalCollector(env, MaxPressure(env.specs), batcher)
        started = time.perf_counter()
        data, _ = local.collect(policy, args.beta, seeds, ROUND, rng(), progress=False)
        wall = time.perf_counter() - started
        reference = reference or data
        runs.setdefault("in-process", []).append(
            {"collect_s": wall, "start_s": 0.0, "timings": local.timings}
        )
        print(f"in-process: {wall:.1f} s (load {load()})", flush=True)

        for n in args.workers:
            started = time.perf_counter()
            collector = RayCollector(
                scenario, env_config, "max-pressure", batcher, workers=n
            )
            start_s = time.perf_counter() - started
            try:
                started = time.perf_counter()
                got, _ = collector.collect(
                    policy, args.beta, seeds, ROUND, rng(), progress=False
                )
                wall = time.perf_counter() - started
                timings = collector.timings
            finally:
                collector.close()
            if not same(got, reference):
                raise SystemExit(f"{n} workers gave other samples than in-process")
            runs.setdefault(f"{n} workers", []).append(
                {"collect_s": wall, "start_s": start_s, "timings": timings}
            )
            print(
                f"{n} workers: {wall:.1f} s, start {start_s:.1f} s (load {load()})",
                flush=True,
            )
    env.close()

    # the learner: epochs of the distillation loss over the collected samples
    loss = DistillationLoss(weights={"kl": 1.0}, temperature=1.0)
    epochs = min(args.train_epochs, 5)
    config = TrainConfig(epochs=epochs, patience=epochs + 1)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(
            make_student("phase", layout), loss, config, Path(folder) / "round.pt"
        )
        started = time.perf_counter()
        trainer.fit(reference, 0, progress=False)
        epoch_s = (time.perf_counter() - started) / epochs
    learner_us = 1e6 * epoch_s / len(reference)

    rows = [summary(mode, r) for mode, r in runs.items()]
    base = rows[0]
    one = next((r for r in rows if r["mode"] == "1 workers"), None)
    print(f"\nload average at the end: {load()}")
    print(
        f"{args.episodes} episodes of {args.scenario} ({base['steps']} environment "
        f"steps, {len(reference)} samples), MaxPressure teacher, beta "
        f"{args.beta}, median of {args.repeats}\n"
    )
    print(
        "| mode | collect s | env steps/s | vs in-process | vs 1 worker | "
        "start s | CPU share | sim ms/step | episode ms/step | transfer s/ep "
        "| fetch ms/ep |"
    )
    print("|---" * 11 + "|")
    for r in rows:
        vs_one = r["steps_per_s"] / one["steps_per_s"] if one else float("nan")
        print(
            f"| {r['mode']} | {r['collect_s']:.1f} | {r['steps_per_s']:.1f} | "
            f"{r['steps_per_s'] / base['steps_per_s']:.2f} | {vs_one:.2f} | "
            f"{r['start_s']:.1f} | {r['cpu_share']:.2f} | "
            f"{r['sim_ms_per_step']:.1f} | {r['episode_ms_per_step']:.1f} | "
            f"{r.get('transfer_s', 0.0):.3f} | {1e3 * r.get('fetch_s', 0.0):.1f} |"
        )

    weights = len(pickle.dumps(student_state(student)))
    sample_bytes = sum(
        getattr(reference, k).nbytes
        for k in ("obs", "agent", "mask", "teacher_scores", "teacher_action", "round")
    )
    episode_s = base["episode_s"]
    print(
        f"\nsent per collection: weights {weights / 1e3:.1f} kB; returned per "
        f"episode: samples {sample_bytes / args.episodes / 1e6:.2f} MB"
    )
    print(
        f"learner: {learner_us:.1f} us per sample per epoch, "
        f"{epoch_s:.2f} s per epoch over these samples"
    )
    if one is not None:
        overhead = one["collect_s"] / base["collect_s"] - 1
        print(f"Ray at 1 worker against in-process: {100 * overhead:+.1f}% wall time")
    two = next((r for r in rows if r["mode"] == "2 workers"), None)
    if one and two:
        ratio = two["steps_per_s"] / one["steps_per_s"]
        verdict = "meets" if ratio >= TARGET_TWO_VS_ONE else "misses"
        print(
            f"2 workers vs 1: {ratio:.2f}x ({verdict} the {TARGET_TWO_VS_ONE}x target)"
        )
    fetch = max((r.get("fetch_s", 0.0) for r in rows), default=0.0)
    transfer = max((r.get("transfer_s", 0.0) for r in rows), default=0.0)
    if fetch > 0:
        print(
            f"driver-bound limit: about {episode_s / fetch:.0f} workers "
            f"(episode {episode_s:.1f} s / fetch {1e3 * fetch:.1f} ms in series on "
            f"the driver); with the whole transfer in series, "
            f"{episode_s / max(transfer, 1e-9):.0f}"
        )
    collect_1 = base["collect_s"]
    train_s = epoch_s * args.train_epochs
    print(
        f"a DAgger round of {args.episodes} episodes and {args.train_epochs} "
        f"epochs on its samples: collect {collect_1:.0f} s in process, train "
        f"{train_s:.0f} s; round speed-up with N workers "
        + ", ".join(
            f"N={n}: {(collect_1 + train_s) / (collect_1 / n + train_s):.2f}x"
            for n in (2, 4, 8, 16)
        )
        + f", at most {(collect_1 + train_s) / train_s:.1f}x"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "rows": rows,
                    "learner_us_per_sample_epoch": learner_us,
                    "weights_bytes": weights,
                    "sample_bytes_per_episode": sample_bytes / args.episodes,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
