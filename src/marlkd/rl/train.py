"""Training a network by RL alone: a large teacher, or the from-scratch baseline.

The run folder looks like a distillation run's, so the trained network can be
used as a teacher (``--teacher RUN/checkpoints/student.pt``) and its learning
curve sits beside a distilled student's:

    config.yaml  checkpoints/student.pt  metrics.csv  tensorboard/
    rl_curve.json  results.json  results.md

While training, ``checkpoints/rl_state.pt`` holds the whole training state of
the last finished iteration (DQN) or update (PPO); a run that finds it, as
``train-teacher --resume`` does, continues from there.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path

import torch

from marlkd.config import TeacherConfig, save_config
from marlkd.envs.traffic.env import TrafficSignalEnv
from marlkd.evaluate import TABLE_KEYS, decision_latency_us, format_table, simulate
from marlkd.rl.dqn import train_dqn
from marlkd.rl.ppo import train_ppo
from marlkd.rollout import make_collector
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.students.checkpoint import save_student
from marlkd.students.policy import StudentPolicy
from marlkd.teachers.central import train_central_teacher
from marlkd.teachers.registry import make_controller
from marlkd.tracking import MetricWriter
from marlkd.utils import atomic_write_text

logger = logging.getLogger(__name__)


def train_teacher(config: TeacherConfig, run_dir: Path, progress: bool = True) -> dict:
    """Train ``config.network`` with DQN or PPO, then evaluate it on held-out seeds.

    The training episodes run in this process, or on ``config.workers`` Ray
    workers; the greedy evaluations run in this process. Training continues
    from ``checkpoints/rl_state.pt`` when the run folder holds one.

    Raises:
        UserError: the training state in the run folder does not fit the
            config (another algorithm, scenario or network).
    """
    run_dir = Path(run_dir)
    save_config(config, run_dir / "config.yaml")
    logger.info("resolved config:\n%s", (run_dir / "config.yaml").read_text())
    env = TrafficSignalEnv(config.scenario.build(), config.env)
    writer = MetricWriter(run_dir)
    collector = None
    # "local" trains on each signal's own observation; "neighbours" and
    # "global" train a central teacher on its neighbours' observations too.
    observe = config.observe
    checkpoint = run_dir / "checkpoints" / "student.pt"
    rl_state = run_dir / "checkpoints" / "rl_state.pt"
    try:
        n = config.network
        if observe == "local":
            layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
            batcher = AgentBatcher(
                env.possible_agents, layout.max_obs_size, layout.max_actions
            )
            torch.manual_seed(config.rl.seed)
            network = make_student(
                n.kind,
                layout,
                hidden=tuple(n.hidden),
                shared=n.shared,
                agent_embedding=n.agent_embedding,
            )
            logger.info("%s network, %d parameters", n.kind, network.num_parameters())
            collector = make_collector(
                env,
                None,
                batcher,
                teacher_spec=None,
                workers=config.workers,
                ray_address=config.ray_address,
            )

            started = time.perf_counter()
            train = train_dqn if config.algorithm == "dqn" else train_ppo
            settings = config.rl if config.algorithm == "dqn" else config.ppo
            curve = train(
                env,
                network,
                settings,
                batcher=batcher,
                collector=collector,
                writer=writer,
                checkpoint=rl_state,
                progress=progress,
            )
            train_s = time.perf_counter() - started
            save_student(network, checkpoint)
            policy = StudentPolicy(network, batcher)
        else:
            started = time.perf_counter()
            policy, curve = train_central_teacher(
                env,
                config.rl,
                observe=observe,
                k=config.neighbours,
                kind=n.kind,
                hidden=tuple(n.hidden),
                shared=n.shared,
                agent_embedding=n.agent_embedding,
                writer=writer,
                progress=progress,
                workers=config.workers,
                ray_address=config.ray_address,
                checkpoint=rl_state,
            )
            train_s = time.perf_counter() - started
            network = policy.student
            policy.save(checkpoint)
        atomic_write_text(run_dir / "rl_curve.json", json.dumps(curve, indent=2))

        # evaluate: the trained network beside rule-based controllers
        observations, infos = env.reset(seed=config.eval.seed)
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        state = env.state()
        results = {}
        for name in config.eval.controllers:
            controller = policy if name == "teacher" else make_controller(name, env)
            outcome = simulate(
                env,
                controller,
                episodes=config.eval.episodes,
                seed=config.eval.seed,
                progress=progress,
            )
            outcome["mean"]["parameters"] = (
                network.num_parameters() if name == "teacher" else 0
            )
            timed = (
                functools.partial(controller, state=state)
                if controller.needs_state
                else controller
            )
            outcome["mean"].update(decision_latency_us(timed, observations, masks))
            results[name] = outcome
    finally:
        writer.close()
        if collector is not None:
            collector.close()
        env.close()

    report = {
        "run": str(run_dir),
        "scenario": env.scenario.name,
        "network": n.kind,
        "observe": observe,
        "train_s": train_s,
        "env_steps": curve[-1]["env_steps"] if curve else 0,
        "seeds": list(range(config.eval.seed, config.eval.seed + config.eval.episodes)),
        "controllers": results,
    }
    table = format_table([(k, v["mean"]) for k, v in results.items()], TABLE_KEYS)
    atomic_write_text(
        run_dir / "results.json", json.dumps(report, indent=2, default=float)
    )
    atomic_write_text(run_dir / "results.md", f"# {env.scenario.name}\n\n{table}\n")
    report["table"] = table
    return report
