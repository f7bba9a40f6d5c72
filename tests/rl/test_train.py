"""train-teacher --resume: an interrupted run ends as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch

from marlkd.cli import main
from marlkd.rl import dqn, ppo
from marlkd.tracking import read_metrics

PPO = ["--set", "algorithm=ppo", "--set", "ppo.episodes=4",
       "--set", "ppo.episodes_per_update=1", "--set", "ppo.minibatch_size=64",
       "--set", "ppo.update_epochs=2", "--set", "ppo.eval_every=2"]  # fmt: skip
CENTRAL = ["--scenario", "grid2x2", "--duration", "120",
           "--set", "observe=neighbours", "--set", "rl.episodes=2",
           "--set", "rl.learning_starts=20", "--set", "rl.batch_size=16",
           "--set", "rl.eval_every=1"]  # fmt: skip


@pytest.fixture
def cross(cross_net, cross_routes) -> list[str]:
    return ["--net", str(cross_net), "--routes", str(cross_routes),
            "--duration", "300"]  # fmt: skip


def train_teacher(*args) -> int:
    small = ["--set", "eval.episodes=1", "--set", "eval.controllers=[teacher]",
             "--set", "network.hidden=[32, 32]"]  # fmt: skip
    return main(["--log-level", "WARNING", "train-teacher", *map(str, args), *small])


def stop_after(monkeypatch, module, saves: int) -> None:
    """Interrupt training (Ctrl-C) right after its ``saves``-th training state."""
    save, written = module._save_state, []

    def save_then_stop(*args, **kwargs):
        save(*args, **kwargs)
        written.append(True)
        if len(written) == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "_save_state", save_then_stop)


def assert_same_run(a, b) -> None:
    """The same curve, and the same trained network, in run folders a and b.

    Every episode was trained once: a resume that started over would end the
    same, but would log the first episodes twice.
    """
    episodes = [[v for _, v in read_metrics(run)["rl/episode"]] for run in (a, b)]
    assert episodes[0] == episodes[1]
    curve = json.loads((a / "rl_curve.json").read_text())
    assert curve and curve == json.loads((b / "rl_curve.json").read_text())
    weights = [
        torch.load(run / "checkpoints" / "student.pt", weights_only=True)
        for run in (a, b)
    ]
    for key, value in weights[0]["state_dict"].items():
        assert torch.equal(value, weights[1]["state_dict"][key]), key


def set_in_config(run, old: str, new: str) -> None:
    config = run / "config.yaml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def assert_one_line_error(capsys, code: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("marlkd: error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("critic", ["local", "central"])
def test_an_interrupted_ppo_teacher_resumes_to_the_same_network(
    tmp_path, monkeypatch, cross, critic
):
    flags = [*cross, *PPO, "--set", f"ppo.critic={critic}"]
    assert train_teacher(*flags, "--out", tmp_path / "whole") == 0

    with monkeypatch.context() as patch:
        stop_after(patch, ppo, 2)
        assert train_teacher(*flags, "--out", tmp_path / "run") == 130
    assert not (tmp_path / "run" / "rl_curve.json").exists()
    assert train_teacher("--resume", "--out", tmp_path / "run") == 0
    assert_same_run(tmp_path / "whole", tmp_path / "run")


def test_an_interrupted_central_teacher_resumes_to_the_same_network(
    tmp_path, monkeypatch
):
    assert train_teacher(*CENTRAL, "--out", tmp_path / "whole") == 0

    with monkeypatch.context() as patch:
        stop_after(patch, dqn, 1)
        assert train_teacher(*CENTRAL, "--out", tmp_path / "run") == 130
    assert train_teacher("--resume", "--out", tmp_path / "run") == 0
    assert_same_run(tmp_path / "whole", tmp_path / "run")


def test_a_training_state_that_does_not_fit_the_config_is_refused(
    tmp_path, monkeypatch, capsys, cross
):
    ppo_run, central_run = tmp_path / "ppo", tmp_path / "central"
    with monkeypatch.context() as patch:
        stop_after(patch, ppo, 1)
        assert train_teacher(*cross, *PPO, "--out", ppo_run) == 130
    with monkeypatch.context() as patch:
        stop_after(patch, dqn, 1)
        assert train_teacher(*CENTRAL, "--out", central_run) == 130
    capsys.readouterr()

    set_in_config(ppo_run, "algorithm: ppo", "algorithm: dqn")
    code = train_teacher("--resume", "--out", ppo_run)
    assert_one_line_error(capsys, code, "from a PPO run", "delete it")
    set_in_config(ppo_run, "algorithm: dqn", "algorithm: ppo")
    set_in_config(ppo_run, "critic: local", "critic: central")
    code = train_teacher("--resume", "--out", ppo_run)
    assert_one_line_error(capsys, code, "ppo.critic: local")

    set_in_config(central_run, "neighbours: 4", "neighbours: 1")
    code = train_teacher("--resume", "--out", central_run)
    assert_one_line_error(capsys, code, "does not fit", "delete it")
