"""Distillation runs whose rounds train clients that learn together.

Tiny runs on grid2x2 (four signals, 300 simulated seconds, two rounds): what
student each method leaves, its metrics, an interrupted run resumed, and the
settings that are refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from marlkd.config import load_config
from marlkd.distill import cooperative
from marlkd.distill.dagger import distill, load_clients
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.errors import UserError
from marlkd.students import AgentLayout, RoutingStudent, load_student
from marlkd.tracking import read_metrics

TINY = [
    "scenario.name=grid2x2",
    "env.duration=300",
    "collect.iterations=2",
    "collect.episodes_per_iteration=2",
    "cooperate.clients=2",
    "cooperate.rounds=2",
    "cooperate.local_epochs=2",
    "train.batch_size=32",
    "student.kind=mlp",
    "student.hidden=[16]",
]


def grid_config(*overrides):
    return load_config(None, [*TINY, *overrides])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def grid_batch():
    """Every agent of grid2x2 once, on random observations, all actions allowed."""
    env = TrafficSignalEnv(get_scenario("grid2x2"), TrafficEnvConfig(duration=60))
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    finally:
        env.close()
    agent = torch.arange(layout.num_agents).repeat(3)
    obs = torch.rand(len(agent), layout.max_obs_size) * 5
    mask = torch.from_numpy(layout.action_exists())[agent]
    return obs, agent, mask


# ------------------------------------------------------------- the students
def test_fedavg_leaves_the_averaged_student(tmp_path):
    student = distill(grid_config("cooperate.method=fedavg"), tmp_path, progress=False)

    saved = load_student(tmp_path / "checkpoints" / "student.pt")
    assert saved.kind == "mlp" and same_weights(saved, student)
    assert not (tmp_path / "checkpoints" / "clients.pt").exists()
    assert not list((tmp_path / "checkpoints").glob("together_round*.pt"))
    metrics = read_metrics(tmp_path)
    # two cooperative rounds in each of two DAgger rounds
    assert [s for s, _ in metrics["distill/train_loss"]] == [1, 2, 3, 4]
    assert [v for _, v in metrics["distill/mutual_loss"]] == [0.0] * 4
    for key in ("round_val_agreement", "client_val_agreement_mean",
                "client_disagreement"):  # fmt: skip
        assert len(metrics[f"distill/{key}"]) == 2, key
    # fedavg clients share one student: they never disagree
    assert [v for _, v in metrics["distill/client_disagreement"]] == [0.0, 0.0]


def test_mutual_split_by_agents_drives_each_signal_by_its_client(tmp_path):
    student = distill(
        grid_config("cooperate.method=mutual", "cooperate.split=agents"),
        tmp_path,
        progress=False,
    )

    assert isinstance(student, RoutingStudent)
    assert student.config["assignment"] == [0, 1, 0, 1]
    saved = load_student(tmp_path / "checkpoints" / "student.pt")
    assert same_weights(saved, student)
    clients = load_clients(tmp_path / "checkpoints" / "clients.pt", saved.layout)
    assert len(clients) == 2
    assert not same_weights(clients[0], clients[1])  # each learnt its own

    obs, agent, mask = grid_batch()
    with torch.no_grad():
        routed = saved(obs, agent, mask).logits
        for i in range(4):
            rows = agent == i
            own = clients[i % 2](obs[rows], agent[rows], mask[rows]).logits
            torch.testing.assert_close(routed[rows], own, rtol=0, atol=1e-6)
    metrics = read_metrics(tmp_path)
    assert all(v > 0 for _, v in metrics["distill/mutual_loss"][1::2])


def test_mutual_split_by_episodes_keeps_the_best_client(tmp_path):
    student = distill(
        grid_config("cooperate.method=mutual", "cooperate.split=episodes"),
        tmp_path,
        progress=False,
    )

    assert student.kind == "mlp"
    clients = load_clients(tmp_path / "checkpoints" / "clients.pt", student.layout)
    assert sum(same_weights(student, c) for c in clients) == 1
    metrics = read_metrics(tmp_path)
    best = metrics["distill/round_val_agreement"][-1][1]
    assert best >= metrics["distill/client_val_agreement_mean"][-1][1]


def test_split_parts_by_agents_and_by_episodes():
    data = cooperative.Transitions(
        obs=np.zeros((8, 2), np.float32),
        agent=np.array([0, 1, 2, 3] * 2),
        mask=np.ones((8, 2), bool),
        teacher_scores=np.zeros((8, 2), np.float32),
        teacher_action=np.zeros(8, np.int64),
        round=np.zeros(8, np.int32),
        episode=np.array([5] * 4 + [6] * 4),
    )
    by_agents = cooperative.split_parts(data, "agents", 2)
    assert [p.agent.tolist() for p in by_agents] == [[0, 2, 0, 2], [1, 3, 1, 3]]
    by_episodes = cooperative.split_parts(data, "episodes", 2)
    assert [p.episode.tolist() for p in by_episodes] == [[6] * 4, [5] * 4]
    with pytest.raises(UserError, match=r"client\(s\) \[1\] of 3"):
        cooperative.split_parts(data, "episodes", 3)


# ------------------------------------------------------------------- resume
def test_an_interrupted_mutual_run_resumes_to_the_same_student(tmp_path, monkeypatch):
    config = grid_config("cooperate.method=mutual", "cooperate.rounds=3")
    reference = distill(config, tmp_path / "reference", progress=False)

    run = tmp_path / "run"
    save = cooperative._save

    def interrupted(path, config, sizes, rounds_done, *args):
        save(path, config, sizes, rounds_done, *args)
        if path.name == "together_round1.pt" and rounds_done == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cooperative, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(config, run, progress=False)
    monkeypatch.setattr(cooperative, "_save", save)
    assert json.loads((run / "progress.json").read_text())["rounds_done"] == 1
    assert (run / "checkpoints" / "together_round1.pt").exists()

    student = distill(config, run, resume=True, progress=False)
    assert same_weights(student, reference)
    assert not (run / "checkpoints" / "together_round1.pt").exists()
    metrics = read_metrics(run)
    # the rounds of the interrupted DAgger round are logged once, when it ends
    assert [s for s, _ in metrics["distill/train_loss"]] == list(range(1, 7))
    assert json.loads((run / "progress.json").read_text()) == {
        "rounds_done": 2,
        "global_epoch": 6,
    }


# ---------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["cooperate.method=ensemble"], "cooperate.method is 'ensemble'"),
        (["cooperate.method=fedavg", "cooperate.clients=1"],
         "cooperate.clients is 1"),
        (["cooperate.method=mutual", "cooperate.split=lanes"],
         "cooperate.split is 'lanes'"),
        (["cooperate.method=mutual", "cooperate.rounds=0"],
         "cooperate.rounds is 0"),
        (["cooperate.method=mutual", "cooperate.mutual_temperature=0"],
         "cooperate.mutual_temperature"),
        (["cooperate.method=fedavg", "loss.feature=1"], "loss.feature=0"),
        (["cooperate.method=mutual", "cooperate.split=episodes",
          "cooperate.clients=3"], "collect.episodes_per_iteration=3"),
        (["student.kind=routing"], "student.kind is routing"),
    ],
    ids=["method", "clients", "split", "rounds", "temperature", "feature",
         "episodes", "routing-kind"],
)  # fmt: skip
def test_bad_cooperation_settings_are_refused(overrides, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(")):
        grid_config(*overrides)


def test_none_ignores_the_other_cooperation_settings():
    config = grid_config("cooperate.clients=1", "cooperate.split=lanes")
    assert config.cooperate.method == "none"


def test_more_clients_than_signals_is_refused_before_any_write(tmp_path):
    config = grid_config("cooperate.method=mutual", "cooperate.clients=5")
    with pytest.raises(UserError, match="grid2x2 has 4 signals"):
        distill(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
