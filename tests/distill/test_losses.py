"""Loss terms against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from marlkd.distill.losses import (
    LOSSES,
    DistillationLoss,
    FeatureMatching,
    ce_loss,
    kl_loss,
    mse_loss,
)
from marlkd.errors import UserError
from marlkd.students import StudentOutput

LN3 = math.log(3)


def t(rows, dtype=torch.float32):
    return torch.tensor(rows, dtype=dtype)


def kl_by_hand(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# ----------------------------------------------------------------------- kl
def test_kl_at_temperature_one():
    # Teacher [0, ln 3]: p = [1, 3] / 4. Student [1, 2]: q = [1, e] / (1 + e).
    p = [0.25, 0.75]
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    loss = kl_loss(t([[1.0, 2.0]]), t([[0.0, LN3]]), t([[True, True]]).bool(), 1.0)
    assert loss.item() == pytest.approx(kl_by_hand(p, q), rel=1e-5)


def test_kl_is_scaled_by_the_square_of_the_temperature():
    # T = 2: teacher [0, ln 3] / 2 = [0, ln sqrt 3], p = [1, sqrt 3] / (1 + sqrt 3);
    # student [1, 2] / 2 = [0.5, 1], q = [1, e^0.5] / (1 + e^0.5); loss = 4 KL.
    r3, e5 = math.sqrt(3), math.exp(0.5)
    p = [1 / (1 + r3), r3 / (1 + r3)]
    q = [1 / (1 + e5), e5 / (1 + e5)]
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = kl_loss(t([[1.0, 2.0]]), t([[0.0, LN3]]), mask, 2.0)
    assert loss.item() == pytest.approx(4 * kl_by_hand(p, q), rel=1e-5)


def test_kl_gradient_keeps_its_size_at_high_temperatures():
    # Without T^2 the gradient would halve twice over from T = 20 to T = 40.
    mask = torch.ones(1, 3, dtype=torch.bool)
    teacher = t([[0.0, 1.0, 3.0]])
    norms = []
    for temperature in (20.0, 40.0):
        student = t([[2.0, 0.0, 1.0]]).requires_grad_()
        kl_loss(student, teacher, mask, temperature).backward()
        norms.append(student.grad.norm().item())
    assert norms[1] / norms[0] == pytest.approx(1.0, abs=0.05)


def test_kl_at_a_sharp_temperature_in_double_precision():
    # T = 0.01 (Rusu et al.): teacher [3, 2.5] -> [300, 250], p1 = e^-50 / (1 +
    # e^-50); student [0.1, 0] -> [10, 0], q1 = e^-10 / (1 + e^-10).
    p1 = math.exp(-50) / (1 + math.exp(-50))
    q1 = math.exp(-10) / (1 + math.exp(-10))
    expected = 1e-4 * kl_by_hand([1 - p1, p1], [1 - q1, q1])
    mask = torch.ones(1, 2, dtype=torch.bool)
    student = t([[0.1, 0.0]], torch.float64)
    loss = kl_loss(student, t([[3.0, 2.5]], torch.float64), mask, 0.01)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("teacher_masked", [1e30, -1e30, math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("student_masked", [50.0, -1e9])
def test_kl_ignores_masked_actions(teacher_masked, student_masked):
    # Same numbers as the T = 1 case plus a third, masked action.
    p = [0.25, 0.75]
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    student = t([[1.0, 2.0, student_masked]]).requires_grad_()
    teacher = t([[0.0, LN3, teacher_masked]])
    mask = t([[True, True, False]]).bool()
    loss = kl_loss(student, teacher, mask, 1.0)
    assert loss.item() == pytest.approx(kl_by_hand(p, q), rel=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert student.grad[0, 2] == 0


def test_kl_is_a_mean_over_the_batch():
    # Row 2 has student == teacher, KL 0; the mean halves row 1's value.
    p = [0.25, 0.75]
    q = [1 / (1 + math.e), math.e / (1 + math.e)]
    mask = torch.ones(2, 2, dtype=torch.bool)
    loss = kl_loss(t([[1.0, 2.0], [0.5, 0.5]]), t([[0.0, LN3], [3.0, 3.0]]), mask)
    assert loss.item() == pytest.approx(kl_by_hand(p, q) / 2, rel=1e-5)


def test_kl_is_zero_when_student_equals_teacher():
    scores = t([[0.3, -1.2, 2.0, 0.0], [5.0, 1.0, -2.0, 0.5]])
    mask = t([[True, True, True, False], [True, False, True, True]]).bool()
    for temperature in (0.01, 1.0, 5.0):
        assert kl_loss(scores, scores, mask, temperature).item() == pytest.approx(
            0.0, abs=1e-6
        )


def test_kl_rejects_a_non_positive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kl_loss(t([[0.0, 1.0]]), t([[0.0, 1.0]]), torch.ones(1, 2).bool(), 0.0)


# ----------------------------------------------------------------------- ce
def test_ce_is_minus_log_softmax_at_the_teacher_action():
    # Row 1: logits [1, 2, 3], action 2, all allowed:
    #   -log(e^3 / (e + e^2 + e^3)).
    # Row 2: same logits, action 1, action 0 masked:
    #   -log(e^2 / (e^2 + e^3)) = log(1 + e).
    e = math.e
    row1 = -math.log(e**3 / (e + e**2 + e**3))
    row2 = math.log(1 + e)
    logits = t([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = t([[True, True, True], [False, True, True]]).bool()
    loss = ce_loss(logits, torch.tensor([2, 1]), mask)
    assert loss.item() == pytest.approx((row1 + row2) / 2, rel=1e-6)


def test_ce_ignores_masked_logits():
    mask = t([[False, True, True]]).bool()
    a = ce_loss(t([[1.0, 2.0, 3.0]]), torch.tensor([1]), mask)
    b = ce_loss(t([[40.0, 2.0, 3.0]]), torch.tensor([1]), mask)
    assert a.item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert a.item() == b.item()


def test_ce_refuses_a_masked_teacher_action():
    with pytest.raises(ValueError, match="not allowed"):
        ce_loss(t([[1.0, 2.0]]), torch.tensor([0]), t([[False, True]]).bool())


# ---------------------------------------------------------------------- mse
def test_mse_averages_over_allowed_entries_only():
    # Row 1: [1, 2, (3)] vs [0, 2, (inf)] -> squares 1, 0 (third masked).
    # Row 2: [0, 0, 0] vs [1, 1, 1] -> squares 1, 1, 1.
    # (1 + 0 + 1 + 1 + 1) / 5 allowed entries = 0.8.
    logits = t([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]).requires_grad_()
    teacher = t([[0.0, 2.0, math.inf], [1.0, 1.0, 1.0]])
    mask = t([[True, True, False], [True, True, True]]).bool()
    loss = mse_loss(logits, teacher, mask)
    assert loss.item() == pytest.approx(0.8, rel=1e-6)
    loss.backward()
    assert logits.grad[0, 2] == 0 and torch.isfinite(logits.grad).all()


def test_mse_is_zero_when_student_equals_teacher():
    scores = t([[0.3, -1.2, 2.0], [5.0, 1.0, -2.0]])
    assert mse_loss(scores, scores, torch.ones(2, 3).bool()).item() == 0.0


# ------------------------------------------------------------------ feature
def test_feature_matching_projects_then_regresses():
    # W = [[1, 0], [0, 1], [1, 1]], c = [0, 0, 1]: h_s = [1, 2] -> [1, 2, 4].
    # Against h_t = [1, 0, 4]: squared errors [0, 4, 0], mean 4 / 3.
    term = FeatureMatching(2, 3)
    with torch.no_grad():
        term.projection.weight.copy_(t([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        term.projection.bias.copy_(t([0.0, 0.0, 1.0]))
    loss = term(t([[1.0, 2.0]]), t([[1.0, 0.0, 4.0]]))
    assert loss.item() == pytest.approx(4 / 3, rel=1e-6)


# ------------------------------------------------------------ combination
def student_output():
    return StudentOutput(
        logits=t([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]).requires_grad_(),
        features=t([[1.0, 2.0], [0.0, 1.0]]),
    )


BATCH = {
    "teacher_scores": t([[0.0, LN3, 0.0], [1.0, 0.0, 2.0]]),
    "teacher_action": torch.tensor([1, 2]),
    "mask": t([[True, True, False], [True, True, True]]).bool(),
}


def test_distillation_loss_weights_the_terms_it_is_asked_for():
    out = student_output()
    loss = DistillationLoss({"kl": 1.0, "ce": 0.5, "mse": 0.0}, temperature=2.0)
    total, terms = loss(out, **BATCH)
    assert set(terms) == {"kl", "ce"}
    kl = kl_loss(out.logits, BATCH["teacher_scores"], BATCH["mask"], 2.0)
    ce = ce_loss(out.logits, BATCH["teacher_action"], BATCH["mask"])
    assert terms["kl"].item() == pytest.approx(kl.item())
    assert total.item() == pytest.approx(kl.item() + 0.5 * ce.item())
    total.backward()
    assert out.logits.grad is not None


def test_feature_term_needs_teacher_features():
    with pytest.raises(UserError, match="the teacher gives no features"):
        DistillationLoss({"kl": 1.0, "feature": 0.1}, student_dim=2, teacher_dim=None)
    loss = DistillationLoss({"feature": 1.0}, student_dim=2, teacher_dim=3)
    assert sum(p.numel() for p in loss.parameters()) == 2 * 3 + 3
    with pytest.raises(UserError, match="set loss weight feature to 0"):
        loss(student_output(), **BATCH)
    total, terms = loss(student_output(), **BATCH, teacher_features=torch.zeros(2, 3))
    assert set(terms) == {"feature"} and total.item() >= 0


@pytest.mark.parametrize(
    ("weights", "match"),
    [
        ({"kd": 1.0}, "unknown loss term kd: choose among kl, ce, mse, feature"),
        ({"kl": 0.0, "ce": 0.0}, "every loss weight is 0"),
        ({"kl": 1.0, "ce": -1.0}, "loss weight ce is below 0"),
    ],
)
def test_distillation_loss_rejects_bad_weights(weights, match):
    with pytest.raises(UserError, match=match):
        DistillationLoss(weights)


def test_registry_names_every_term():
    assert set(LOSSES) == {"kl", "ce", "mse", "feature"}
