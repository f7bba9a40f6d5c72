"""Students that learn together: federated averaging and mutual distillation.

``--clients`` students each see only their own part of the teacher-labelled
data, as rollout workers or intersections would keep it: the samples of their
own episodes (``--split episodes``) or of their own signals (``--split
agents``). They learn together with :func:`marlkd.distill.cooperative.
learn_together`, for ``--rounds`` rounds of ``--local-epochs`` local epochs:

- ``fedavg``: every round the clients' students are averaged, weighted by
  their sample counts, into the next shared student (McMahan et al., 2017);
  only parameters travel.
- ``mutual``: each client keeps its own student and adds to its teacher loss
  the KL towards its peers' softened predictions of the previous round, on the
  states (not the labels) of every client, exchanged once (deep mutual
  learning, Zhang et al., 2018); only logits travel after the start. Client 0's
  student is scored, beside the mean agreement of all clients.

They are compared with one central student trained on all the data and with
client 0 trained alone on its part, both for the same rounds of the same local
epochs (so the central student sees every sample as often as the clients do),
the same batch size and a fresh AdamW each round.

The clients train on ``--workers`` Ray actors (0: in this process), which also
collect the data (MaxPressure driving, β = 1). ``--in-process-too`` trains the
clients a second time in this process, to time both and check that they end
with the same parameters.

Scored on held-out seeds (10000 on): agreement with the teacher and the KL
loss on the teacher's own states, and the traffic delay when the student
drives.

Usage::

    .venv/bin/python bench/federated_students.py [--scenario grid4x4]
        [--clients 2] [--episodes-per-client 2] [--split episodes]
        [--method both] [--rounds 10] [--local-epochs 2] [--mutual-weight 1]
        [--eval-episodes 2] [--workers 2] [--in-process-too] [--student mlp]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from marlkd.config import TrainConfig
from marlkd.distill.cooperative import CooperativeConfig, learn_together
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.distill.trainer import agreement
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.evaluate import simulate
from marlkd.rollout import make_collector
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.students.policy import StudentPolicy
from marlkd.teachers.max_pressure import MaxPressure

EVAL_SEED = 10_000


@torch.no_grad()
def score(student, loss, data: Transitions) -> dict:
    """Agreement with the teacher and the KL loss on held-out samples."""
    student.eval()
    obs, agent = torch.from_numpy(data.obs), torch.from_numpy(data.agent)
    mask, scores = torch.from_numpy(data.mask), torch.from_numpy(data.teacher_scores)
    out = student(obs, agent, mask)
    value, _ = loss(out, mask=mask, teacher_scores=scores)
    agree = agreement(out.logits, scores, mask)
    return {"kl": float(value), "agreement": float(agree.mean())}


def split(data: Transitions, parts: list[Transitions], how: str, clients: int):
    """Each client's samples: its own episodes, or its own signals."""
    if how == "episodes":
        return parts
    return [
        data.subset(np.flatnonzero(data.agent % clients == k)) for k in range(clients)
    ]


