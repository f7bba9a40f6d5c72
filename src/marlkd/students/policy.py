"""A trained student acting as the controller of every agent."""

from __future__ import annotations

import numpy as np
import torch

from marlkd.rollout.batching import AgentBatcher
from marlkd.teachers.base import Teacher, TeacherOutput


class StudentPolicy(Teacher):
    """Runs a student network for all agents in one batched forward pass.

    It is a ``Teacher`` too, so a trained student can teach the next one: its
    scores are its logits and its features the network's feature vector.

    Args:
        student: the network, ``forward(obs, agent, mask) -> (logits, features)``.
        batcher: how agent names map to indices and padded sizes.
    """

    name = "student"

    def __init__(self, student: torch.nn.Module, batcher: AgentBatcher):
        self.student = student
        self.batcher = batcher

    @torch.no_grad()
    def act(self, observations, masks, state=None) -> TeacherOutput:
        names = list(observations)
        obs, agent, mask = self.batcher.pad(observations, masks, names)
        self.student.eval()
        out = self.student(
            torch.from_numpy(obs), torch.from_numpy(agent), torch.from_numpy(mask)
        )
        logits = out.logits.numpy()
        features = out.features.numpy()
        actions = np.where(mask, logits, -np.inf).argmax(axis=1)
        sizes = {n: len(masks[n]) for n in names}
        return TeacherOutput(
            scores={n: logits[i, : sizes[n]] for i, n in enumerate(names)},
            actions={n: int(actions[i]) for i, n in enumerate(names)},
            features={n: features[i] for i, n in enumerate(names)},
        )
