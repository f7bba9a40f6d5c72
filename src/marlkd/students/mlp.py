"""A multilayer perceptron student, shared by all agents or one per agent.

Shared, it reads each agent's scaled observation padded to the layout's largest
size, next to a learned embedding of the agent's index, and gives logits for
the padded action set; masks remove the actions an agent lacks. Not shared,
every agent has its own network sized to its own observation and actions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from marlkd.students.base import (
    Student,
    StudentOutput,
    check_embedding,
    check_hidden,
    mask_logits,
    masked_value,
    mlp,
)
from marlkd.students.layout import AgentLayout


class MLPStudent(Student):
    """ReLU layers from the observation to the logits.

    Args:
        layout: the agents the student acts for.
        hidden: widths of the hidden layers; the features are the last one.
        shared: one network for every agent (True) or one per agent.
        agent_embedding: width of the learned agent embedding appended to the
            input of the shared network; 0 leaves it out. Unused when not
            shared, since each agent then has its own weights.
    """

    kind = "mlp"

    def __init__(
        self,
        layout: AgentLayout,
        hidden: tuple[int, ...] = (64, 64),
        shared: bool = True,
        agent_embedding: int = 8,
    ):
        hidden = check_hidden(hidden)
        check_embedding(agent_embedding)
        super().__init__(
            layout,
            {
                "hidden": list(hidden),
                "shared": bool(shared),
                "agent_embedding": int(agent_embedding),
            },
        )
        self.shared = bool(shared)
        self.feature_dim = hidden[-1]

        if self.shared:
            self.embedding = (
                nn.Embedding(layout.num_agents, agent_embedding)
                if agent_embedding > 0
                else None
            )
            self.body = mlp([layout.max_obs_size + agent_embedding, *hidden])
            self.head = nn.Linear(hidden[-1], layout.max_actions)
        else:
            self.bodies = nn.ModuleList(
                mlp([a.obs_size, *hidden]) for a in layout.agents
            )
            self.heads = nn.ModuleList(
                nn.Linear(hidden[-1], a.num_actions) for a in layout.agents
            )

    def forward(
        self,
        obs: torch.Tensor,
        agent: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        x = self.scaled(obs, agent)
        allowed = self.allowed(agent, mask)
        if self.shared:
            if self.embedding is not None:
                x = torch.cat([x, self.embedding(agent)], dim=-1)
            features = self.body(x)
            logits = self.head(features)
        else:
            features, logits = self._per_agent(x, agent)
        return StudentOutput(mask_logits(logits, allowed), features)

    def _per_agent(
        self, x: torch.Tensor, agent: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run each agent's own network on its rows of the batch."""
        if agent.numel() == 0:
            return (
                x.new_zeros(0, self.feature_dim),
                x.new_zeros(0, self.layout.max_actions),
            )
        rows, features, logits = [], [], []
        for i in torch.unique(agent).tolist():
            entry = self.layout.agents[i]
            rows.append(torch.nonzero(agent == i).squeeze(1))
            h = self.bodies[i](x[rows[-1], : entry.obs_size])
            pad = self.layout.max_actions - entry.num_actions
            features.append(h)
            logits.append(
                F.pad(self.heads[i](h), (0, pad), value=masked_value(x.dtype))
            )

        # Put the rows back in batch order.
        order = torch.cat(rows)
        features, logits = torch.cat(features), torch.cat(logits)
        return (
            torch.empty_like(features).index_copy(0, order, features),
            torch.empty_like(logits).index_copy(0, order, logits),
        )
