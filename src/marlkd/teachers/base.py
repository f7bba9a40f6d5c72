"""The one interface every teacher stands behind.

A teacher maps per-agent observations (and the global state when it needs it)
to per-agent action scores, the action it would take and, optionally, feature
vectors. Scores are logits or Q-values for a network and a preference such as
pressure for a rule-based expert, so every teacher can serve as a soft teacher.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass
class TeacherOutput:
    """What a teacher says about one decision of every agent.

    Attributes:
        scores: per agent, one score per action; higher is better.
        actions: per agent, the action the teacher takes.
        features: per agent, an optional feature vector for feature matching.
    """

    scores: dict[str, np.ndarray]
    actions: dict[str, int]
    features: dict[str, np.ndarray] | None = None


class Teacher(ABC):
    """A controller whose decisions a student learns from."""

    name: str = "teacher"
    needs_state: bool = False
    """Whether ``act`` wants the environment's global ``state()``."""
    explores: bool = False
    """Whether ``act`` draws random numbers: a collector then gives each episode
    its own generator through ``reset(rng)``, so the draws repeat wherever the
    episode runs."""

    def reset(self) -> None:  # noqa: B027 - stateless teachers need nothing
        """Forget any per-episode memory; called at every episode start."""

    @abstractmethod
    def act(
        self,
        observations: dict[str, np.ndarray],
        masks: dict[str, np.ndarray],
        state: np.ndarray | None = None,
    ) -> TeacherOutput:
        """Score the actions of every agent in ``observations``."""

    def __call__(self, observations, masks, state=None) -> dict[str, int]:
        return self.act(observations, masks, state).actions


def masked_argmax(
    scores: np.ndarray, mask: np.ndarray, prefer: int | None = None
) -> int:
    """The best allowed action; among ties, ``prefer`` if it is one of them.

    Preferring the current phase on a tie keeps a signal from switching for
    nothing when, say, every approach is empty.
    """
    allowed = np.asarray(mask, dtype=bool)
    masked = np.where(allowed, scores, -np.inf)
    best = masked.max()
    ties = np.flatnonzero(masked >= best - 1e-9 * max(1.0, abs(best)))
    if prefer is not None and prefer in ties:
        return int(prefer)
    return int(ties[0])
