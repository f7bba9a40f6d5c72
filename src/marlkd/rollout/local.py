"""The in-process collector: one simulation in this process.

Each decision, the teacher labels the state every agent is in; the behaviour
policy is the teacher with probability β and the student otherwise, drawn
independently per agent and decision (Ross et al., 2011, DAgger). With β = 1
this is behaviour cloning from the teacher's own rollouts.
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm.auto import tqdm

from marlkd.distill.dataset import Transitions
from marlkd.rollout.batching import AgentBatcher
from marlkd.teachers.base import Teacher

logger = logging.getLogger(__name__)


class LocalCollector:
    """Collects teacher-labelled transitions in this process.

    Args:
        env: the environment, a PettingZoo ``ParallelEnv`` with action masks in
            its infos and ``last_episode`` figures after each episode.
        teacher: labels every visited state.
        batcher: agent names and padded sizes of the dataset.
    """

    def __init__(self, env, teacher: Teacher, batcher: AgentBatcher):
        self.env = env
        self.teacher = teacher
        self.batcher = batcher

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
            rng: draws the teacher-or-student choice.

        Returns:
            The samples and each episode's network figures.
        """
        rng = rng or np.random.default_rng(seeds[0] if seeds else 0)
        parts, episodes = [], []
        for seed in seeds:
            parts.append(
                self._episode(behaviour, beta, seed, round_index, rng, progress)
            )
            episodes.append({"seed": seed, **self.env.last_episode.network})
        return Transitions.concat(parts), episodes

    def _episode(self, behaviour, beta, seed, round_index, rng, progress):
        env, teacher, batcher = self.env, self.teacher, self.batcher
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
        return Transitions(
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
