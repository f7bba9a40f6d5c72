"""The neighbour graph, neighbourhood views and the central teacher.

Hand-made specs check the graph's rules and the view's layout entry by entry;
grid2x2 checks the graph of a generated net (whose edges SUMO splits before
each signal), the wrapper's API, and a tiny central teacher trained, saved,
loaded by ``make_teacher`` and distilled into local students.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test

from marlkd.config import TeacherConfig, load_config
from marlkd.distill.dagger import distill
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv, _agent_spec
from marlkd.envs.traffic.neighbours import (
    NeighbourObservationEnv,
    NeighbourView,
    env_neighbour_graph,
    neighbour_graph,
)
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.envs.traffic.signals import plan_from_program
from marlkd.rl.dqn import RLConfig
from marlkd.rl.train import train_teacher
from marlkd.students.checkpoint import load_student
from marlkd.teachers.central import (
    CentralTeacher,
    is_central_checkpoint,
    train_central_teacher,
)
from marlkd.teachers.registry import make_teacher

DURATION_S = 300
TINY_RL = RLConfig(
    episodes=2, learning_starts=32, batch_size=32, eval_every=1, eps_episodes=1
)


def spec(name: str, in_lanes: list[str], out_lanes: list[str]):
    """A two-phase signal: phase 0 serves the first link, phase 1 the others."""
    links = [[(i, o, "")] for i, o in zip(in_lanes, out_lanes, strict=True)]
    states = ["G" + "r" * (len(links) - 1), "r" + "G" * (len(links) - 1)]
    plan = plan_from_program(name, [(s, 30.0) for s in states], links)
    lengths = dict.fromkeys([*in_lanes, *out_lanes], 100.0)
    return _agent_spec(plan, lengths)


@pytest.fixture
def grid_env():
    env = TrafficSignalEnv(get_scenario("grid2x2"), TrafficEnvConfig(duration=300))
    yield env
    env.close()


# ----------------------------------------------------------- neighbour graph
def test_graph_of_hand_made_specs(caplog):
    # X -> Y on edge XY (lane 0 leaves X, lane 1 enters Y: only the edge
    # matches); Y -> Z on lane YZ_0; W shares no edge with anyone.
    specs = {
        "X": spec("X", ["wX_0", "nX_0"], ["XY_0", "Xs_0"]),
        "Y": spec("Y", ["XY_1", "nY_0"], ["YZ_0", "Ys_0"]),
        "Z": spec("Z", ["YZ_0", "nZ_0"], ["Ze_0", "Zs_0"]),
        "W": spec("W", ["wW_0", "nW_0"], ["We_0", "Ws_0"]),
    }
    graph = neighbour_graph(specs)
    assert graph == {"X": ("Y",), "Y": ("X", "Z"), "Z": ("Y",), "W": ()}

    # at most k neighbours: Y keeps the nearest (all at 0 m here: by id)
    with caplog.at_level(logging.WARNING):
        assert neighbour_graph(specs, k=1)["Y"] == ("X",)
    assert "leaves out Z" in caplog.text


def test_graph_of_grid2x2(grid_env):
    graph = neighbour_graph(grid_env.specs, grid_env.scenario.net_file)
    # A0 (bottom left) meets A1 above and B0 to its right, and so on round.
    assert graph == {
        "A0": ("A1", "B0"),
        "A1": ("A0", "B1"),
        "B0": ("A0", "B1"),
        "B1": ("A1", "B0"),
    }
    # netgenerate splits each street before its signal (A0A1, then A0A1.50.00
    # into A1): no edge is shared, so only following the road finds these.
    assert all(not n for n in neighbour_graph(grid_env.specs).values())
    everyone = env_neighbour_graph(grid_env, observe="global")
    assert everyone["B1"] == ("A0", "A1", "B0")


# ------------------------------------------------------------------- views
def test_view_layout_entry_by_entry():
    view = NeighbourView({"a": 2, "b": 3, "c": 1}, {"a": ["b"], "b": ["a", "c"]}, k=2)
    assert view.slot_size == 3 and view.obs_size == 3 * 3 + 2
    obs = {"a": np.array([1, 2]), "b": np.array([3, 4, 5]), "c": np.array([6])}
    views = view.from_observations(obs)
    np.testing.assert_array_equal(views["a"], [1, 2, 0, 3, 4, 5, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(views["b"], [3, 4, 5, 1, 2, 0, 6, 0, 0, 1, 1])
    np.testing.assert_array_equal(views["c"], [6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])

    state = np.arange(1, 7, dtype=np.float32)  # a, b, c end to end
    from_state = view.from_state(state)
    for name in obs:
        np.testing.assert_array_equal(from_state[name], views[name])

    # a missing neighbour is an absent one: zeros, flag 0
    alone = view.from_observations({"b": obs["b"], "c": obs["c"]})
    np.testing.assert_array_equal(alone["b"], [3, 4, 5, 0, 0, 0, 6, 0, 0, 0, 1])
    assert view.missing({"b": obs["b"]}, ["b"]) == ["a", "c"]

    scales = view.obs_scales(
        {"a": np.array([2, 3]), "b": np.array([4, 5, 6]), "c": np.array([7])}
    )
    np.testing.assert_array_equal(scales["b"], [4, 5, 6, 2, 3, 1, 7, 1, 1, 1, 1])


def test_views_from_observations_and_state_agree(grid_env):
    wrapped = NeighbourObservationEnv(grid_env)
    views, infos = wrapped.reset(seed=5)
    for _ in range(4):
        observations, *_, infos = grid_env.step(dict.fromkeys(grid_env.agents, 1))
    views = wrapped.view.from_observations(observations)
    from_state = wrapped.view.from_state(grid_env.state())
    d = wrapped.view.slot_size
    for a in grid_env.agents:
        np.testing.assert_array_equal(views[a], from_state[a])
        np.testing.assert_array_equal(views[a][:d], observations[a])
        first = wrapped.view.neighbours[a][0]
        np.testing.assert_array_equal(views[a][d : 2 * d], observations[first])
        np.testing.assert_array_equal(views[a][-4:], [1, 1, 0, 0])
    layout = wrapped.layout()
    assert [e.obs_size for e in layout.agents] == [5 * d + 4] * 4
    np.testing.assert_array_equal(
        layout.agents[0].obs_scale[:d],
        grid_env.specs["A0"].obs_scale(grid_env.config.max_green),
    )


def test_wrapper_passes_the_parallel_api(grid_env):
    wrapped = NeighbourObservationEnv(grid_env)
    parallel_api_test(wrapped, num_cycles=100)
    observations, infos = wrapped.reset(seed=1)
    assert all("action_mask" in infos[a] for a in wrapped.agents)
    assert wrapped.state().shape == grid_env.state_space.shape
    assert wrapped.specs is grid_env.specs and wrapped.end == grid_env.end


# --------------------------------------------------------- central teacher
@pytest.fixture(scope="module")
def central_checkpoint(tmp_path_factory):
    """A central teacher of grid2x2 after two short DQN episodes."""
    env = TrafficSignalEnv(
        get_scenario("grid2x2"), TrafficEnvConfig(duration=DURATION_S)
    )
    try:
        teacher, curve = train_central_teacher(
            env, TINY_RL, hidden=(32, 32), progress=False
        )
    finally:
        env.close()
    assert [c["episode"] for c in curve] == [1, 2]
    path = tmp_path_factory.mktemp("central") / "student.pt"
    teacher.save(path)
    return path


def test_checkpoint_loads_as_a_central_teacher(central_checkpoint, grid_env):
    assert is_central_checkpoint(central_checkpoint)
    teacher = make_teacher(str(central_checkpoint), grid_env)
    assert isinstance(teacher, CentralTeacher) and teacher.needs_state
    assert teacher.view.neighbours["A0"] == ("A1", "B0")

    observations, infos = grid_env.reset(seed=2)
    masks = {a: infos[a]["action_mask"] for a in grid_env.agents}
    out = teacher.act(observations, masks, grid_env.state())
    views = teacher.view.from_state(grid_env.state())
    agent = torch.arange(4)
    logits = teacher.student(
        torch.from_numpy(np.stack([views[a] for a in grid_env.agents])), agent
    ).logits.detach()
    for i, a in enumerate(grid_env.agents):
        assert masks[a][out.actions[a]]
        np.testing.assert_allclose(out.scores[a], logits[i].numpy(), rtol=1e-6)
    assert set(out.features) == set(grid_env.agents)


def test_distilled_student_sees_only_its_own_intersection(central_checkpoint, tmp_path):
    config = load_config(
        None,
        [
            "scenario.name=grid2x2",
            f"env.duration={DURATION_S}",
            f'teacher="{central_checkpoint}"',
            "collect.method=dagger",
            "collect.iterations=2",
            "collect.episodes_per_iteration=1",
            "collect.beta_final=0.5",
            "train.epochs=2",
        ],
    )
    distill(config, tmp_path, progress=False)
    student = load_student(tmp_path / "checkpoints" / "student.pt")
    env = TrafficSignalEnv(get_scenario("grid2x2"), TrafficEnvConfig(duration=60))
    try:
        own = [env.specs[a].obs_size for a in env.possible_agents]
    finally:
        env.close()
    assert [e.obs_size for e in student.layout.agents] == own


def test_train_teacher_with_neighbours_writes_a_central_teacher(tmp_path):
    config = TeacherConfig()
    config.scenario.name = "grid2x2"
    config.env.duration = DURATION_S
    config.network.hidden = [32, 32]
    config.rl = RLConfig(**{**TINY_RL.__dict__, "episodes": 1})
    config.eval.controllers = ["teacher"]
    config.eval.episodes = 1
    config.observe = "neighbours"  # TeacherConfig's field once it has one
    report = train_teacher(config, tmp_path, progress=False)
    assert report["observe"] == "neighbours"
    assert is_central_checkpoint(tmp_path / "checkpoints" / "student.pt")
    assert report["controllers"]["teacher"]["mean"]["latency_one_us"] > 0
