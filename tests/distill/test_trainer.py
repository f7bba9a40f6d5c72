"""The trainer: agreement, its epoch checkpoint and resuming from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marlkd.config import TrainConfig
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.distill.trainer import Trainer, agreement
from marlkd.students import AgentLayout, make_student
from marlkd.tracking import MetricWriter, read_metrics

LAYOUT = AgentLayout.from_sizes([5, 5], [3, 3])


def teacher_data(n: int = 120, seed: int = 0) -> Transitions:
    """Scores linear in the observation, so there is something to learn."""
    rng = np.random.default_rng(seed)
    obs = rng.normal(size=(n, 5)).astype(np.float32)
    scores = (obs @ rng.normal(size=(5, 3))).astype(np.float32)
    mask = np.ones((n, 3), dtype=bool)
    mask[::4, 2] = False
    return Transitions(
        obs=obs,
        agent=rng.integers(0, 2, n).astype(np.int64),
        mask=mask,
        teacher_scores=scores,
        teacher_action=np.where(mask, scores, -np.inf).argmax(axis=1),
        round=np.zeros(n, dtype=np.int32),
        teacher_features=rng.normal(size=(n, 4)).astype(np.float32),
    )


def new_trainer(path, *, epochs, writer=None, feature=0.0, student=None):
    torch.manual_seed(0)
    student = student or make_student("mlp", LAYOUT, hidden=(16,))
    loss = DistillationLoss(
        {"kl": 1.0, "feature": feature}, student_dim=student.feature_dim, teacher_dim=4
    )
    config = TrainConfig(epochs=epochs, batch_size=16, patience=100, lr=1e-2)
    return Trainer(student, loss, config, path, writer)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------- agreement
def test_agreement_counts_ties_and_ignores_disallowed_actions():
    logits = torch.tensor(
        [
            [0.0, 2.0, 1.0],  # picks 1, teacher's best is 1
            [0.0, 2.0, 1.0],  # picks 1, tied with 2 at the teacher's best
            [0.0, 2.0, 1.0],  # picks 1, teacher prefers 0
            [9.0, 2.0, 1.0],  # 0 is not allowed: picks 1, the teacher's best
            [0.0, 2.0, 1.0],  # the teacher's higher score on 2 is not allowed
            [0.0, 2.0, 1.0],  # picks 1, 1e-9 below 1000.0 counts as a tie
        ]
    )
    scores = torch.tensor(
        [
            [0.0, 5.0, 1.0],
            [0.0, 3.0, 3.0],
            [4.0, 3.0, 3.0],
            [7.0, 3.0, 1.0],
            [0.0, 3.0, 8.0],
            [0.0, 1000.0 - 1e-9, 1000.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [
            [True, True, True],
            [True, True, True],
            [True, True, True],
            [False, True, True],
            [True, True, False],
            [True, True, True],
        ]
    )
    got = agreement(logits.double(), scores, mask)
    assert got.tolist() == [1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------- checkpoint
def test_checkpoint_loads_with_weights_only(tmp_path):
    trainer = new_trainer(tmp_path / "round.pt", epochs=2, feature=0.5)
    result = trainer.fit(teacher_data(), 0, progress=False)
    assert result.epochs == 2

    state = torch.load(tmp_path / "round.pt", weights_only=True)
    assert (state["round"], state["epoch"], state["global_epoch"]) == (0, 2, 2)
    assert state["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert "feature.projection.weight" in state["loss"]
    fresh = make_student("mlp", LAYOUT, hidden=(16,))
    fresh.load_state_dict(state["best_student"])
    assert same_weights(fresh, trainer.student)  # the best epoch is kept


def test_resumed_round_continues_at_the_saved_epoch(tmp_path):
    data = teacher_data()
    reference = new_trainer(tmp_path / "ref.pt", epochs=5)
    reference.fit(data, 0, progress=False)

    # epochs 1-2, then the process "dies"; a new one resumes with the same run
    new_trainer(tmp_path / "round.pt", epochs=2).fit(data, 0, progress=False)
    writer = MetricWriter(tmp_path / "run", tensorboard=False)
    resumed = new_trainer(tmp_path / "round.pt", epochs=5, writer=writer)
    result = resumed.fit(data, 0, progress=False)
    writer.close()

    assert result.epochs == 5 and resumed.global_epoch == 5
    steps = [step for step, _ in read_metrics(tmp_path / "run")["distill/val_loss"]]
    assert steps == [3, 4, 5]
    assert torch.load(tmp_path / "round.pt", weights_only=True)["epoch"] == 5
    # same minibatches, same optimiser state: the path of an uninterrupted round
    assert same_weights(resumed.student, reference.student)


def test_next_round_keeps_the_loss_parameters_of_the_last(tmp_path):
    data = teacher_data()
    reference = new_trainer(tmp_path / "ref.pt", epochs=3, feature=1.0)
    reference.fit(data, 0, progress=False)
    reference.fit(data, 1, progress=False)

    first = new_trainer(tmp_path / "round.pt", epochs=3, feature=1.0)
    first.fit(data, 0, progress=False)
    # a new process: the student from student.pt, everything else rebuilt
    student = make_student("mlp", LAYOUT, hidden=(16,))
    student.load_state_dict(first.student.state_dict())
    second = new_trainer(tmp_path / "round.pt", epochs=3, feature=1.0, student=student)
    second.global_epoch = first.global_epoch
    second.fit(data, 1, progress=False)

    assert same_weights(second.loss, reference.loss)
    assert same_weights(second.student, reference.student)


def test_finished_round_checkpoint_does_not_resume_the_next(tmp_path):
    data = teacher_data()
    trainer = new_trainer(tmp_path / "round.pt", epochs=2)
    trainer.fit(data, 0, progress=False)
    result = trainer.fit(data, 1, progress=False)
    assert result.epochs == 2 and trainer.global_epoch == 4
    state = torch.load(tmp_path / "round.pt", weights_only=True)
    assert (state["round"], state["epoch"]) == (1, 2)
