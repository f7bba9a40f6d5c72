"""Loss terms that pull a student towards its teacher, and their weighted sum.

Every term takes the student's logits z_s (B, A), what the teacher said and the
mask m (B, A) of allowed actions, and returns a mean over the batch. Actions
outside the mask contribute nothing and are left out of every softmax, so the
teacher's scores there may be anything, -inf and NaN included.

    kl       T^2 KL(softmax(z_t / T) || softmax(z_s / T))      Hinton et al. 2015
    ce       -log softmax(z_s)[a_t]                            behaviour cloning
    mse      mean over allowed (b, a) of (z_s - z_t)^2         Q-value regression
    feature  mean of (W h_s + c - h_t)^2                       Romero et al. 2015

Here z_t are the teacher's scores (logits, Q-values or, for MaxPressure,
pressures), a_t its action, h_s and h_t the student's and teacher's features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from marlkd.errors import UserError

LOSS_NAMES = ("kl", "ce", "mse", "feature")


def _masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with disallowed entries replaced by a finite, very low value.

    Finite, not -inf: a masked entry then has probability exactly 0 and a log
    probability that is large but finite, so 0 * log p stays 0 instead of NaN.
    """
    return x.masked_fill(~mask, torch.finfo(x.dtype).min / 2)


def kl_loss(
    student_logits: torch.Tensor,
    teacher_scores: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Distillation with softened targets (Hinton et al., 2015).

    With p = softmax(z_t / T) and q = softmax(z_s / T), both over the allowed
    actions only:

        loss = T^2 * mean_b sum_a p_a (log p_a - log q_a)

    The gradient of the KL with respect to z_s is (q - p) / T. For T large
    against the spread of the logits, q - p shrinks like 1 / T, so the gradient
    falls like 1 / T^2; the T^2 factor undoes this and keeps gradients about the
    same size across temperatures, as Hinton et al. intend. For T < 1 the factor
    shrinks the term instead, e.g. by 1e-4 at T = 0.01, the sharpening
    temperature Rusu et al. (2016, "Policy Distillation") found best for
    distilling DQN Q-values; give the term a larger weight there when it is
    combined with others.

    Args:
        student_logits: (B, A) student logits.
        teacher_scores: (B, A) teacher logits, Q-values or other scores.
        mask: (B, A) bool, allowed actions.
        temperature: T > 0.

    Returns:
        The scalar loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature is {temperature}: it must be above 0")
    mask = mask.bool()
    teacher = _masked(teacher_scores.to(student_logits.dtype) / temperature, mask)
    student = _masked(student_logits / temperature, mask)
    log_p = F.log_softmax(teacher, dim=-1)
    log_q = F.log_softmax(student, dim=-1)
    terms = torch.where(mask, log_p.exp() * (log_p - log_q), 0.0)
    return terms.sum(dim=-1).mean() * temperature**2


def ce_loss(
    student_logits: torch.Tensor, teacher_action: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy on the teacher's action: behaviour cloning.

        loss = -mean_b log softmax(z_s)[a_t]

    with the softmax over the allowed actions only.

    Args:
        student_logits: (B, A) student logits.
        teacher_action: (B,) int64, the teacher's actions; each must be allowed.
        mask: (B, A) bool, allowed actions.

    Returns:
        The scalar loss.
    """
    mask = mask.bool()
    action = teacher_action.long().unsqueeze(-1)
    if not bool(mask.gather(-1, action).all()):
        raise ValueError("a teacher action is not allowed by its mask")
    log_q = F.log_softmax(_masked(student_logits, mask), dim=-1)
    return -log_q.gather(-1, action).mean()


def mse_loss(
    student_logits: torch.Tensor, teacher_scores: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Squared error between student logits and teacher scores.

        loss = sum_{b, a allowed} (z_s - z_t)^2 / #allowed (b, a)

    The regression of Q-values used by Rusu et al. (2016) as their MSE
    baseline; it asks the student to match the scores' scale, not only their
    order.

    Args:
        student_logits: (B, A) student logits.
        teacher_scores: (B, A) teacher scores.
        mask: (B, A) bool, allowed actions.

    Returns:
        The scalar loss; 0 when no action is allowed.
    """
    mask = mask.bool()
    student = student_logits.masked_fill(~mask, 0.0)
    teacher = teacher_scores.to(student_logits.dtype).masked_fill(~mask, 0.0)
    return (student - teacher).square().sum() / mask.sum().clamp(min=1)


class FeatureMatching(nn.Module):
    """Hint learning: regress the teacher's features from the student's.

    A learned linear map W h_s + c brings the student's features to the size of
    the teacher's (FitNets, Romero et al., 2015):

        loss = mean over batch and entries of (W h_s + c - h_t)^2

    Args:
        student_dim: size of the student's features.
        teacher_dim: size of the teacher's features.
    """

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.projection = nn.Linear(student_dim, teacher_dim)

    def forward(
        self, student_features: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        projected = self.projection(student_features)
        return F.mse_loss(projected, teacher_features.to(projected.dtype))


LOSSES: dict[str, Callable[..., torch.Tensor] | type[nn.Module]] = {
    "kl": kl_loss,
    "ce": ce_loss,
    "mse": mse_loss,
    "feature": FeatureMatching,
}
"""Each loss term by name; ``feature`` is a module, the others functions."""

NO_TEACHER_FEATURES = (
    "the teacher gives no features: set loss weight feature to 0 or use a "
    "network teacher"
)


class DistillationLoss(nn.Module):
    """The weighted sum of the loss terms a run asks for.

    Only terms of non-zero weight are computed. The module holds the feature
    projection when the feature term is on, so its parameters belong in the
    optimizer next to the student's.

    Args:
        weights: weight of each term by name, e.g. ``{"kl": 1.0, "ce": 0.0,
            "mse": 0.0, "feature": 0.0}``.
        temperature: T of the kl term.
        student_dim: size of the student's features; needed for ``feature``.
        teacher_dim: size of the teacher's features; None when the teacher
            gives none.

    Raises:
        UserError: an unknown or negative weight, all weights 0, or a feature
            weight with a teacher that gives no features.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        temperature: float = 1.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ):
        super().__init__()
        unknown = sorted(set(weights) - set(LOSS_NAMES))
        if unknown:
            raise UserError(
                f"unknown loss term {', '.join(unknown)}: choose among "
                f"{', '.join(LOSS_NAMES)}"
            )
        negative = [name for name, w in weights.items() if w < 0]
        if negative:
            raise UserError(
                f"loss weight {', '.join(negative)} is below 0: give 0 or more"
            )
        self.weights = {name: float(w) for name, w in weights.items() if w != 0}
        if not self.weights:
            raise UserError(
                "every loss weight is 0: give at least one of "
                f"{', '.join(LOSS_NAMES)} a positive weight"
            )
        if temperature <= 0:
            raise UserError(f"loss temperature is {temperature}: set it above 0")
        self.temperature = float(temperature)

        self.feature = None
        if "feature" in self.weights:
            if teacher_dim is None:
                raise UserError(NO_TEACHER_FEATURES)
            if student_dim is None:
                raise ValueError("the feature term needs the student's feature size")
            self.feature = FeatureMatching(student_dim, teacher_dim)

    def forward(
        self,
        student,
        *,
        mask: torch.Tensor,
        teacher_scores: torch.Tensor | None = None,
        teacher_action: torch.Tensor | None = None,
        teacher_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and each term's unweighted value.

        Args:
            student: a ``StudentOutput`` (logits and features).
            mask: (B, A) bool, allowed actions.
            teacher_scores: (B, A) the teacher's scores; needed by kl and mse.
            teacher_action: (B,) the teacher's actions; needed by ce.
            teacher_features: (B, F_t) the teacher's features; needed by
                feature.

        Returns:
            The weighted sum, and per term name its value, detached, to log
            as ``distill/loss_<name>``.
        """
        logits = student.logits
        values = {}
        for name in self.weights:
            if name == "kl":
                values[name] = kl_loss(
                    logits, _need(teacher_scores, name), mask, self.temperature
                )
            elif name == "ce":
                values[name] = ce_loss(logits, _need(teacher_action, name), mask)
            elif name == "mse":
                values[name] = mse_loss(logits, _need(teacher_scores, name), mask)
            else:
                if teacher_features is None:
                    raise UserError(NO_TEACHER_FEATURES)
                values[name] = self.feature(student.features, teacher_features)

        total = sum(self.weights[name] * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}


def _need(value: torch.Tensor | None, term: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"the {term} loss term needs the teacher's outputs")
    return value
