"""A run can train on the dataset an earlier run collected."""

from __future__ import annotations

import numpy as np
import pytest

from marlkd.cli import main
from marlkd.tracking import read_metrics


def distill(out, *args):
    return main(
        [
            "--log-level", "WARNING", "distill", *args, "--out", str(out), "--no-eval",
            "--set", "env.duration=300", "--set", "train.epochs=2",
            "--set", "collect.iterations=1",
        ]
    )  # fmt: skip


def samples(run) -> list[float]:
    return [v for _, v in read_metrics(run)["distill/train_samples"]]


def test_reused_rounds_join_the_training_data(tmp_path, cross_net, cross_routes):
    flags = ["--net", str(cross_net), "--routes", str(cross_routes)]
    first, second = tmp_path / "first", tmp_path / "second"
    assert distill(first, *flags) == 0
    own = samples(first)[-1]
    assert distill(second, *flags, "--set", f"collect.reuse={first / 'dataset'}") == 0
    # the second run trains on the first run's round and its own
    assert samples(second)[-1] == pytest.approx(2 * own)
    first_round = np.load(first / "dataset" / "round_000.npz")["obs"]
    assert len(first_round) == own


def test_a_dataset_of_other_agents_is_refused(
    tmp_path, cross_net, cross_routes, capsys
):
    assert distill(tmp_path / "cross", "--net", str(cross_net), "--routes",
                   str(cross_routes)) == 0  # fmt: skip
    code = distill(
        tmp_path / "grid", "--scenario", "grid2x2",
        "--set", f"collect.reuse={tmp_path / 'cross' / 'dataset'}",
    )  # fmt: skip
    assert code == 2
    assert "reuse a dataset of the same scenario" in capsys.readouterr().err
