"""Students that learn together: averaging, mutual distillation, resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from marlkd.config import TrainConfig
from marlkd.distill.cooperative import (
    Client,
    CooperativeConfig,
    average_states,
    learn_together,
    mutual_loss,
)
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.errors import UserError
from marlkd.students import AgentLayout, make_student
from marlkd.students.checkpoint import student_state

LAYOUT = AgentLayout.from_sizes([5, 5, 5], [3, 3, 3])
LOSS = DistillationLoss({"kl": 1.0})
SHARED = ("obs", "agent", "mask")


def teacher_data(n: int, seed: int, agents=(0, 1, 2)) -> Transitions:
    """Scores linear in the observation, the same map for every sample."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(99).normal(size=(5, 3))
    obs = rng.normal(size=(n, 5)).astype(np.float32)
    scores = (obs @ w).astype(np.float32)
    mask = np.ones((n, 3), dtype=bool)
    mask[::4, 2] = False
    return Transitions(
        obs=obs,
        agent=rng.choice(np.asarray(agents), n).astype(np.int64),
        mask=mask,
        teacher_scores=scores,
        teacher_action=np.where(mask, scores, -np.inf).argmax(axis=1),
        round=np.zeros(n, dtype=np.int32),
    )


def student():
    torch.manual_seed(0)
    return make_student("mlp", LAYOUT, hidden=(16,))


def config(method="fedavg", rounds=3, batch_size=16, **kwargs) -> CooperativeConfig:
    train = TrainConfig(batch_size=batch_size, lr=1e-2, seed=3)
    return CooperativeConfig(method, rounds, 2, train=train, **kwargs)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------- averaging
