"""What every student shares: its batch convention, masking and acting.

A batch holds ``obs`` float32 (B, D_max), each agent's raw observation
zero-padded to the largest observation size of the layout; ``agent`` int64
(B,), the agent index of each row; and ``mask`` bool (B, A_max), the actions
allowed now, False on padded actions. A student maps it to logits (B, A_max)
and a feature vector (B, F) per row.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from marlkd.errors import UserError
from marlkd.students.layout import AgentLayout


class StudentOutput(NamedTuple):
    """A student's answer for a batch.

    Attributes:
        logits: (B, A_max) action logits; masked actions hold ``masked_value``.
        features: (B, F) the student's last hidden representation.
    """

    logits: torch.Tensor
    features: torch.Tensor


def masked_value(dtype: torch.dtype) -> float:
    """The logit given to masked actions: far below any real logit, finite.

    Half the most negative number of ``dtype``, so that subtracting a real
    logit from it cannot overflow to -inf and losses stay free of NaN.
    """
    return torch.finfo(dtype).min / 2


class Student(nn.Module):
    """Base class of students.

    Subclasses define ``forward`` and set ``feature_dim``, the size F of their
    feature vectors.

    Args:
        layout: the agents the student acts for.
        config: the subclass's constructor arguments (besides ``layout``), kept
            so that a checkpoint can rebuild the student.
    """

    kind: str = "student"
    feature_dim: int

    def __init__(self, layout: AgentLayout, config: dict[str, Any]):
        super().__init__()
        self.layout = layout
        self.config = dict(config)
        # Derived from the layout, which checkpoints store: not in state_dict.
        self.register_buffer(
            "inv_scale", torch.from_numpy(layout.inverse_scales()), persistent=False
        )
        self.register_buffer(
            "action_exists",
            torch.from_numpy(layout.action_exists()),
            persistent=False,
        )

    def scaled(self, obs: torch.Tensor, agent: torch.Tensor) -> torch.Tensor:
        """Observations divided by their scale, padded entries set to 0."""
        if obs.shape[-1] != self.layout.max_obs_size:
            raise ValueError(
                f"observations have {obs.shape[-1]} entries; the layout pads "
                f"them to {self.layout.max_obs_size}"
            )
        return obs * self.inv_scale[agent]

    def allowed(self, agent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The mask limited to each agent's own actions; all of them when None."""
        exists = self.action_exists[agent]
        return exists if mask is None else exists & mask.bool()

    def forward(
        self,
        obs: torch.Tensor,
        agent: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> StudentOutput:
        raise NotImplementedError

    @torch.no_grad()
    def act(
        self,
        obs: torch.Tensor,
        agent: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The action of highest logit among the allowed ones, (B,) int64."""
        return self(obs, agent, mask).logits.argmax(dim=-1)

    def num_parameters(self) -> int:
        """The number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def mask_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``logits`` with every action not in ``allowed`` set to ``masked_value``."""
    return logits.masked_fill(~allowed, masked_value(logits.dtype))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, each followed by ReLU."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


def check_embedding(agent_embedding: int) -> None:
    """An agent embedding has a size of 0 (none) or more."""
    if agent_embedding < 0:
        raise UserError(f"agent_embedding is {agent_embedding}: give 0 (none) or more")


def check_hidden(hidden) -> tuple[int, ...]:
    """``hidden`` as a tuple of positive layer widths."""
    hidden = tuple(int(h) for h in hidden)
    if not hidden or min(hidden) < 1:
        raise UserError(
            f"student hidden sizes are {list(hidden)}: give one or more positive"
            " layer widths, e.g. [64, 64]"
        )
    return hidden
