"""The traffic ParallelEnv on a one-intersection network."""

from __future__ import annotations

import numpy as np
import pytest
from pettingzoo.test import parallel_api_test

from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import user_scenario


@pytest.fixture
def make_env(cross_net, cross_routes):
    envs = []

    def make(**config):
        scenario = user_scenario(cross_net, [cross_routes], begin=0, end=3600)
        env = TrafficSignalEnv(scenario, TrafficEnvConfig(**config))
        envs.append(env)
        return env

    yield make
    for env in envs:
        env.close()


def test_parallel_api(make_env):
    env = make_env(duration=600)
    parallel_api_test(env, num_cycles=100)


def test_spaces_and_state(make_env):
    env = make_env(duration=100)
    obs, infos = env.reset(seed=3)
    assert env.agents == ["C"]
    spec = env.specs["C"]
    assert spec.num_phases == 2 and spec.num_in == 4 and spec.num_out == 4
    assert obs["C"].shape == env.observation_space("C").shape == (2 + 2 + 8 + 8,)
    assert env.state().shape == env.state_space.shape
    assert infos["C"]["action_mask"].tolist() == [1, 1]


def record_states(env, monkeypatch):
    """Log (time reached, signal state shown on the way) for every advance."""
    log = []
    advance = env._advance

    def spy(target):
        log.append((target, env._sumo.trafficlight.getRedYellowGreenState("C")))
        advance(target)

    monkeypatch.setattr(env, "_advance", spy)
    return log


def test_yellow_and_all_red_are_inserted_on_a_change(make_env, monkeypatch):
    env = make_env(duration=100, yellow_time=3, all_red_time=2, min_green=5)
    env.reset(seed=0)
    plan = env.specs["C"].plan
    log = record_states(env, monkeypatch)
    obs, *_ = env.step({"C": 1})
    assert log == [
        (13.0, plan.yellow_state(0, 1)),
        (15.0, plan.red_state(0, 1)),
        (20.0, plan.green_states[1]),
    ]
    assert env._sumo.trafficlight.getRedYellowGreenState("C") == plan.green_states[1]
    sl = env.specs["C"].obs_slices()
    assert obs["C"][sl["phase"]].tolist() == [0, 1]
    assert obs["C"][sl["green_time_s"]][0] == pytest.approx(5.0)

    log.clear()
    env.step({"C": 1})  # no change: one advance, no yellow
    assert log == [(30.0, plan.green_states[1])]


def test_min_green_holds_the_phase(make_env):
    env = make_env(duration=200, min_green=25)
    _, infos = env.reset(seed=0)
    # At reset the green has lasted 10 s < 25 s: only phase 0 may be chosen.
    assert infos["C"]["action_mask"].tolist() == [1, 0]
    sl = env.specs["C"].obs_slices()
    obs, _, _, _, infos = env.step({"C": 1})  # refused: phase stays 0
    assert obs["C"][sl["phase"]].tolist() == [1, 0]
    assert infos["C"]["action_mask"].tolist() == [1, 0]  # 20 s
    obs, _, _, _, infos = env.step({"C": 0})
    assert infos["C"]["action_mask"].tolist() == [1, 1]  # 30 s
    assert obs["C"][sl["may_switch"]][0] == 1
    obs, _, _, _, infos = env.step({"C": 1})
    assert obs["C"][sl["phase"]].tolist() == [0, 1]
    assert obs["C"][sl["green_time_s"]][0] == pytest.approx(7.0)
    assert infos["C"]["action_mask"].tolist() == [0, 1]


def test_max_green_forces_a_switch(make_env):
    env = make_env(duration=200, min_green=5, max_green=30)
    env.reset(seed=0)
    sl = env.specs["C"].obs_slices()
    obs, _, _, _, infos = env.step({"C": 0})
    obs, _, _, _, infos = env.step({"C": 0})  # green has lasted 30 s
    assert infos["C"]["action_mask"].tolist() == [0, 1]
    obs, *_ = env.step({"C": 0})
    assert obs["C"][sl["phase"]].tolist() == [0, 1]


def test_episode_ends_with_metrics(make_env):
    env = make_env(duration=300)
    obs, infos = env.reset(seed=0)
    steps = 0
    while env.agents:
        obs, rewards, terms, truncs, infos = env.step({"C": steps // 3 % 2})
        steps += 1
    assert steps == 29  # the first 10 s pass in reset
    assert truncs == {"C": True}
    episode = infos["C"]["episode"]
    assert episode["vehicles"] > 50
    assert episode["throughput_veh"] > 0
    assert set(env.last_episode.per_intersection) == {"C"}


@pytest.mark.parametrize("reward", ["queue", "pressure", "wait", "delay"])
def test_rewards_are_finite_and_non_positive_for_queue(make_env, reward):
    env = make_env(duration=300, reward=reward)
    env.reset(seed=1)
    seen = []
    while env.agents:
        _, rewards, *_ = env.step({"C": 0})  # keep N-S green: E-W queues grow
        seen.append(rewards["C"])
    assert np.all(np.isfinite(seen))
    if reward in ("queue", "pressure", "delay"):
        assert max(seen) <= 0 and min(seen) < 0


def test_two_libsumo_envs_in_one_process_are_refused(make_env):
    a, b = make_env(duration=50), make_env(duration=50)
    a.reset(seed=0)
    with pytest.raises(RuntimeError, match="one simulation per process"):
        b.reset(seed=0)
    a.close()
    b.reset(seed=0)
