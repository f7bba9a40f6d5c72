"""A phase encoder: one small network scores every action of every agent.

Intersections differ in their numbers of lanes and phases, so a network over
the padded observation ties its weights to particular lane positions. This
student instead describes each action a by K features taken linearly from the
observation (``AgentLayout.action_features``, e.g. the queues a phase serves),
and scores every action with the same network:

    f_a    = sum_d (obs_d / scale_d) M[d, a, :]            (K features)
    c      = mean of f_a over the agent's actions           (context)
    h_a    = MLP([f_a, c, e])                               (e: agent embedding)
    logit_a = w . h_a + b

The context c lets a score depend on how a phase compares with the others, and
it is taken over the actions the agent has, not over the ones allowed now, so
that masking a phase does not change the scores of the rest. Because the same
network scores each action and c does not depend on their order, permuting an
agent's actions permutes its logits the same way. The student's features are
the mean of h_a over the agent's actions.

Sharing one encoder across phases, so that a network fits intersections of any
shape, is the idea of FRAP (Zheng et al., 2019, "Learning Phase Competition for
Traffic Signal Control"); this student is a much smaller relative of it.
"""

from __future__ import annotations

import torch
from torch import nn

from marlkd.errors import UserError
from marlkd.students.base import (
    Student,
    StudentOutput,
    check_embedding,
    check_hidden,
    mask_logits,
    mlp,
)
from marlkd.students.layout import AgentLayout


class PhaseStudent(Student):
    """Scores each action from its own features and the agent's mean features.

    Args:
        layout: the agents the student acts for; it must give action features
            (``AgentLayout.from_traffic_specs`` does).
        hidden: widths of the hidden layers of the per-action network.
        shared: must be True; one network serves every agent.
        agent_embedding: width of a learned agent embedding appended to every
            action's input; 0 (the default) keeps the student independent of
            agent identity.
    """

    kind = "phase"

    def __init__(
        self,
        layout: AgentLayout,
        hidden: tuple[int, ...] = (64, 64),
        shared: bool = True,
        agent_embedding: int = 0,
    ):
        if not shared:
            raise NotImplementedError(
                "PhaseStudent has no shared=False: one per-action network serves "
                "every agent; use MLPStudent(shared=False) for a network per agent"
            )
        if not layout.has_action_features:
            raise UserError(
                "the phase student needs per-action features, which this "
                "environment's layout lacks: use student kind 'mlp'"
            )
        hidden = check_hidden(hidden)
        check_embedding(agent_embedding)
        super().__init__(
            layout,
            {
                "hidden": list(hidden),
                "shared": True,
                "agent_embedding": int(agent_embedding),
            },
        )
        self.feature_dim = hidden[-1]
        k = layout.num_action_features
        self.register_buffer(
            "action_map",
            torch.from_numpy(layout.padded_action_features()),
            persistent=False,
        )
        self.embedding = (
            nn.Embedding(layout.num_agents, agent_embedding)
            if agent_embedding > 0
            else None
        )
        self.body = mlp([2 * k + agent_embedding, *hidden])
        self.head = nn.Linear(hidden[-1], 1)

    def action_features(self, obs: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """(B, A_max, K) features of every action; zero on padded actions."""
        return torch.einsum(
            "bd,bdak->bak", self.scaled(obs, agent), self.action_map[agent]
        )

    def forward(
        self,
        obs: torch.Tensor,
        agent: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        f = self.action_features(obs, agent)
        exists = self.action_exists[agent].unsqueeze(-1).to(f.dtype)
        count = exists.sum(dim=1).clamp(min=1.0)

        context = (f * exists).sum(dim=1, keepdim=True) / count.unsqueeze(1)
        parts = [f, context.expand_as(f)]
        if self.embedding is not None:
            e = self.embedding(agent).unsqueeze(1)
            parts.append(e.expand(-1, f.shape[1], -1))
        h = self.body(torch.cat(parts, dim=-1))
        logits = self.head(h).squeeze(-1)

        features = (h * exists).sum(dim=1) / count
        return StudentOutput(mask_logits(logits, self.allowed(agent, mask)), features)
