"""Independent DQN, kickstarting and train-teacher."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from marlkd.cli import main
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import user_scenario
from marlkd.rl.config import RLConfig
from marlkd.rl.dqn import ReplayBuffer, _dqn_loss, train_dqn
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.teachers import make_controller
from marlkd.tracking import read_metrics


class TableQ(torch.nn.Module):
    """Q-values read from the first A entries of the observation."""

    def __init__(self, num_actions: int):
        super().__init__()
        self.num_actions = num_actions
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, obs, agent, mask):
        logits = self.scale * obs[:, : self.num_actions]
        return type("Out", (), {"logits": logits, "features": logits})()


def test_double_dqn_target_by_hand():
    online, target = TableQ(3), TableQ(3)
    with torch.no_grad():
        target.scale.fill_(2.0)
    batch = {
        "obs": torch.tensor([[1.0, 5.0, 2.0]]),
        "next_obs": torch.tensor([[1.0, 3.0, 4.0]]),
        "agent": torch.tensor([0]),
        "mask": torch.tensor([[True, True, True]]),
        # the best next action by the online net is 2 (4.0), but it is masked,
        # so the argmax falls on action 1 (3.0)
        "next_mask": torch.tensor([[True, True, False]]),
        "action": torch.tensor([0]),
        "reward": torch.tensor([0.5]),
    }
    config = RLConfig(gamma=0.9)
    loss, parts = _dqn_loss(online, target, batch, config, lam=0.0)
    # y = 0.5 + 0.9 * Q_target(s', 1) = 0.5 + 0.9 * 2 * 3 = 5.9; Q(s, 0) = 1.0
    # Huber with delta 1: |1 - 5.9| - 0.5 = 4.4
    assert float(loss.detach()) == pytest.approx(4.4)
    assert parts["q_mean"] == pytest.approx(1.0)


def test_kickstart_term_is_added_with_its_weight():
    online, target = TableQ(2), TableQ(2)
    batch = {
        "obs": torch.tensor([[0.0, 0.0]]),
        "next_obs": torch.tensor([[0.0, 0.0]]),
        "agent": torch.tensor([0]),
        "mask": torch.tensor([[True, True]]),
        "next_mask": torch.tensor([[True, True]]),
        "action": torch.tensor([0]),
        "reward": torch.tensor([0.0]),
        "teacher": torch.tensor([[0.0, float(np.log(3.0))]]),
    }
    loss, parts = _dqn_loss(online, target, batch, RLConfig(), lam=0.5)
    # TD part is 0; KL(p || uniform) with p = (1/4, 3/4)
    kl = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    assert parts["kickstart_loss"] == pytest.approx(kl, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(0.5 * kl, rel=1e-5)


def test_schedules():
    config = RLConfig(eps_start=1.0, eps_end=0.1, eps_episodes=10, kickstart=2.0)
    config.kickstart_episodes = 4
    assert config.epsilon(0) == 1.0
    assert config.epsilon(5) == pytest.approx(0.55)
    assert config.epsilon(50) == pytest.approx(0.1)
    assert [config.kickstart_weight(e) for e in (0, 2, 4, 9)] == [2.0, 1.0, 0.0, 0.0]
    assert RLConfig().kickstart_weight(0) == 0.0


def test_replay_buffer_wraps_around():
    buffer = ReplayBuffer(5, obs_size=2, num_actions=2, teacher=False)
    for k in range(3):
        rows = np.full((2, 2), k, dtype=np.float32)
        mask = np.ones((2, 2), dtype=bool)
        buffer.add(rows, np.arange(2), mask, np.zeros(2), np.full(2, k), rows, mask)
    assert buffer.size == 5
    assert sorted(buffer.reward.tolist()) == [0, 1, 1, 2, 2]  # oldest row gone


@pytest.fixture
def cross_env(cross_net, cross_routes):
    scenario = user_scenario(cross_net, [cross_routes], begin=0, end=3600)
    env = TrafficSignalEnv(scenario, TrafficEnvConfig(duration=600))
    yield env
    env.close()


@pytest.mark.parametrize("kickstart", [0.0, 1.0])
def test_tiny_dqn_run_learns_and_logs(cross_env, tmp_path, kickstart):
    from marlkd.tracking import MetricWriter

    env = cross_env
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    torch.manual_seed(0)
    network = make_student("phase", layout)
    before = copy.deepcopy(network.state_dict())
    writer = MetricWriter(tmp_path, tensorboard=False)
    config = RLConfig(
        episodes=2, learning_starts=20, batch_size=16, eval_every=1, kickstart=kickstart
    )
    teacher = make_controller("max-pressure", env) if kickstart else None
    curve = train_dqn(
        env, network, config, batcher=batcher, teacher=teacher, writer=writer,
        step_offset=100, progress=False,
    )  # fmt: skip
    writer.close()
    assert [p["env_steps"] for p in curve] == [159, 218]
    assert all(p["avg_delay_s"] > 0 for p in curve)
    assert any(not torch.equal(before[k], v) for k, v in network.state_dict().items())
    metrics = read_metrics(tmp_path)
    assert "rl/td_loss" in metrics and "rl/eval_avg_delay_s" in metrics
    assert ("rl/kickstart_loss" in metrics) == bool(kickstart)


def test_kickstarting_needs_a_teacher(cross_env):
    env = cross_env
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    with pytest.raises(ValueError, match="teacher"):
        train_dqn(
            env, make_student("phase", layout), RLConfig(episodes=1, kickstart=1.0),
            batcher=batcher,
        )  # fmt: skip


def test_train_teacher_and_use_it_as_a_teacher(tmp_path, cross_net, cross_routes):
    teacher_dir = tmp_path / "teacher"
    common = [
        "--net",
        str(cross_net),
        "--routes",
        str(cross_routes),
        "--duration",
        "600",
    ]
    assert (
        main(
            [
                "--log-level", "WARNING", "train-teacher", *common,
                "--out", str(teacher_dir),
                "--set", "rl.episodes=2", "--set", "rl.learning_starts=20",
                "--set", "rl.eval_every=1", "--set", "eval.episodes=1",
                "--set", "network.hidden=[32, 32]",
            ]
        )
        == 0
    )  # fmt: skip
    results = json.loads((teacher_dir / "results.json").read_text())
    assert set(results["controllers"]) == {"teacher", "max-pressure", "fixed"}
    assert results["controllers"]["teacher"]["mean"]["parameters"] > 0
    assert len(json.loads((teacher_dir / "rl_curve.json").read_text())) == 2

    # the trained network teaches a student, which is then kickstarted
    run = tmp_path / "student"
    checkpoint = teacher_dir / "checkpoints" / "student.pt"
    assert (
        main(
            [
                "--log-level", "WARNING", "distill", *common,
                "--teacher", str(checkpoint), "--out", str(run),
                "--set", "collect.iterations=1", "--set", "train.epochs=2",
                "--set", "rl.episodes=1", "--set", "rl.kickstart=1.0",
                "--set", "rl.learning_starts=20", "--set", "eval.episodes=1",
                "--set", "collect.validate=true",
            ]
        )
        == 0
    )  # fmt: skip
    assert json.loads((run / "progress.json").read_text())["rl_done"] is True
    assert (run / "rl_curve.json").exists() and (run / "rounds_curve.json").exists()
    results = json.loads((run / "results.json").read_text())
    assert results["controllers"]["teacher"]["controller"] == "network"


def test_an_interrupted_dqn_run_resumes_to_the_same_weights(cross_env, tmp_path):
    env = cross_env
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    # iterations of two episodes: [0, 1], [2]; the stopped run ends after [0, 1]
    config = RLConfig(
        episodes=3, episodes_per_iteration=2, learning_starts=20, batch_size=16,
        eval_every=1,
    )  # fmt: skip

    def fresh():
        torch.manual_seed(0)
        return make_student("phase", layout)

    whole = fresh()
    whole_curve = train_dqn(
        env, whole, config, batcher=batcher, checkpoint=tmp_path / "a.pt",
        progress=False,
    )  # fmt: skip

    # the same run stopped after its second episode, then resumed
    stopped = fresh()
    short = RLConfig(**{**vars(config), "episodes": 2})
    train_dqn(
        env, stopped, short, batcher=batcher, checkpoint=tmp_path / "b.pt",
        progress=False,
    )  # fmt: skip
    resumed = fresh()
    curve = train_dqn(
        env, resumed, config, batcher=batcher, checkpoint=tmp_path / "b.pt",
        progress=False,
    )  # fmt: skip
    assert curve == whole_curve
    assert [c["episode"] for c in curve] == [2, 3]
    for key, value in whole.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_train_teacher_flags_set_its_workers():
    from marlkd.cli import build_parser, config_from_args
    from marlkd.config import TeacherConfig

    parser = build_parser()
    args = parser.parse_args(
        ["train-teacher", "--workers", "2", "--ray-address", "auto"]
    )
    config = config_from_args(args, TeacherConfig)
    assert (config.workers, config.ray_address) == (2, "auto")
    config = config_from_args(parser.parse_args(["train-teacher"]), TeacherConfig)
    assert (config.workers, config.ray_address) == (0, None)


def test_rl_in_process_imports_no_ray(tmp_path, cross_net, cross_routes):
    script = textwrap.dedent(
        f"""
        import sys
        from marlkd.config import TeacherConfig, load_config
        from marlkd.rl.train import train_teacher

        config = load_config(None, [
            "scenario.name=null",
            'scenario.net="{cross_net}"',
            'scenario.routes=["{cross_routes}"]',
            "env.duration=100",
            "algorithm=ppo",
            "ppo.episodes=1",
            "eval.episodes=1",
            "eval.controllers=[teacher]",
        ], TeacherConfig)
        train_teacher(config, {str(tmp_path / "run")!r}, progress=False)
        assert "ray" not in sys.modules, "ray was imported"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ok"
