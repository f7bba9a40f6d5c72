"""Students that learn together: federated averaging against one central student.

``--clients`` students each see only their own part of the teacher-labelled
data, as rollout workers or intersections would keep it: the samples of their
own episodes (``--split episodes``) or of their own signals (``--split
agents``). Each round, every client trains a copy of the shared student for
``--local-epochs`` epochs on its part with a fresh AdamW, and the copies are
averaged, weighted by their sample counts, into the next shared student
(FedAvg; McMahan et al., 2017, "Communication-Efficient Learning of Deep
Networks from Decentralized Data"):

    w_{t+1} = sum_k (n_k / n) w_{t+1}^k

The central student trains on all the data for ``--rounds`` x
``--local-epochs`` epochs, so both see every sample equally often: the same
data budget and the same number of gradient steps in all. A client trained on
its own part alone shows what learning together buys.

Clients train one after another in this process: the arithmetic is FedAvg's
whatever runs it; spreading the clients over Ray workers is not part of this
comparison. The data is collected on ``--workers`` Ray workers (0: in this
process) by the MaxPressure teacher driving (β = 1).

Scored on held-out seeds: agreement with the teacher and the KL loss on the
teacher's own states, and the traffic delay when the student drives.

Usage::

    .venv/bin/python bench/federated_students.py [--scenario grid4x4]
        [--clients 2] [--episodes-per-client 2] [--split episodes]
        [--rounds 10] [--local-epochs 2] [--eval-episodes 2] [--workers 2]
        [--student mlp] [--json FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from marlkd.config import TrainConfig
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.distill.trainer import agreement
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.rl.dqn import greedy_episode
from marlkd.rollout import make_collector
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.teachers.max_pressure import MaxPressure

EVAL_SEED = 10_000


def tensors(data: Transitions) -> dict[str, torch.Tensor]:
    return {
        "obs": torch.from_numpy(data.obs),
        "agent": torch.from_numpy(data.agent),
        "mask": torch.from_numpy(data.mask),
        "teacher_scores": torch.from_numpy(data.teacher_scores),
        "teacher_action": torch.from_numpy(data.teacher_action),
    }


def train(student, loss, data: dict, epochs: int, config: TrainConfig, seed: int):
    """``epochs`` epochs of minibatch AdamW, a fresh optimiser, in place."""
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    n = len(data["agent"])
    student.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, config.batch_size):
            batch = {
                k: v[order[start : start + config.batch_size]] for k, v in data.items()
            }
            out = student(batch["obs"], batch["agent"], batch["mask"])
            value, _ = loss(
                out,
                mask=batch["mask"],
                teacher_scores=batch["teacher_scores"],
                teacher_action=batch["teacher_action"],
            )
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()


def average(states: list[dict], weights: list[float]) -> dict:
    """The weighted mean of state dicts (FedAvg's aggregation)."""
    total = float(sum(weights))
    return {
        key: sum(
            w / total * s[key].float() for s, w in zip(states, weights, strict=True)
        )
        for key in states[0]
    }


@torch.no_grad()
def score(student, loss, data: dict) -> dict:
    student.eval()
    out = student(data["obs"], data["agent"], data["mask"])
    value, _ = loss(
        out,
        mask=data["mask"],
        teacher_scores=data["teacher_scores"],
        teacher_action=data["teacher_action"],
    )
    agree = agreement(out.logits, data["teacher_scores"], data["mask"])
    return {"kl": float(value), "agreement": float(agree.mean())}


def split(data: Transitions, parts: list[Transitions], how: str, clients: int):
    """Each client's samples: its own episodes, or its own signals."""
    if how == "episodes":
        return parts
    return [
        data.subset(np.flatnonzero(data.agent % clients == k)) for k in range(clients)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="grid4x4")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--episodes-per-client", type=int, default=2)
    parser.add_argument("--split", choices=["episodes", "agents"], default="episodes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--eval-episodes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
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
    shard_tensors = [tensors(s) for s in shards]
    held_out = tensors(held_out)
    loss = DistillationLoss(weights={"kl": 1.0})
    config = TrainConfig()
    epochs = args.rounds * args.local_epochs

    def fresh():
        torch.manual_seed(config.seed)
        return make_student(args.student, layout)

    students, train_s = {}, {}
    train(fresh(), loss, shard_tensors[0], 1, config, seed=0)  # warm up torch

    started = time.perf_counter()
    central = fresh()
    train(central, loss, tensors(data), epochs, config, seed=0)
    students["central"], train_s["central"] = central, time.perf_counter() - started

    started = time.perf_counter()
    shared = fresh()
    for r in range(args.rounds):
        states = []
        for k, shard in enumerate(shard_tensors):
            client = copy.deepcopy(shared)
            train(client, loss, shard, args.local_epochs, config, seed=1000 * r + k)
            states.append(client.state_dict())
        shared.load_state_dict(average(states, [len(s) for s in shards]))
    students["fedavg"], train_s["fedavg"] = shared, time.perf_counter() - started

    started = time.perf_counter()
    alone = fresh()
    train(alone, loss, shard_tensors[0], epochs, config, seed=0)
    students["client 0 alone"], train_s["client 0 alone"] = (
        alone,
        time.perf_counter() - started,
    )

    rows = []
    for name, student in students.items():
        delays = [
            greedy_episode(env, student, batcher, seed)["avg_delay_s"]
            for seed in eval_seeds
        ]
        rows.append(
            {
                "student": name,
                **score(student, loss, held_out),
                "avg_delay_s": float(np.mean(delays)),
                "train_s": train_s[name],
            }
        )
    env.close()
    teacher_delay = float(np.mean([e["avg_delay_s"] for e in teacher_episodes]))

    sizes = ", ".join(str(len(s)) for s in shards)
    print(
        f"\n{args.scenario}, {args.student} student: {args.clients} clients x "
        f"{args.episodes_per_client} episodes, split by {args.split} ({sizes} "
        f"samples); {args.rounds} rounds x {args.local_epochs} local epochs = "
        f"{epochs} epochs for the central student; collected in {collect_s:.0f} s "
        f"on {args.workers or 'no'} Ray workers"
    )
    print(f"held-out seeds {eval_seeds}: teacher avg_delay_s {teacher_delay:.2f}\n")
    print("| student | agreement | KL | avg_delay_s | vs teacher | train s |")
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
                 "teacher_avg_delay_s": teacher_delay},
                indent=2,
            )
        )  # fmt: skip


if __name__ == "__main__":
    main()
