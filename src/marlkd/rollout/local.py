"""The in-process collector: one simulation in this process.

Each decision, the teacher labels the state every agent is in; the behaviour
policy is the teacher with probability β and the student otherwise, drawn
independently per agent and decision (Ross et al., 2011, DAgger). With β = 1
this is behaviour cloning from the teacher's own rollouts.

Reinforcement learning collects through the same call: with ``rl=True`` each
sample also holds the action taken, the reward and the next observation (see
:mod:`marlkd.distill.dataset`), the behaviour (β = 0) is the learner's
exploring policy, and the teacher labels only when kickstarting asks for it.

The teacher-or-student draws of an episode come from a generator seeded by
the round, the episode's seed and one key drawn from the caller's generator
(:func:`episode_rng`), and so do an exploring behaviour's draws (through a
generator of their own, :func:`behaviour_rng`); an episode's samples do not
depend on which episodes ran before it, or where: the Ray collector gives the
same data.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from tqdm.auto import tqdm

from marlkd.distill.dataset import Transitions
from marlkd.rollout.batching import AgentBatcher
from marlkd.teachers.base import Teacher

logger = logging.getLogger(__name__)


def episode_key(rng: np.random.Generator | None) -> int:
    """The key of one collection's draws: one number from ``rng``, else 0."""
    return 0 if rng is None else int(rng.integers(2**63 - 1))


def episode_rng(key: int, round_index: int, seed: int) -> np.random.Generator:
    """The generator of an episode's teacher-or-student draws."""
    return np.random.default_rng([key, round_index, seed])


def behaviour_rng(key: int, round_index: int, seed: int) -> np.random.Generator:
    """The generator of an exploring behaviour's draws in an episode."""
    return np.random.default_rng([key, round_index, seed, 1])


