"""MaxPressure signal control (Varaiya, 2013).

The pressure of a phase is the sum, over the movements it gives green, of the
queue on the movement's incoming lane minus the queue on its outgoing lane:

    pressure(p) = sum_{(i, o) in p} q_i - q_o

Each signal serves the phase of largest pressure among those it may choose now
(minimum and maximum green are enforced through the action mask), keeping its
current phase on a tie. The pressures are the teacher's scores.
"""

from __future__ import annotations

import numpy as np

from marlkd.envs.traffic.env import AgentSpec
from marlkd.teachers.base import Teacher, TeacherOutput, masked_argmax


class MaxPressure(Teacher):
    """MaxPressure over the queues in each agent's observation."""

    name = "max-pressure"

    def __init__(self, specs: dict[str, AgentSpec]):
        self.specs = specs
        self._slices = {a: s.obs_slices() for a, s in specs.items()}

    def pressures(self, agent: str, obs: np.ndarray) -> np.ndarray:
        spec, sl = self.specs[agent], self._slices[agent]
        return (
            spec.phase_in @ obs[sl["in_queue_veh"]]
            - spec.phase_out @ obs[sl["out_queue_veh"]]
        )

    def act(self, observations, masks, state=None) -> TeacherOutput:
        scores, actions = {}, {}
        for agent, obs in observations.items():
            scores[agent] = self.pressures(agent, obs).astype(np.float32)
            current = int(np.argmax(obs[self._slices[agent]["phase"]]))
            actions[agent] = masked_argmax(scores[agent], masks[agent], prefer=current)
        return TeacherOutput(scores=scores, actions=actions)
