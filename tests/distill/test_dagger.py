"""Distillation runs end to end on a one-intersection net, on tiny budgets.

Every teacher (rule-based and a network) × student kind × method runs two
rounds of 300 simulated seconds and three epochs; one run checks that the
student learns MaxPressure; others interrupt a run and resume it.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from marlkd.config import load_config
from marlkd.distill.dagger import distill
from marlkd.distill.dataset import DatasetFolder
from marlkd.distill.trainer import Trainer
from marlkd.envs.traffic.env import TrafficSignalEnv
from marlkd.errors import UserError
from marlkd.rollout.local import LocalCollector
from marlkd.students.checkpoint import load_student
from marlkd.students.policy import StudentPolicy
from marlkd.tracking import read_metrics

TINY = [
    "env.duration=300",
    "collect.iterations=2",
    "collect.episodes_per_iteration=1",
    "collect.beta_final=0.5",
    "train.epochs=3",
]
SAMPLES_PER_ROUND = 300 // 10 - 1  # one signal deciding every 10 s


def cross_config(net, routes, *overrides):
    return load_config(
        None,
        [
            "scenario.name=null",
            f'scenario.net="{net}"',
            f'scenario.routes=["{routes}"]',
            *TINY,
            *overrides,
        ],
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def values(metrics, key):
    return [v for _, v in metrics[key]]


@pytest.fixture(scope="session")
def network_teacher(tmp_path_factory, cross_net, cross_routes):
    """The student checkpoint of an earlier tiny run, to teach the next."""
    run_dir = tmp_path_factory.mktemp("teacher-run")
    distill(cross_config(cross_net, cross_routes), run_dir, progress=False)
    return run_dir / "checkpoints" / "student.pt"


@pytest.fixture
def teacher_spec(request, network_teacher):
    return str(network_teacher) if request.param == "network" else request.param


# ---------------------------------------------------- the tiny-budget matrix
@pytest.mark.parametrize("method", ["bc", "dagger"])
@pytest.mark.parametrize("kind", ["phase", "mlp"])
@pytest.mark.parametrize(
    "teacher_spec", ["max-pressure", "fixed", "network"], indirect=True
)
def test_tiny_run(tmp_path, cross_net, cross_routes, teacher_spec, kind, method):
    config = cross_config(
        cross_net,
        cross_routes,
        f'teacher="{teacher_spec}"',
        f"student.kind={kind}",
        f"collect.method={method}",
    )
    student = distill(config, tmp_path, progress=False)

    # the folder: resolved config, student, dataset, metrics, progress
    assert load_config(tmp_path / "config.yaml") == config
    saved = load_student(tmp_path / "checkpoints" / "student.pt")
    assert saved.kind == kind and same_weights(saved, student)
    folder = DatasetFolder(tmp_path / "dataset")
    meta = folder.read_meta()
    assert meta["teacher"] == teacher_spec and meta["agents"] == ["C"]
    assert folder.rounds() == [0, 1]
    assert json.loads((tmp_path / "progress.json").read_text()) == {
        "rounds_done": 2,
        "global_epoch": 6,
    }

    # every round's samples are labelled by the teacher: its action is allowed
    # and scores best among the allowed ones
    for k in (0, 1):
        data = folder.load_round(k)
        assert len(data) == SAMPLES_PER_ROUND and set(data.round) == {k}
        rows = np.arange(len(data))
        assert data.mask[rows, data.teacher_action].all()
        allowed = np.where(data.mask, data.teacher_scores, -np.inf)
        np.testing.assert_allclose(
            allowed[rows, data.teacher_action], allowed.max(axis=1), rtol=1e-6
        )
        # only a network teacher has features to match
        if teacher_spec.endswith(".pt"):
            assert data.teacher_features.shape == (len(data), saved.feature_dim)
        else:
            assert data.teacher_features is None

    metrics = read_metrics(tmp_path)
    assert values(metrics, "collect/samples") == [SAMPLES_PER_ROUND] * 2
    assert [s for s, _ in metrics["distill/val_loss"]] == [1, 2, 3, 4, 5, 6]
    assert np.isfinite(values(metrics, "distill/val_loss")).all()
    # round 0 is the teacher's; in round 1 dagger hands half the decisions over
    expected = [1.0, 0.5] if method == "dagger" else [1.0, 1.0]
    assert values(metrics, "collect/beta") == expected


def test_dagger_lets_the_student_act_and_bc_does_not(
    tmp_path, cross_net, cross_routes, monkeypatch
):
    calls, executed = [], []
    collect, step = LocalCollector.collect, TrafficSignalEnv.step

    def spy_collect(self, behaviour, beta, seeds, round_index, *args, **kwargs):
        calls.append((round_index, type(behaviour), beta))
        return collect(self, behaviour, beta, seeds, round_index, *args, **kwargs)

    def spy_step(self, actions):
        executed.append(actions["C"])
        return step(self, actions)

    monkeypatch.setattr(LocalCollector, "collect", spy_collect)
    monkeypatch.setattr(TrafficSignalEnv, "step", spy_step)
    taken = {}
    for method in ("bc", "dagger"):
        calls.clear()
        executed.clear()
        config = cross_config(cross_net, cross_routes, f"collect.method={method}")
        distill(config, tmp_path / method, progress=False)
        labels = DatasetFolder(tmp_path / method / "dataset").load_round(1)
        taken[method] = np.array(executed[SAMPLES_PER_ROUND:]) != labels.teacher_action
        if method == "bc":
            assert calls == [(0, type(None), 1.0), (1, type(None), 1.0)]
        else:
            assert calls == [(0, type(None), 1.0), (1, StudentPolicy, 0.5)]

    # bc always takes the teacher's action; dagger sometimes the student's
    assert not taken["bc"].any()
    assert taken["dagger"].any()


def test_student_learns_max_pressure(tmp_path, cross_net, cross_routes):
    config = cross_config(
        cross_net,
        cross_routes,
        "env.duration=600",
        "collect.beta_final=0.0",
        "train.epochs=20",
        "train.batch_size=16",
    )
    distill(config, tmp_path, progress=False)
    agreement = values(read_metrics(tmp_path), "distill/val_agreement")
    assert agreement[-1] > 0.9


# --------------------------------------------------------- feature matching
def test_feature_matching_with_a_network_teacher(
    tmp_path, cross_net, cross_routes, network_teacher
):
    config = cross_config(
        cross_net, cross_routes, f'teacher="{network_teacher}"', "loss.feature=1.0"
    )
    student = distill(config, tmp_path, progress=False)

    # the projection was trained beside the student
    state = torch.load(tmp_path / "checkpoints" / "round.pt", weights_only=True)
    teacher_dim = load_student(network_teacher).feature_dim
    projection = state["loss"]["feature.projection.weight"]
    assert projection.shape == (teacher_dim, student.feature_dim)
    trained = len(list(student.parameters())) + 2  # + projection weight, bias
    assert len(state["optimizer"]["state"]) == trained
    assert np.isfinite(values(read_metrics(tmp_path), "distill/train_loss")).all()


def test_feature_matching_needs_a_network_teacher(tmp_path, cross_net, cross_routes):
    config = cross_config(cross_net, cross_routes, "loss.feature=1.0")
    with pytest.raises(UserError, match="features"):
        distill(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # refused before writing anything


# ------------------------------------------------------------------- resume
@pytest.mark.parametrize("with_features", [False, True], ids=["plain", "features"])
def test_resume_after_an_interrupted_collection(
    tmp_path, cross_net, cross_routes, network_teacher, monkeypatch, with_features
):
    extra = (
        [f'teacher="{network_teacher}"', "loss.feature=1.0"] if with_features else []
    )
    config = cross_config(cross_net, cross_routes, *extra)
    reference = distill(config, tmp_path / "reference", progress=False)

    run = tmp_path / "run"
    collect = LocalCollector.collect
    collected, interrupt_at = [], {1}

    def collect_or_die(self, behaviour, beta, seeds, round_index, *args, **kwargs):
        collected.append(round_index)
        if round_index in interrupt_at:
            raise KeyboardInterrupt
        return collect(self, behaviour, beta, seeds, round_index, *args, **kwargs)

    monkeypatch.setattr(LocalCollector, "collect", collect_or_die)
    with pytest.raises(KeyboardInterrupt):
        distill(config, run, progress=False)
    assert json.loads((run / "progress.json").read_text())["rounds_done"] == 1
    first = run / "dataset" / "round_000.npz"
    assert not (run / "dataset" / "round_001.npz").exists()
    before = (first.read_bytes(), first.stat().st_mtime_ns)

    collected.clear()
    interrupt_at.clear()
    student = distill(config, run, resume=True, progress=False)

    assert collected == [1]  # round 0 is read back, not collected again
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before
    progress = json.loads((run / "progress.json").read_text())
    assert progress == {"rounds_done": 2, "global_epoch": 6}
    metrics = read_metrics(run)
    assert values(metrics, "collect/round") == [0, 1]
    assert [s for s, _ in metrics["distill/val_loss"]] == [1, 2, 3, 4, 5, 6]
    # the resumed run ends where an uninterrupted one does
    assert same_weights(student, reference)


def test_resume_in_the_middle_of_a_round(
    tmp_path, cross_net, cross_routes, monkeypatch, caplog
):
    # small minibatches, so their order matters
    config = cross_config(
        cross_net, cross_routes, "train.epochs=4", "train.batch_size=8"
    )
    reference = distill(config, tmp_path / "reference", progress=False)

    run = tmp_path / "run"
    save = Trainer._save_checkpoint

    def interrupted(self, round_index, epoch, *args):
        save(self, round_index, epoch, *args)
        if (round_index, epoch) == (1, 2):
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(config, run, progress=False)
    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    assert json.loads((run / "progress.json").read_text())["rounds_done"] == 1

    with caplog.at_level(logging.INFO, logger="marlkd"):
        student = distill(config, run, resume=True, progress=False)
    assert "round 1: resuming at epoch 2" in caplog.text
    assert "round 1: reusing" in caplog.text
    metrics = read_metrics(run)
    assert [s for s, _ in metrics["distill/val_loss"]] == list(range(1, 9))
    assert values(metrics, "distill/round") == [0] * 4 + [1] * 4
    assert json.loads((run / "progress.json").read_text())["rounds_done"] == 2
    assert same_weights(student, reference)