def test_averaging_is_weighted_by_samples_and_copies_counters():
    a = {"w": torch.zeros(2), "n": torch.tensor(4)}
    b = {"w": torch.ones(2), "n": torch.tensor(4)}
    out = average_states([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.full((2,), 0.75))
    assert out["w"].dtype == torch.float32 and int(out["n"]) == 4
    with pytest.raises(ValueError, match="differs"):
        average_states([a, {**b, "n": torch.tensor(5)}], [1, 1])


def test_fedavg_of_identical_clients_is_the_single_model():
    # one minibatch per epoch: the clients' orders differ only within it, which
    # changes the loss's sums in their last bits
    data = teacher_data(40, seed=0)
    cfg = config(batch_size=64)
    one = learn_together(student(), [data], LOSS, cfg, progress=False)
    three = learn_together(student(), [data] * 3, LOSS, cfg, progress=False)
    assert not same(one.shared.state_dict(), student().state_dict())
    for s in three.students:
        torch.testing.assert_close(
            s.state_dict(), one.shared.state_dict(), rtol=1e-5, atol=1e-6
        )


def test_a_fedavg_round_is_the_sample_weighted_mean_of_the_clients():
    parts = [teacher_data(30, seed=1), teacher_data(90, seed=2)]
    cfg = config(rounds=1)
    initial = student_state(student())
    states = [
        Client(k, initial, p, LOSS, cfg).train_round(0, initial["state_dict"])[0]
        for k, p in enumerate(parts)
    ]
    result = learn_together(student(), parts, LOSS, cfg, progress=False)

    weighted = average_states(states, [30, 90])
    assert same(result.shared.state_dict(), weighted)
    assert not same(weighted, average_states(states, [1, 1]))
    assert all(same(s.state_dict(), weighted) for s in result.students)


# ------------------------------------------------------- mutual distillation
def test_mutual_loss_by_hand():
    student_logits = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    # the third action is not allowed: its peer logits do not count
    peer_a = torch.tensor([[math.log(3.0), 0.0, 50.0]])
    peer_b = torch.tensor([[0.0, 0.0, -50.0]])
    value = mutual_loss(student_logits, [peer_a, peer_b], mask)
    # p_a = (3/4, 1/4), q = (1/2, 1/2); p_b = q contributes 0
    expected = 0.5 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert float(value) == pytest.approx(expected, rel=1e-6)

    # T = 2 softens the peers and scales by T^2
    value_t = mutual_loss(student_logits, [peer_a], mask, temperature=2.0)
    p = np.array([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    expected_t = 4 * float(np.sum(p * np.log(p / 0.5)))
    assert float(value_t) == pytest.approx(expected_t, rel=1e-6)

    assert float(mutual_loss(peer_a, [peer_a.clone()], mask)) == pytest.approx(0)
    assert float(mutual_loss(student_logits, [], mask)) == 0.0


def test_mutual_loss_pulls_the_student_towards_its_peers_only():
    torch.manual_seed(0)
    mask = torch.ones(8, 3, dtype=torch.bool)
    mine = torch.zeros(8, 3, requires_grad=True)
    peer = torch.randn(8, 3, requires_grad=True)
    before = float(mutual_loss(mine, [peer], mask).detach())
    optimizer = torch.optim.SGD([mine], lr=8.0)  # the loss is a mean over 8 rows
    for _ in range(100):
        optimizer.zero_grad()
        mutual_loss(mine, [peer], mask).backward()
        optimizer.step()
    assert float(mutual_loss(mine, [peer], mask).detach()) < 0.01 * before
    assert peer.grad is None  # the peer's logits are targets
    torch.testing.assert_close(
        mine.softmax(-1), peer.detach().softmax(-1), atol=0.02, rtol=0
    )


def disagreement(result, parts) -> float:
    obs = torch.from_numpy(np.concatenate([p.obs for p in parts]))
    agent = torch.from_numpy(np.concatenate([p.agent for p in parts]))
    mask = torch.from_numpy(np.concatenate([p.mask for p in parts]))
    with torch.no_grad():
        a, b = (s(obs, agent, mask).logits for s in result.students)
    return float(mutual_loss(a, [b], mask))


def test_mutual_distillation_brings_the_clients_together():
    # each client sees other signals: alone they disagree on the others'
    parts = [teacher_data(60, seed=1, agents=(0,)), teacher_data(60, 2, (1, 2))]
    alone = learn_together(
        student(), parts, LOSS, config("mutual", mutual_weight=0.0), progress=False
    )
    mutual = learn_together(
        student(), parts, LOSS, config("mutual", mutual_weight=2.0), progress=False
    )

    # with weight 0 each client trains exactly as it would alone
    cfg = config("mutual", mutual_weight=0.0)
    initial = student_state(student())
    shared = {k: np.concatenate([getattr(p, k) for p in parts]) for k in SHARED}
    lone = Client(1, initial, parts[1], LOSS, cfg, shared)
    state = initial["state_dict"]
    for r in range(cfg.rounds):
        state = lone.train_round(r, state)[0]
    assert same(alone.students[1].state_dict(), state)

    assert mutual.history[0]["distill/mutual_loss"] == 0.0  # no peers in round 0
    assert all(row["distill/mutual_loss"] > 0 for row in mutual.history[1:])
    assert disagreement(mutual, parts) < 0.5 * disagreement(alone, parts)


# -------------------------------------------------------- resuming, settings
@pytest.mark.parametrize("method", ["fedavg", "mutual"])
def test_a_resumed_run_ends_with_the_students_of_an_unbroken_one(tmp_path, method):
    parts = [teacher_data(30, seed=1), teacher_data(50, seed=2)]
    whole = learn_together(student(), parts, LOSS, config(method), progress=False)

    path = tmp_path / "together.pt"
    learn_together(
        student(), parts, LOSS, config(method, rounds=2), checkpoint=path,
        progress=False,
    )  # fmt: skip
    resumed = learn_together(
        student(), parts, LOSS, config(method), checkpoint=path, progress=False
    )
    for a, b in zip(whole.students, resumed.students, strict=True):
        assert same(a.state_dict(), b.state_dict())
    assert [r["round"] for r in resumed.history] == [0, 1, 2]

    with pytest.raises(UserError, match="other settings or data"):
        learn_together(
            student(), parts[:1], LOSS, config(method), checkpoint=path,
            progress=False,
        )  # fmt: skip


def test_unsupported_settings_say_so():
    with pytest.raises(UserError, match="fedavg or mutual"):
        CooperativeConfig("ensemble")
    feature = DistillationLoss(
        {"kl": 1.0, "feature": 1.0}, student_dim=16, teacher_dim=4
    )
    with pytest.raises(NotImplementedError, match="feature"):
        learn_together(student(), [teacher_data(10, 0)], feature, config())
    empty = teacher_data(10, 0).subset(np.array([], dtype=np.int64))
    with pytest.raises(UserError, match="needs samples"):
        learn_together(student(), [teacher_data(10, 0), empty], LOSS, config())
