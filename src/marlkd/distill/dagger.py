"""Distillation by behaviour cloning and DAgger (Ross, Gordon & Bagnell, 2011).

Round k:

1. collect: run ``episodes_per_iteration`` episodes in which each agent takes
   the teacher's action with probability β_k and the student's otherwise; the
   teacher labels every state visited, whoever acted;
2. aggregate: add the round's samples to those of all earlier rounds;
3. train: fit the student to the aggregate with the weighted distillation loss;
   or, with ``cooperate.method`` fedavg or mutual, split the aggregate into
   clients that learn together (:mod:`marlkd.distill.cooperative`).

With β_k = 1 in every round this is behaviour cloning on the teacher's own
state distribution; DAgger lowers β so the student also learns what to do in
the states its own mistakes lead to.

Everything a round produces is on disk before the next begins (dataset round,
student checkpoint, ``progress.json``), so ``resume`` picks up an interrupted
run where it stopped.

With clients that learn together, the student the run produces (its
checkpoint, the behaviour policy of the next round, what ``marlkd evaluate``
and ``marlkd export`` read) is: for ``fedavg``, the averaged student; for
``mutual`` split by agents, a
:class:`~marlkd.students.routing.RoutingStudent` in which every signal is
driven by the client that trained on it; for ``mutual`` split by episodes,
the client of best agreement with the teacher on the held-out samples (every
client has seen every signal, so one of them can drive them all; averaging
their logits would cost K networks at every decision). The clients of
``mutual`` keep their own students from round to round
(``checkpoints/clients.pt``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from marlkd.config import RunConfig, save_config
from marlkd.distill import cooperative
from marlkd.distill.dataset import DatasetFolder, Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.distill.trainer import Trainer, _split
from marlkd.envs.traffic.env import TrafficSignalEnv
from marlkd.errors import UserError
from marlkd.rl.dqn import greedy_episode, train_dqn
from marlkd.rollout import make_collector
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.students.checkpoint import load_student, save_student, student_state
from marlkd.students.policy import StudentPolicy
from marlkd.students.routing import RoutingStudent
from marlkd.teachers.registry import make_teacher
from marlkd.tracking import MetricWriter
from marlkd.utils import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

VALIDATION_SEED = 9_000
"""Seed of learning-curve episodes: apart from training and held-out seeds."""
CLIENTS_FORMAT = "marlkd.clients"


def build_student(config: RunConfig, layout: AgentLayout) -> torch.nn.Module:
    torch.manual_seed(config.train.seed)
    s = config.student
    return make_student(
        s.kind,
        layout,
        hidden=tuple(s.hidden),
        shared=s.shared,
        agent_embedding=s.agent_embedding,
    )


def distill(
    config: RunConfig, run_dir: Path, resume: bool = False, progress: bool = True
) -> torch.nn.Module:
    """Run the collection and training rounds of ``config`` in ``run_dir``.

    Returns:
        The trained student; its checkpoint is ``run_dir/checkpoints/student.pt``.
    """
    run_dir = Path(run_dir)
    progress_path = run_dir / "progress.json"
    state = (
        json.loads(progress_path.read_text())
        if resume and progress_path.exists()
        else {}
    )
    rounds_done = int(state.get("rounds_done", 0))
    state.setdefault("rounds_done", rounds_done)

    env = TrafficSignalEnv(config.scenario.build(), config.env)
    writer = collector = None
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, config.env.max_green)
        batcher = AgentBatcher(
            env.possible_agents, layout.max_obs_size, layout.max_actions
        )
        co = config.cooperate
        if co.method != "none" and co.split == "agents":
            if co.clients > layout.num_agents:
                raise UserError(
                    f"cooperate.clients is {co.clients} with split agents, but "
                    f"{env.scenario.name} has {layout.num_agents} signals: set "
                    f"cooperate.clients to at most {layout.num_agents}, or "
                    "cooperate.split=episodes"
                )
        teacher = make_teacher(config.teacher, env)
        student = build_student(config, layout)
        student_path = run_dir / "checkpoints" / "student.pt"
        clients_path = run_dir / "checkpoints" / "clients.pt"
        clients = None
        if rounds_done and student_path.exists():
            # a routing student is of another kind than the one configured
            student = load_student(student_path, layout)
            if clients_path.exists():
                clients = load_clients(clients_path, layout)

        loss = DistillationLoss(
            weights={
                "kl": config.loss.kl,
                "ce": config.loss.ce,
                "mse": config.loss.mse,
                "feature": config.loss.feature,
            },
            temperature=config.loss.temperature,
            student_dim=student.feature_dim,
            teacher_dim=_teacher_feature_dim(teacher, env),
        )
        c = config.collect
        # in this process, or on Ray workers (started here, so that a missing
        # Ray or a worker that cannot build the scenario fails before any write)
        collector = make_collector(
            env,
            teacher,
            batcher,
            teacher_spec=config.teacher,
            workers=c.workers,
            ray_address=c.ray_address,
        )

        # the inputs are sound: only now write to the run folder
        save_config(config, run_dir / "config.yaml")
        logger.info("run folder %s", run_dir)
        logger.info("resolved config:\n%s", (run_dir / "config.yaml").read_text())
        writer = MetricWriter(run_dir)
        trainer = Trainer(
            student, loss, config.train, run_dir / "checkpoints" / "round.pt", writer
        )
        trainer.global_epoch = int(state.get("global_epoch", 0))
        dataset = DatasetFolder(run_dir / "dataset")
        dataset.write_meta(
            {
                "agents": env.possible_agents,
                "obs_size": layout.max_obs_size,
                "num_actions": layout.max_actions,
                "teacher": config.teacher,
                "scenario": env.scenario.name,
            }
        )
        parts: list[Transitions] = [
            with_episodes(dataset.load_round(k), round_seeds(c, k))
            for k in range(rounds_done)
        ]
        if c.reuse:
            parts.insert(0, reused_data(Path(c.reuse), dataset.read_meta()))

        for k in range(rounds_done, c.iterations):
            policy = StudentPolicy(student, batcher)
            # collect: the first round, and every round of bc, is teacher-driven
            beta = c.beta_at(k)
            seeds = round_seeds(c, k)
            if dataset.has_round(k):
                data = dataset.load_round(k)
                logger.info("round %d: reusing %d collected samples", k, len(data))
            else:
                behaviour = None if k == 0 or beta >= 1.0 else policy
                rng = np.random.default_rng([c.seed, k])
                started = time.perf_counter()
                data, episodes = collector.collect(
                    behaviour, beta, seeds, k, rng, progress=progress
                )
                dataset.save_round(k, data)
                writer.log(
                    trainer.global_epoch,
                    {
                        "collect/round": k,
                        "collect/beta": beta,
                        "collect/samples": len(data),
                        "collect/episodes": (k + 1) * c.episodes_per_iteration,
                        "collect/behaviour_avg_delay_s": float(
                            np.mean([e["avg_delay_s"] for e in episodes])
                        ),
                        "timers/collect_s": time.perf_counter() - started,
                    },
                )
                logger.info(
                    "round %d: beta=%.2f, %d samples, behaviour delay %.1f s",
                    k,
                    beta,
                    len(data),
                    np.mean([e["avg_delay_s"] for e in episodes]),
                )
            parts.append(with_episodes(data, seeds))

            # train on the aggregate of every round so far
            started = time.perf_counter()
            aggregate = Transitions.concat(parts)
            if co.method == "none":
                fit = trainer.fit(aggregate, k, progress=progress)
                figures = {
                    "distill/best_val_loss": fit.best_val_loss,
                    "distill/round_val_agreement": fit.val_agreement,
                }
                logger.info(
                    "round %d: %d epochs, val loss %.4f, val agreement %.3f",
                    k,
                    fit.epochs,
                    fit.best_val_loss,
                    fit.val_agreement,
                )
            else:
                student, clients, figures = learn_round_together(
                    config, run_dir, k, aggregate, student, clients, loss,
                    layout, trainer, writer, progress,
                )  # fmt: skip
            writer.log(
                trainer.global_epoch,
                {
                    "distill/train_samples": len(aggregate),
                    **figures,
                    "timers/train_s": time.perf_counter() - started,
                },
            )
            if clients is not None:
                save_clients(clients, clients_path)
            save_student(student, student_path)
            if c.validate:
                figures = greedy_episode(env, student, batcher, VALIDATION_SEED)
                steps = (k + 1) * c.episodes_per_iteration * _steps_per_episode(env)
                writer.log(
                    steps, {"collect/student_val_avg_delay_s": figures["avg_delay_s"]}
                )
                _append_curve(
                    run_dir / "rounds_curve.json",
                    {"env_steps": steps, "round": k, **figures},
                )
            state = {"rounds_done": k + 1, "global_epoch": trainer.global_epoch}
            atomic_write_text(progress_path, json.dumps(state))
            _together_checkpoint(run_dir, k).unlink(missing_ok=True)

        if config.rl.episodes > 0 and not state.get("rl_done"):
            kickstart(
                config, run_dir, env, student, collector, batcher, writer, progress
            )
            save_student(student, student_path)
            state["rl_done"] = True
            atomic_write_text(progress_path, json.dumps(state))
        return student
    finally:
        if writer is not None:
            writer.close()
        if collector is not None:
            collector.close()
        env.close()


def learn_round_together(
    config, run_dir, k, aggregate, student, clients, loss, layout, trainer, writer,
    progress,
):  # fmt: skip
    """Round ``k``'s training by clients that learn together.

    The aggregate loses the held-out share the central trainer would hold out
    (the same rows), the rest is split into the clients' parts, and
    ``learn_together`` trains them for ``cooperate.rounds`` rounds, on the
    run's Ray workers when it has any. Its state after every round is in
    ``checkpoints/together_round{k}.pt``, so an interrupted round resumes.

    Returns:
        The run's new student, the clients' students (``mutual``; None for
        ``fedavg``, whose clients are the student) and the round's figures.
    """
    co, c = config.cooperate, config.collect
    seed = config.train.seed + k
    train_idx, val_idx = _split(len(aggregate), config.train.val_fraction, seed)
    train, val = aggregate.subset(train_idx), aggregate.subset(val_idx)
    parts = cooperative.split_parts(train, co.split, co.clients)
    settings = cooperative.CooperativeConfig.of_run(
        co, dataclasses.replace(config.train, seed=seed)
    )
    mutual = co.method == "mutual"
    # mutual clients continue from their own students, once they have them
    base = clients[0] if mutual and clients else student
    result = cooperative.learn_together(
        base,
        parts,
        loss,
        settings,
        workers=c.workers,
        ray_address=c.ray_address,
        # the rollout workers hold the Ray CPUs, idle while the clients train
        worker_cpus=0.0,
        checkpoint=_together_checkpoint(run_dir, k),
        starts=clients if mutual and clients else None,
        progress=progress,
    )
    for row in result.history:
        trainer.global_epoch += 1
        writer.log(
            trainer.global_epoch,
            {
                "distill/round": k,
                "distill/train_loss": row["distill/train_loss"],
                "distill/mutual_loss": row["distill/mutual_loss"],
                "timers/together_round_s": row["timers/round_s"],
            },
        )

    # the student the run produces, scored on the held-out samples
    students = result.students
    losses, agreements, disagreement = cooperative.client_scores(students, loss, val)
    if not mutual:
        student, clients = result.shared, None
    elif co.split == "agents":
        assignment = cooperative.agents_of_clients(layout.num_agents, co.clients)
        student, clients = RoutingStudent.of_clients(students, assignment), students
    else:
        best = int(np.argmax(agreements))
        student, clients = students[best], students
        logger.info("round %d: client %d drives every signal", k, best)
    (val_loss,), (val_agreement,), _ = cooperative.client_scores([student], loss, val)
    logger.info(
        "round %d: %s of %d clients, val loss %.4f, val agreement %.3f "
        "(clients %s), disagreement between clients %.3f",
        k,
        co.method,
        co.clients,
        val_loss,
        val_agreement,
        " ".join(f"{a:.3f}" for a in agreements),
        disagreement,
    )
    figures = {
        "distill/best_val_loss": val_loss,
        "distill/round_val_agreement": val_agreement,
        "distill/client_val_agreement_mean": float(np.mean(agreements)),
        "distill/client_val_agreement_min": float(np.min(agreements)),
        "distill/client_val_loss_mean": float(np.mean(losses)),
        "distill/client_disagreement": disagreement,
    }
    return student, clients, figures


def save_clients(clients, path: Path) -> None:
    """Write the clients' students, as plain data, atomically."""
    buffer = io.BytesIO()
    torch.save(
        {"format": CLIENTS_FORMAT, "clients": [student_state(s) for s in clients]},
        buffer,
    )
    atomic_write_bytes(path, buffer.getvalue())


