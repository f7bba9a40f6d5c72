"""The in-process collector: one simulation in this process.

Each decision, the teacher labels the state every agent is in; the behaviour
policy is the teacher with probability β and the student otherwise, drawn
independently per agent and decision (Ross et al., 2011, DAgger). With β = 1
this is behaviour cloning from the teacher's own rollouts.

The teacher-or-student draws of an episode come from a generator seeded by
the round, the episode's seed and one key drawn from the caller's generator
(:func:`episode_rng`), so an episode's samples do not depend on which episodes
ran before it, or where: the Ray collector gives the same data.
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


class LocalCollector:
    """Collects teacher-labelled transitions in this process.

    Args:
        env: the environment, a PettingZoo ``ParallelEnv`` with action masks in
            its infos and ``last_episode`` figures after each episode.
        teacher: labels every visited state.
        batcher: agent names and padded sizes of the dataset.

    Attributes:
        timings: per episode of the last ``collect``, its wall time
            (``episode_s``), the part SUMO took (``sumo_s``), the CPU time of
            this process (``cpu_s``) and its decisions.
        last_timing: the same for the last episode run.
    """

    def __init__(self, env, teacher: Teacher, batcher: AgentBatcher):
        self.env = env
        self.teacher = teacher
        self.batcher = batcher
        self.timings: list[dict] = []
        self.last_timing: dict = {}

    def collect(
        self,
        behaviour: Teacher | None,
        beta: float,
        seeds: list[int],
        round_index: int = 0,
        rng: np.random.Generator | None = None,
        progress: bool = True,
    ) -> tuple[Transitions, list[dict]]:
        """Run one episode per seed and return the labelled samples.

        Args:
            behaviour: the student's policy; None lets the teacher drive.
            beta: probability that the teacher's action is taken.
            seeds: one episode per seed.
            round_index: recorded with every sample.
            rng: gives the key of the teacher-or-student draws (see
                :func:`episode_rng`); None means key 0.
            progress: show a progress bar over each episode's decisions.

        Returns:
            The samples, episode after episode in the order of ``seeds``, and
            each episode's network figures.
        """
        key = episode_key(rng)
        parts, episodes, self.timings = [], [], []
        for seed in seeds:
            data, figures = self.episode(
                behaviour, beta, seed, round_index, key, progress
            )
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
    ) -> tuple[Transitions, dict]:
        """One episode: its labelled samples and its network figures."""
        env, teacher, batcher = self.env, self.teacher, self.batcher
        rng = episode_rng(key, round_index, seed)
        started, cpu_started = time.perf_counter(), time.process_time()
        sumo_before = env.timers["sumo_step_s"]
        teacher.reset()
        if behaviour is not None:
            behaviour.reset()
        observations, infos = env.reset(seed=seed)
        rows: dict[str, list] = {
            k: [] for k in ("obs", "agent", "mask", "scores", "act")
        }
        features = []
        steps = int(round((env.end - env.begin) / env.config.delta_time)) - 1
        bar = tqdm(
            total=steps,
            desc=f"collect seed {seed}",
            leave=False,
            disable=None if progress else True,
        )
        while env.agents:
            names = list(env.agents)
            masks = {a: infos[a]["action_mask"] for a in names}
            state = env.state() if teacher.needs_state else None
            label = teacher.act(observations, masks, state)
            actions = dict(label.actions)
            if behaviour is not None and beta < 1.0:
                own = behaviour.act(observations, masks).actions
                for a in names:
                    if rng.random() >= beta:
                        actions[a] = own[a]

            obs, agent, mask = batcher.pad(observations, masks, names)
            rows["obs"].append(obs)
            rows["agent"].append(agent)
            rows["mask"].append(mask)
            rows["scores"].append(batcher.pad_scores(label.scores, names))
            rows["act"].append(np.array([label.actions[a] for a in names]))
            if label.features is not None:
                features.append(np.stack([label.features[a] for a in names]))

            observations, _, _, _, infos = env.step(actions)
            bar.update()
        bar.close()

        n = sum(len(a) for a in rows["agent"])
        data = Transitions(
            obs=np.concatenate(rows["obs"]),
            agent=np.concatenate(rows["agent"]),
            mask=np.concatenate(rows["mask"]),
            teacher_scores=np.concatenate(rows["scores"]),
            teacher_action=np.concatenate(rows["act"]).astype(np.int64),
            round=np.full(n, round_index, dtype=np.int32),
            teacher_features=np.concatenate(features).astype(np.float32)
            if features
            else None,
        )
        self.last_timing = {
            "seed": seed,
            "decisions": len(rows["agent"]),
            "episode_s": time.perf_counter() - started,
            "cpu_s": time.process_time() - cpu_started,
            "sumo_s": env.timers["sumo_step_s"] - sumo_before,
        }
        return data, {"seed": seed, **env.last_episode.network}
