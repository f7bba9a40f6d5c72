"""Evaluation helpers on hand-made inputs, and ``evaluate_run`` on a tiny run."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from marlkd.config import load_config
from marlkd.distill.dagger import distill
from marlkd.errors import UserError
from marlkd.evaluate import (
    AgreementProbe,
    decision_latency_us,
    evaluate_run,
    format_table,
)
from marlkd.teachers.base import TeacherOutput


class FixedChoice:
    """A policy that takes the actions it is given, whatever it sees."""

    def __init__(self, actions):
        self.actions = actions
        self.resets = 0

    def reset(self):
        self.resets += 1

    def __call__(self, observations, masks, state=None):
        return {a: self.actions[a] for a in observations}


class FixedScores:
    """A teacher with fixed scores per agent; it acts on the best of them."""

    needs_state = True

    def __init__(self, scores):
        self.scores = {a: np.asarray(s, dtype=np.float32) for a, s in scores.items()}
        self.states = []
        self.resets = 0

    def reset(self):
        self.resets += 1

    def act(self, observations, masks, state=None):
        self.states.append(state)
        return TeacherOutput(
            scores={a: self.scores[a] for a in observations},
            actions={a: int(np.argmax(self.scores[a])) for a in observations},
        )


# ------------------------------------------------------------ agreement probe
def test_agreement_probe_counts_choices_and_ties():
    masks = {
        "only": np.array([False, True, False]),  # no choice: not counted
        "best": np.array([True, True, True]),  # picks the best
        "tie": np.array([True, True, True]),  # picks one of two best
        "worse": np.array([True, True, False]),  # picks the worse of two
        "hidden": np.array([True, True, False]),  # the best is not allowed
    }
    scores = {
        "only": [9.0, 0.0, 5.0],
        "best": [0.0, 2.0, 1.0],
        "tie": [3.0, 1.0, 3.0],
        "worse": [0.0, 1.0, 7.0],
        "hidden": [1.0, 0.0, 9.0],
    }
    chosen = {"only": 1, "best": 1, "tie": 2, "worse": 0, "hidden": 0}
    probe = AgreementProbe(FixedChoice(chosen), FixedScores(scores))
    observations = {a: np.zeros(2) for a in masks}

    assert math.isnan(probe.agreement)  # nothing decided yet
    assert probe(observations, masks, "S") == chosen
    assert (probe.agreed, probe.decisions) == (3, 4)
    probe(observations, masks, "S")
    assert probe.agreement == pytest.approx(6 / 8)
    assert probe.teacher.states == ["S", "S"] and probe.needs_state


def test_agreement_probe_resets_both():
    policy, teacher = FixedChoice({}), FixedScores({})
    AgreementProbe(policy, teacher).reset()
    assert (policy.resets, teacher.resets) == (1, 1)


# --------------------------------------------------------------- latency
def test_decision_latency_is_in_microseconds_per_agent():
    sizes = []

    def policy(observations, masks):
        sizes.append(len(observations))
        time.sleep(0.002 * len(observations))
        return {a: 0 for a in observations}

    observations = {a: np.zeros(3) for a in "abcd"}
    masks = {a: np.ones(2, dtype=bool) for a in "abcd"}
    latency = decision_latency_us(policy, observations, masks, repeats=3)

    assert sizes == [1] * 4 + [4] * 4  # one agent alone, then all four
    assert set(latency) == {"latency_one_us", "latency_batch_per_agent_us"}
    # 2 ms of sleep per agent: at least 2000 us, alone or per agent in a batch
    assert latency["latency_one_us"] >= 2000
    assert latency["latency_batch_per_agent_us"] >= 2000


# ------------------------------------------------------------------ table
def test_format_table():
    rows = [
        ("teacher", {"avg_delay_s": 12.346, "throughput_veh": 100, "teleports": 0}),
        ("student", {"avg_delay_s": np.float64(10.0), "throughput_veh": 98.0,
                     "agreement": 0.75}),
    ]  # fmt: skip
    table = format_table(rows, ("avg_delay_s", "throughput_veh", "agreement"))
    assert table == (
        "| | avg_delay_s | throughput_veh | agreement |\n"
        "|---|---|---|---|\n"
        "| teacher | 12.35 | 100 | – |\n"
        "| student | 10 | 98 | 0.75 |"
    )


# --------------------------------------------------------------- run folders
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cross_net, cross_routes):
    run_dir = tmp_path_factory.mktemp("eval-run")
    config = load_config(
        None,
        [
            "scenario.name=null",
            f'scenario.net="{cross_net}"',
            f'scenario.routes=["{cross_routes}"]',
            "env.duration=300",
            "collect.iterations=1",
            "train.epochs=2",
            "eval.episodes=1",
        ],
    )
    distill(config, run_dir, progress=False)
    return run_dir


def test_evaluate_run_on_chosen_controllers(tiny_run):
    report = evaluate_run(
        tiny_run, controllers=["student", "fixed"], seed=7, progress=False
    )
    assert list(report["controllers"]) == ["student", "fixed"]
    assert report["seeds"] == [7] and report["demand_scale"] == 1.0
    student = report["controllers"]["student"]["mean"]
    assert 0.0 <= student["agreement"] <= 1.0
    assert "delay_vs_teacher" not in student  # no teacher to compare with
    assert report["controllers"]["fixed"]["mean"]["parameters"] == 0

    written = json.loads((tiny_run / "results.json").read_text())
    assert written == json.loads(
        json.dumps({k: v for k, v in report.items() if k != "table"}, default=float)
    )
    markdown = (tiny_run / "results.md").read_text()
    assert markdown.startswith("# cross, demand x1, seeds 7-7\n")
    assert report["table"] in markdown


def test_evaluate_run_refuses_no_episodes(tiny_run):
    with pytest.raises(UserError, match="--episodes is 0"):
        evaluate_run(tiny_run, episodes=0, progress=False)


def test_evaluate_run_without_demand_has_no_delay_ratio_error(tiny_run):
    report = evaluate_run(
        tiny_run,
        episodes=1,
        demand_scale=1e-4,
        controllers=["teacher", "student"],
        progress=False,
    )
    means = [entry["mean"] for entry in report["controllers"].values()]
    assert all(m["avg_delay_s"] == 0 for m in means)
    assert all(math.isnan(m["delay_vs_teacher"]) for m in means)
    assert (tiny_run / "results-demand0.0001.json").exists()