def same_students(a, b) -> float:
    """The largest difference between the parameters of two runs' students."""
    return max(
        float((x.state_dict()[k] - y.state_dict()[k]).abs().max())
        for x, y in zip(a.students, b.students, strict=True)
        for k in x.state_dict()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="grid4x4")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--episodes-per-client", type=int, default=2)
    parser.add_argument("--split", choices=["episodes", "agents"], default="episodes")
    parser.add_argument(
        "--method", choices=["fedavg", "mutual", "both"], default="both"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--mutual-weight", type=float, default=1.0)
    parser.add_argument("--mutual-temperature", type=float, default=1.0)
    parser.add_argument("--eval-episodes", type=int, default=2)
    parser.add_argument(
        "--workers", type=int, default=2,
        help="Ray actors that collect and train the clients; 0: this process",
    )  # fmt: skip
    parser.add_argument(
        "--in-process-too", action="store_true",
        help="train the clients in this process too, to time and compare both",
    )  # fmt: skip
    parser.add_argument(
        "--student", choices=["phase", "mlp"], default="mlp",
        help="mlp must learn MaxPressure's pressure sums from the padded "
        "observation; phase represents them exactly and learns them in an epoch",
    )  # fmt: skip
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.workers:
        import ray

        # one Ray for the collector's actors and then the learners'
        ray.init(
            num_cpus=args.workers, include_dashboard=False, logging_level="WARNING"
        )

    # collect: each client's episodes, then held-out episodes, teacher driving
    env = TrafficSignalEnv(get_scenario(args.scenario), TrafficEnvConfig())
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    collector = make_collector(
        env, MaxPressure(env.specs), batcher, teacher_spec="max-pressure",
        workers=args.workers,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        e = args.episodes_per_client
        parts = [
            collector.collect(
                None, 1.0, list(range(k * e, (k + 1) * e)), progress=False
            )[0]
            for k in range(args.clients)
        ]
        eval_seeds = [EVAL_SEED + j for j in range(args.eval_episodes)]
        held_out, teacher_episodes = collector.collect(
            None, 1.0, eval_seeds, progress=False
        )
    finally:
        collector.close()
    collect_s = time.perf_counter() - started
    data = Transitions.concat(parts)
    shards = split(data, parts, args.split, args.clients)
    loss = DistillationLoss(weights={"kl": 1.0})
    train = TrainConfig()
    methods = ["fedavg", "mutual"] if args.method == "both" else [args.method]

    def fresh():
        torch.manual_seed(train.seed)
        return make_student(args.student, layout)

    def together(method: str, parts: list[Transitions], workers: int):
        config = CooperativeConfig(
            method, args.rounds, args.local_epochs, args.mutual_weight,
            args.mutual_temperature, train,
        )  # fmt: skip
        started = time.perf_counter()
        result = learn_together(
            fresh(), parts, loss, config, workers=workers, progress=False
        )
        return result, time.perf_counter() - started

    # train: the baselines in this process, the clients where asked
    learn_together(
        fresh(), [shards[0]], loss, CooperativeConfig(rounds=1, local_epochs=1),
        progress=False,
    )  # fmt: skip  # warm up torch
    students, train_s, notes = {}, {}, []
    result, train_s["central"] = together("fedavg", [data], 0)
    students["central"] = result.shared
    for method in methods:
        result, seconds = together(method, shards, args.workers)
        name = "federated averaging" if method == "fedavg" else "mutual, client 0"
        students[name], train_s[name] = result.shared, seconds
        rounds_s = sum(r["timers/round_s"] for r in result.history)
        first_s = result.history[0]["timers/round_s"]
        if method == "mutual":
            agree = [score(s, loss, held_out)["agreement"] for s in result.students]
            notes.append(
                "mutual clients' agreement: "
                + ", ".join(f"{a:.3f}" for a in agree)
                + f" (mean {np.mean(agree):.3f})"
            )
        where = f"{args.workers} Ray workers" if args.workers else "this process"
        notes.append(
            f"{method} on {where}: {seconds:.1f} s in all, {rounds_s:.1f} s in "
            f"rounds, {first_s:.1f} s of them in round 0"
        )
        if args.in_process_too and args.workers:
            local, local_s = together(method, shards, 0)
            local_rounds = sum(r["timers/round_s"] for r in local.history)
            local_first = local.history[0]["timers/round_s"]
            notes.append(
                f"{method} in this process: {local_s:.1f} s in all, "
                f"{local_rounds:.1f} s in rounds, {local_first:.1f} s of them in "
                "round 0; largest parameter difference "
                f"from the Ray run {same_students(result, local):.1e}"
            )
    result, train_s["client 0 alone"] = together("fedavg", [shards[0]], 0)
    students["client 0 alone"] = result.shared

    # score on the held-out seeds: agreement, and delay with the student driving
    rows = []
    for name, student in students.items():
        delay = simulate(
            env, StudentPolicy(student, batcher), episodes=len(eval_seeds),
            seed=EVAL_SEED, progress=False,
        )["mean"]["avg_delay_s"]  # fmt: skip
        rows.append(
            {
                "student": name,
                **score(student, loss, held_out),
                "avg_delay_s": float(delay),
                "train_s": train_s[name],
            }
        )
    env.close()
    if args.workers:
        ray.shutdown()
    teacher_delay = float(np.mean([e["avg_delay_s"] for e in teacher_episodes]))

    sizes = ", ".join(str(len(s)) for s in shards)
    print(
        f"\n{args.scenario}, {args.student} student: {args.clients} clients x "
        f"{args.episodes_per_client} episodes, split by {args.split} ({sizes} "
        f"samples); {args.rounds} rounds x {args.local_epochs} local epochs; "
        f"mutual weight {args.mutual_weight}, T {args.mutual_temperature}; "
        f"collected in {collect_s:.0f} s on {args.workers or 'no'} Ray workers"
    )
    print(f"held-out seeds {eval_seeds}: teacher avg_delay_s {teacher_delay:.2f}")
    for note in notes:
        print(note)
    print("\n| student | agreement | KL | avg_delay_s | vs teacher | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['student']} | {r['agreement']:.3f} | {r['kl']:.4f} | "
            f"{r['avg_delay_s']:.2f} | {r['avg_delay_s'] / teacher_delay:.2f} | "
            f"{r['train_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "rows": rows,
                 "notes": notes, "teacher_avg_delay_s": teacher_delay},
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
