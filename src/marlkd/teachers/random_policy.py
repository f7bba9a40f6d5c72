"""Uniformly random choice among the phases a signal may choose now."""

from __future__ import annotations

import numpy as np

from marlkd.envs.traffic.env import AgentSpec
from marlkd.teachers.base import Teacher, TeacherOutput


class RandomController(Teacher):
    """Picks an allowed phase at random; its scores are uniform."""

    name = "random"

    def __init__(self, specs: dict[str, AgentSpec], seed: int | None = None):
        self.specs = specs
        self.rng = np.random.default_rng(seed)

    def act(self, observations, masks, state=None) -> TeacherOutput:
        scores, actions = {}, {}
        for agent in observations:
            allowed = np.flatnonzero(masks[agent])
            scores[agent] = np.zeros(self.specs[agent].num_phases, dtype=np.float32)
            actions[agent] = int(self.rng.choice(allowed))
        return TeacherOutput(scores=scores, actions=actions)