class LocalCollector:
    """Collects teacher-labelled transitions in this process.

    Args:
        env: the environment, a PettingZoo ``ParallelEnv`` with action masks in
            its infos and ``last_episode`` figures after each episode.
        teacher: labels every visited state; None for collections without
            labels (reinforcement learning without kickstarting).
        batcher: agent names and padded sizes of the dataset.

    Attributes:
        timings: per episode of the last ``collect``, its wall time
            (``episode_s``), the part SUMO took (``sumo_s``), the CPU time of
            this process (``cpu_s``) and its decisions.
        last_timing: the same for the last episode run.
    """

    def __init__(self, env, teacher: Teacher | None, batcher: AgentBatcher):
        self.env = env
        self.teacher = teacher
        self.batcher = batcher
        self.timings: list[dict] = []
        self.last_timing: dict = {}

    @property
    def labels(self) -> bool:
        """Whether a teacher is there to label the samples."""
        return self.teacher is not None

    def collect(
        self,
        behaviour: Teacher | None,
        beta: float,
        seeds: list[int],
        round_index: int = 0,
        rng: np.random.Generator | None = None,
        progress: bool = True,
        *,
        label: bool = True,
        rl: bool = False,
        state: bool = False,
    ) -> tuple[Transitions, list[dict]]:
        """Run one episode per seed and return the samples.

        Args:
            behaviour: the student's policy; None lets the teacher drive. A
                behaviour whose ``explores`` is true gets a generator of the
                episode (:func:`behaviour_rng`) through ``reset(rng)``.
            beta: probability that the teacher's action is taken.
            seeds: one episode per seed.
            round_index: recorded with every sample.
            rng: gives the key of the episodes' draws (see
                :func:`episode_rng`); None means key 0.
            progress: show a progress bar over each episode's decisions.
            label: have the teacher label every sample; without labels the
                behaviour takes every action (``beta`` 0).
            rl: also record the action taken, the reward, the next
                observation and mask, the episode and the step.
            state: also record ``env.state()`` before and after each decision.

        Returns:
            The samples, episode after episode in the order of ``seeds``, and
            each episode's network figures.
        """
        check_request(self.labels, behaviour, beta, label)
        key = episode_key(rng)
        parts, episodes, self.timings = [], [], []
        for seed in seeds:
            data, figures = self.episode(
                behaviour, beta, seed, round_index, key, progress,
                label=label, rl=rl, state=state,
            )  # fmt: skip
            parts.append(data)
            episodes.append(figures)
            self.timings.append(self.last_timing)
        return Transitions.concat(parts), episodes

    def close(self) -> None:
        """Nothing to release: the environment belongs to the caller."""

    def episode(
        self,
        behaviour: Teacher | None,
        beta: float,
        seed: int,
        round_index: int,
        key: int,
        progress: bool = False,
        *,
        label: bool = True,
        rl: bool = False,
        state: bool = False,
    ) -> tuple[Transitions, dict]:
        """One episode: its samples and its network figures."""
        env, teacher, batcher = self.env, self.teacher, self.batcher
        rng = episode_rng(key, round_index, seed)
        started, cpu_started = time.perf_counter(), time.process_time()
        sumo_before = env.timers["sumo_step_s"]
        if label:
            teacher.reset()
        if behaviour is not None:
            if getattr(behaviour, "explores", False):
                behaviour.reset(behaviour_rng(key, round_index, seed))
            else:
                behaviour.reset()
        observations, infos = env.reset(seed=seed)
        rows: dict[str, list] = {}
        steps = int(round((env.end - env.begin) / env.config.delta_time)) - 1
        bar = tqdm(
            total=steps,
            desc=f"collect seed {seed}",
            leave=False,
            disable=None if progress else True,
        )
        decision = 0
        while env.agents:
            names = list(env.agents)
            masks = {a: infos[a]["action_mask"] for a in names}
            needs_state = state or (label and teacher.needs_state)
            global_state = env.state() if needs_state else None
            actions = {}
            if label:
                out = teacher.act(observations, masks, global_state)
                actions = dict(out.actions)
            if behaviour is not None and beta < 1.0:
                own = behaviour.act(observations, masks).actions
                for a in names:
                    if beta <= 0.0 or rng.random() >= beta:
                        actions[a] = own[a]

            obs, agent, mask = batcher.pad(observations, masks, names)
            record = {"obs": obs, "agent": agent, "mask": mask}
            if label:
                record["teacher_scores"] = batcher.pad_scores(out.scores, names)
                record["teacher_action"] = np.array([out.actions[a] for a in names])
                if out.features is not None:
                    record["teacher_features"] = np.stack(
                        [out.features[a] for a in names]
                    )

            observations, rewards, terminations, _, infos = env.step(actions)
            if rl:
                _check_rl_step(names, env.agents, terminations)
                masks = {a: infos[a]["action_mask"] for a in names}
                next_obs, _, next_mask = batcher.pad(observations, masks, names)
                record.update(
                    action=np.array([actions[a] for a in names]),
                    reward=np.array([rewards[a] for a in names], dtype=np.float32),
                    next_obs=next_obs,
                    next_mask=next_mask,
                    episode=np.full(len(names), seed, dtype=np.int64),
                    step=np.full(len(names), decision, dtype=np.int32),
                )
            if state:
                next_state = env.state()
                record["state"] = np.broadcast_to(
                    global_state, (len(names), len(global_state))
                )
                record["next_state"] = np.broadcast_to(
                    next_state, (len(names), len(next_state))
                )
            for k, v in record.items():
                rows.setdefault(k, []).append(v)
            decision += 1
            bar.update()
        bar.close()

        arrays = {k: np.concatenate(v) for k, v in rows.items()}
        for k in ("teacher_action", "action"):
            if k in arrays:
                arrays[k] = arrays[k].astype(np.int64)
        for k in ("teacher_features", "state", "next_state"):
            if k in arrays:
                arrays[k] = arrays[k].astype(np.float32)
        if label:
            arrays.setdefault("teacher_features", None)
        else:
            arrays.update(teacher_scores=None, teacher_action=None)
        n = len(arrays["agent"])
        data = Transitions(round=np.full(n, round_index, dtype=np.int32), **arrays)
        self.last_timing = {
            "seed": seed,
            "decisions": decision,
            "episode_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu_started,
            "sumo_s": env.timers["sumo_step_s"] - sumo_before,
        }
        return data, {"seed": seed, **env.last_episode.network}


def check_request(labels: bool, behaviour, beta: float, label: bool) -> None:
    """Refuse a collection whose actions nobody would choose."""
    if label and not labels:
        raise ValueError("labelled samples need a collector with a teacher")
    if not label and (behaviour is None or beta > 0.0):
        raise ValueError(
            "without teacher labels the behaviour policy takes every action: "
            "give one, with beta 0"
        )


def _check_rl_step(names: list[str], agents: list[str], terminations: dict) -> None:
    """RL samples assume truncated episodes in which every agent acts throughout."""
    if any(terminations.values()):
        raise NotImplementedError(
            "RL collection bootstraps every episode end as a truncation; an "
            "environment that terminates episodes needs a termination flag in "
            "the samples and targets that stop there"
        )
    if agents and list(agents) != names:
        raise NotImplementedError(
            "RL collection needs every agent to act at every step; agents "
            f"changed from {names} to {list(agents)} within an episode"
        )
