"""The exploring behaviour policies of RL, as collectors run them.

Both act for every agent with one batched forward pass of a marlkd student
network, and draw their random numbers from the generator a collector gives
each episode (``reset(rng)``), so an episode's actions depend on its seed and
the weights alone, whichever process runs it:

    EpsilonGreedy   DQN: the allowed action of highest Q-value, or with
                    probability ε a uniformly drawn allowed action
    Sampling        PPO: an action drawn from softmax(z) over the allowed ones
"""

from __future__ import annotations

import numpy as np
import torch

from marlkd.rollout.batching import AgentBatcher
from marlkd.teachers.base import Teacher, TeacherOutput


class _NetworkBehaviour(Teacher):
    """A policy over a network's scores of every agent's actions."""

    explores = True

    def __init__(self, student: torch.nn.Module, batcher: AgentBatcher):
        self.student = student  # the name the Ray collector ships weights by
        self.batcher = batcher
        self.rng = np.random.default_rng(0)

    def reset(self, rng: np.random.Generator | None = None) -> None:
        if rng is not None:
            self.rng = rng

    @torch.no_grad()
    def act(self, observations, masks, state=None) -> TeacherOutput:
        names = list(observations)
        obs, agent, mask = self.batcher.pad(observations, masks, names)
        self.student.eval()
        logits = self.student(
            torch.from_numpy(obs), torch.from_numpy(agent), torch.from_numpy(mask)
        ).logits.numpy()
        actions = self.choose(logits, mask)
        return TeacherOutput(
            scores={n: logits[i, : len(masks[n])] for i, n in enumerate(names)},
            actions={n: int(actions[i]) for i, n in enumerate(names)},
        )

    def choose(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class EpsilonGreedy(_NetworkBehaviour):
    """Greedy on the Q-values, a uniform allowed action with probability ε."""

    name = "epsilon-greedy"

    def __init__(self, student, batcher: AgentBatcher, epsilon: float):
        super().__init__(student, batcher)
        self.epsilon = epsilon

    def choose(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        actions = np.where(mask, logits, -np.inf).argmax(axis=1)
        explore = self.rng.random(len(actions)) < self.epsilon
        for row in np.flatnonzero(explore):
            actions[row] = self.rng.choice(np.flatnonzero(mask[row]))
        return actions


class Sampling(_NetworkBehaviour):
    """An action drawn from the softmax of the logits over the allowed actions."""

    name = "sampling"

    def choose(self, logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
        z = np.where(mask, logits.astype(np.float64), -np.inf)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        cdf = np.cumsum(p, axis=1)
        u = self.rng.random(len(z)) * cdf[:, -1]
        actions = (cdf <= u[:, None]).sum(axis=1)
        # rounding can carry u past the last allowed action: take that action
        last_allowed = mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        return np.minimum(actions, last_allowed)