def load_clients(path: Path, layout: AgentLayout) -> list:
    """The clients' students written by ``save_clients``."""
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != CLIENTS_FORMAT:
        raise UserError(
            f"{path} holds no clients of students learning together: delete it "
            "to start the clients from the run's student"
        )
    return [load_student(s, layout) for s in state["clients"]]


def round_seeds(c, k: int) -> list[int]:
    """The seeds of round ``k``'s episodes."""
    return [
        c.seed + k * c.episodes_per_iteration + j
        for j in range(c.episodes_per_iteration)
    ]


def with_episodes(data: Transitions, seeds: list[int]) -> Transitions:
    """A round's samples with each one's episode seed, when they lack it.

    A round holds its episodes one after another, each of as many samples
    (every signal decides at every step of an episode of fixed length), so
    its samples fall into equal blocks, one per seed.
    """
    if data.episode is not None or len(data) % len(seeds):
        return data
    episode = np.repeat(np.asarray(seeds, dtype=np.int64), len(data) // len(seeds))
    return dataclasses.replace(data, episode=episode)


def _together_checkpoint(run_dir: Path, k: int) -> Path:
    return run_dir / "checkpoints" / f"together_round{k}.pt"


def kickstart(config, run_dir, env, student, collector, batcher, writer, progress):
    """RL fine-tuning of the student with an annealed pull towards the teacher.

    The distilled student is the starting point (with no collection rounds it
    starts from scratch, as in Schmitt et al. 2018); DQN then optimises the
    environment's reward while ``rl.kickstart`` weighs the distillation term.
    Its episodes run through the run's collector, where the distillation
    rounds ran, and its teacher labels them while λ is above 0. An
    interrupted RL phase resumes from its last checkpointed iteration.
    """
    collected = config.collect.iterations * config.collect.episodes_per_iteration
    logger.info(
        "kickstarting: %d RL episodes, lambda %.2f falling to 0 over %g episodes",
        config.rl.episodes,
        config.rl.kickstart,
        config.rl.kickstart_episodes,
    )
    curve = train_dqn(
        env,
        student,
        config.rl,
        batcher=batcher,
        collector=collector,
        writer=writer,
        step_offset=collected * _steps_per_episode(env),
        checkpoint=run_dir / "checkpoints" / "rl_state.pt",
        progress=progress,
    )
    atomic_write_text(run_dir / "rl_curve.json", json.dumps(curve, indent=2))


def reused_data(folder: Path, meta: dict) -> Transitions:
    """All rounds of an earlier run's dataset, checked against this run's."""
    earlier = DatasetFolder(folder)
    other = earlier.read_meta()
    for key in ("agents", "obs_size", "num_actions"):
        if other.get(key) != meta[key]:
            raise UserError(
                f"{folder} was collected for other agents or sizes ({key} differs):"
                " reuse a dataset of the same scenario"
            )
    data = earlier.load_all()
    logger.info("reusing %d samples from %s", len(data), folder)
    return data


def _steps_per_episode(env) -> int:
    return int(round((env.end - env.begin) / env.config.delta_time)) - 1


def _append_curve(path: Path, record: dict) -> None:
    curve = json.loads(path.read_text()) if path.exists() else []
    curve = [r for r in curve if r.get("round") != record["round"]] + [record]
    atomic_write_text(path, json.dumps(curve, indent=2))


def _teacher_feature_dim(teacher, env) -> int | None:
    """Size of the teacher's feature vectors, or None when it gives none."""
    if not hasattr(teacher, "student"):
        return None
    return int(teacher.student.feature_dim)
