"""MaxPressure signal control (Varaiya, 2013).

The pressure of a phase is the sum, over the movements it gives green, of the
queue on the movement's incoming lane minus the queue on its outgoing lane:

    pressure(p) = sum_{(i, o) in p} q_i - q_o

Each signal serves the phase of largest pressure among those it may choose now
(minimum and maximum green are enforced through the action mask), keeping its
current phase on a tie.

Ties between other phases go to the one whose movements carry the most
vehicles (the pressure of vehicle counts rather than queues), then to the
lowest phase number.

The teacher's scores say all of this in one number per phase:

    score(p) = pressure(p) + 0.5 [p is current] + 0.2 tanh(count_pressure(p) / 20)

Queues are whole vehicles, so pressures are whole numbers; the two small terms
(at most 0.5 and under 0.2 in size) change no decision but the tie-breaks. A
student that learns the scores learns the whole rule, including not to switch
for nothing.
"""

from __future__ import annotations

import numpy as np

from marlkd.envs.traffic.env import AgentSpec
from marlkd.teachers.base import Teacher, TeacherOutput, masked_argmax

CURRENT_PHASE_BONUS_VEH = 0.5
COUNT_TIE_BREAK_VEH = 0.2


class MaxPressure(Teacher):
    """MaxPressure over the queues in each agent's observation."""

    name = "max-pressure"

    def __init__(self, specs: dict[str, AgentSpec]):
        self.specs = specs
        self._slices = {a: s.obs_slices() for a, s in specs.items()}

    def pressures(self, agent: str, obs: np.ndarray, kind: str = "queue") -> np.ndarray:
        """Per phase: sum over its movements of incoming minus outgoing ``kind``.

        ``kind`` is ``queue`` (halted vehicles) or ``count`` (all vehicles).
        """
        spec, sl = self.specs[agent], self._slices[agent]
        incoming, outgoing = obs[sl[f"in_{kind}_veh"]], obs[sl[f"out_{kind}_veh"]]
        return spec.phase_in @ incoming - spec.phase_out @ outgoing

    def act(self, observations, masks, state=None) -> TeacherOutput:
        scores, actions = {}, {}
        for agent, obs in observations.items():
            current = int(np.argmax(obs[self._slices[agent]["phase"]]))
            tie_break = np.tanh(self.pressures(agent, obs, "count") / 20.0)
            score = self.pressures(agent, obs) + COUNT_TIE_BREAK_VEH * tie_break
            score = score.astype(np.float32)
            score[current] += CURRENT_PHASE_BONUS_VEH
            scores[agent] = score
            actions[agent] = masked_argmax(score, masks[agent], prefer=current)
        return TeacherOutput(scores=scores, actions=actions)
