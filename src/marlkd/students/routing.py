"""A student made of several clients' students, each driving its own signals.

Mutual distillation with the data parted by signals leaves one student per
client, each trained on its own signals' samples and pulled towards its
peers on the rest. The run's student is then all of them together: agent i
is driven by client ``assignment[i]``, the client that trained on it,

    logits_i = z_{assignment[i]}(obs_i, i)

so every signal keeps the network that learnt from it. The clients are of one
kind and size; each sees the whole layout (agent indices are the run's), so a
client can still act for any signal, as it did on the shared states.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from marlkd.errors import UserError
from marlkd.students.base import Student, StudentOutput
from marlkd.students.layout import AgentLayout


class RoutingStudent(Student):
    """Routes each row of a batch to the client that drives its agent.

    Args:
        layout: the agents the student acts for.
        client_kind: the kind of every client's student ("mlp" or "phase").
        client_kwargs: the clients' constructor arguments besides the layout.
        assignment: per agent index, the client that drives it; clients are
            numbered 0 .. max(assignment), and every one drives some agent.
    """

    kind = "routing"

    def __init__(
        self,
        layout: AgentLayout,
        client_kind: str,
        client_kwargs: dict[str, Any],
        assignment: Sequence[int],
    ):
        from marlkd.students.registry import make_student

        assignment = [int(c) for c in assignment]
        if len(assignment) != layout.num_agents:
            raise UserError(
                f"the routing student has {len(assignment)} assignments for "
                f"{layout.num_agents} agents: give one client per agent"
            )
        clients = max(assignment) + 1 if assignment else 0
        if min(assignment, default=0) < 0 or set(assignment) != set(range(clients)):
            raise UserError(
                f"assignment {assignment} leaves a client without agents: number "
                "the clients 0, 1, ... and give each one an agent"
            )
        if client_kind == self.kind:
            raise UserError("a routing student's clients cannot be routing students")
        super().__init__(
            layout,
            {
                "client_kind": client_kind,
                "client_kwargs": dict(client_kwargs),
                "assignment": assignment,
            },
        )
        self.clients = nn.ModuleList(
            make_student(client_kind, layout, **dict(client_kwargs))
            for _ in range(clients)
        )
        self.feature_dim = self.clients[0].feature_dim
        self.register_buffer(
            "client_of", torch.tensor(assignment, dtype=torch.int64), persistent=False
        )

    @classmethod
    def of_clients(
        cls, clients: Sequence[Student], assignment: Sequence[int]
    ) -> RoutingStudent:
        """A routing student holding copies of ``clients``' parameters."""
        first = clients[0]
        routing = cls(first.layout, first.kind, first.config, assignment)
        if len(routing.clients) != len(clients):
            raise UserError(
                f"{len(clients)} clients for an assignment to {len(routing.clients)}"
                ": give one student per client"
            )
        for mine, theirs in zip(routing.clients, clients, strict=True):
            mine.load_state_dict(theirs.state_dict())
        return routing.eval()

    def forward(
        self,
        obs: torch.Tensor,
        agent: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        client = self.client_of[agent]
        logits = obs.new_empty(len(agent), self.layout.max_actions)
        features = obs.new_empty(len(agent), self.feature_dim)
        for k in torch.unique(client).tolist():
            rows = torch.nonzero(client == k).squeeze(1)
            out = self.clients[k](
                obs[rows], agent[rows], None if mask is None else mask[rows]
            )
            logits = logits.index_copy(0, rows, out.logits)
            features = features.index_copy(0, rows, out.features)
        return StudentOutput(logits, features)
