"""Turning per-agent dictionaries into padded arrays and back."""

from __future__ import annotations

import numpy as np


class AgentBatcher:
    """Pads per-agent observations, masks and scores to common sizes.

    Args:
        agents: every agent's name; a name's position is its agent index.
        obs_size: the largest observation size; shorter ones are zero-padded.
        num_actions: the largest action count; padded actions are not allowed.
    """

    def __init__(self, agents: list[str], obs_size: int, num_actions: int):
        self.agents = list(agents)
        self.index = {a: i for i, a in enumerate(self.agents)}
        self.obs_size = obs_size
        self.num_actions = num_actions

    def pad(self, observations: dict, masks: dict, names: list[str] | None = None):
        """Arrays (obs [B, D], agent [B], mask [B, A]) for ``names``."""
        names = list(observations) if names is None else names
        obs = np.zeros((len(names), self.obs_size), dtype=np.float32)
        mask = np.zeros((len(names), self.num_actions), dtype=bool)
        agent = np.empty(len(names), dtype=np.int64)
        for row, name in enumerate(names):
            o, m = observations[name], masks[name]
            obs[row, : len(o)] = o
            mask[row, : len(m)] = np.asarray(m, dtype=bool)
            agent[row] = self.index[name]
        return obs, agent, mask

    def pad_scores(self, scores: dict, names: list[str]) -> np.ndarray:
        out = np.zeros((len(names), self.num_actions), dtype=np.float32)
        for row, name in enumerate(names):
            s = np.asarray(scores[name], dtype=np.float32)
            out[row, : len(s)] = np.where(np.isfinite(s), s, 0.0)
        return out
