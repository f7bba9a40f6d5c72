"""Fixed-time control: the network's own signal programs, replayed.

Each signal cycles through its green phases in program order and holds each for
the duration its program gives it. Decisions fall on the environment's grid, so
a green ends at the decision point nearest its programmed end; the yellow is
the environment's. The schedule is read from the observation (current phase and
its green time), so the controller keeps no memory between decisions.
"""

from __future__ import annotations

import numpy as np

from marlkd.envs.traffic.env import AgentSpec
from marlkd.teachers.base import Teacher, TeacherOutput


class FixedTime(Teacher):
    """Replays each signal's programmed green splits and phase order."""

    name = "fixed"

    def __init__(self, specs: dict[str, AgentSpec], delta_time: float):
        self.specs = specs
        self.delta_time = delta_time
        self._slices = {a: s.obs_slices() for a, s in specs.items()}

    def act(self, observations, masks, state=None) -> TeacherOutput:
        scores, actions = {}, {}
        for agent, obs in observations.items():
            spec, sl = self.specs[agent], self._slices[agent]
            phase = int(np.argmax(obs[sl["phase"]]))
            elapsed = float(obs[sl["green_time_s"]][0])
            duration = spec.plan.green_durations[phase]
            # Switch at the decision point closest to the programmed end.
            if elapsed + self.delta_time / 2 < duration:
                action = phase
            else:
                action = (phase + 1) % spec.num_phases
            if not masks[agent][action]:
                action = phase if masks[agent][phase] else int(np.argmax(masks[agent]))
            scores[agent] = np.eye(spec.num_phases, dtype=np.float32)[action]
            actions[agent] = action
        return TeacherOutput(scores=scores, actions=actions)
