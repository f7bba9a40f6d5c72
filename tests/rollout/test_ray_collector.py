"""The Ray collector gives the in-process collector's data, and survives faults.

Every collection here is three 300-second episodes on the one-intersection
net, with a student acting half the time, so the teacher-or-student draws and
the student's weights both shape the data.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from marlkd.config import load_config
from marlkd.distill.dagger import distill
from marlkd.distill.dataset import DatasetFolder
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import user_scenario
from marlkd.errors import UserError
from marlkd.rollout import LocalCollector, make_collector
from marlkd.rollout.batching import AgentBatcher
from marlkd.students import AgentLayout, make_student
from marlkd.students.checkpoint import load_student
from marlkd.students.policy import StudentPolicy
from marlkd.teachers.base import Teacher
from marlkd.teachers.max_pressure import MaxPressure

ray = pytest.importorskip("ray")

SEEDS = [0, 1, 2]
ROUND = 3
BETA = 0.5
TINY = [
    "env.duration=300",
    "collect.iterations=2",
    "collect.beta_final=0.5",
    "collect.episodes_per_iteration=2",
    "train.epochs=2",
]


@pytest.fixture(scope="module")
def ray_session():
    # logical CPUs, one per worker alive at once: the shared collectors' 1 + 2
    # and a distill run's 2 (idle workers take no time from the real cores)
    ray.init(
        num_cpus=5,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        logging_level="WARNING",
    )
    # workers cannot import this test module: send its classes by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def cross(cross_net, cross_routes):
    """The scenario, the driver's env, its batcher and an untrained student."""
    scenario = user_scenario(cross_net, [cross_routes])
    env = TrafficSignalEnv(scenario, TrafficEnvConfig(duration=300))
    layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    batcher = AgentBatcher(env.possible_agents, layout.max_obs_size, layout.max_actions)
    torch.manual_seed(0)
    student = make_student("phase", layout)
    yield env, batcher, student
    env.close()


@pytest.fixture(scope="module")
def reference(cross):
    """The in-process collection every Ray collection must equal."""
    env, batcher, student = cross
    local = LocalCollector(env, MaxPressure(env.specs), batcher)
    return local.collect(
        StudentPolicy(student, batcher), BETA, SEEDS, ROUND, _rng(), progress=False
    )


def ray_collector(cross, workers: int, teacher: str = "max-pressure"):
    env, batcher, _ = cross
    return make_collector(
        env, None, batcher, teacher_spec=teacher, workers=workers, ray_address=None
    )


@pytest.fixture(scope="module")
def ray_collectors(ray_session, cross):
    """Collectors of 1 and 2 workers, shared: starting a worker takes seconds."""
    collectors = {n: ray_collector(cross, n) for n in (1, 2)}
    yield collectors
    for collector in collectors.values():
        collector.close()


def assert_same(a, b) -> None:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x is None) == (y is None), f.name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=f.name)


def _rng():
    return np.random.default_rng([7, ROUND])


# ------------------------------------------------------------ one interface
def test_no_ray_is_imported_without_workers(tmp_path, cross_net, cross_routes):
    script = textwrap.dedent(
        f"""
        import sys
        from marlkd.config import load_config
        from marlkd.distill.dagger import distill

        config = load_config(None, [
            "scenario.name=null",
            'scenario.net="{cross_net}"',
            'scenario.routes=["{cross_routes}"]',
            "env.duration=100",
            "collect.iterations=1",
            "train.epochs=1",
        ])
        distill(config, {str(tmp_path / "run")!r}, progress=False)
        assert "ray" not in sys.modules, "ray was imported"
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
    assert (tmp_path / "run" / "dataset" / "round_000.npz").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_same_data_for_any_number_of_workers(ray_collectors, cross, reference, workers):
    env, batcher, student = cross
    collector = ray_collectors[workers]
    assert len(collector.workers) == workers
    data, episodes = collector.collect(
        StudentPolicy(student, batcher), BETA, SEEDS, ROUND, _rng(), progress=False
    )
    timings = collector.timings

    assert_same(data, reference[0])
    assert episodes == reference[1]
    assert [t["seed"] for t in timings] == SEEDS
    assert all(t["task_s"] >= t["episode_s"] > t["sumo_s"] > 0 for t in timings)


def test_the_draws_and_the_student_shape_the_data(cross, reference):
    # the equality above could not fail if the student never acted: another
    # key of draws, or another student, gives other data
    env, batcher, student = cross
    local = LocalCollector(env, MaxPressure(env.specs), batcher)
    policy = StudentPolicy(student, batcher)
    other_key, _ = local.collect(policy, BETA, SEEDS, ROUND, None, progress=False)
    contrary = copy.deepcopy(student)  # prefers what the student avoids
    with torch.no_grad():
        for p in contrary.head.parameters():
            p.neg_()
    other = StudentPolicy(contrary, batcher)
    other_student, _ = local.collect(other, BETA, SEEDS, ROUND, _rng(), progress=False)
    for data in (other_key, other_student):
        assert len(data) == len(reference[0])
        assert not np.array_equal(data.obs, reference[0].obs)


def test_distill_on_workers_equals_distill_in_process(
    ray_session, tmp_path, cross_net, cross_routes
):
    base = [
        "scenario.name=null",
        f'scenario.net="{cross_net}"',
        f'scenario.routes=["{cross_routes}"]',
        *TINY,
    ]
    students = {}
    for workers in (0, 2):
        config = load_config(None, [*base, f"collect.workers={workers}"])
        distill(config, tmp_path / str(workers), progress=False)
        students[workers] = load_student(
            tmp_path / str(workers) / "checkpoints/student.pt"
        )

    here, there = (DatasetFolder(tmp_path / str(w) / "dataset") for w in (0, 2))
    assert here.rounds() == there.rounds() == [0, 1]
    for k in (0, 1):
        assert_same(here.load_round(k), there.load_round(k))
    a, b = students[0].state_dict(), students[2].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------- faults
class FaultyPolicy(Teacher):
    """A student's policy that makes its worker fail once, mid-episode.

    The first worker to rename ``flag`` away fails at its ``at``-th decision:
    ``exit`` ends its process, ``raise`` raises as a crashed simulation would,
    ``hang`` writes its pid to ``flag.pid`` and waits to be killed.
    """

    def __init__(self, policy: StudentPolicy, flag: Path, mode: str, at: int = 10):
        self.policy, self.flag, self.mode, self.at = policy, flag, mode, at
        self.calls = 0

    def reset(self) -> None:
        self.policy.reset()

    def act(self, observations, masks, state=None):
        self.calls += 1
        if self.calls == self.at and self._claim():
            if self.mode == "exit":
                os._exit(1)
            if self.mode == "raise":
                raise RuntimeError("simulated SUMO crash")
            Path(f"{self.flag}.pid").write_text(str(os.getpid()))
            time.sleep(60)
        return self.policy.act(observations, masks, state)

    def _claim(self) -> bool:
        try:
            os.rename(self.flag, f"{self.flag}.taken")
        except FileNotFoundError:
            return False
        return True


def kill_when_asked(pid_file: Path, timeout: float = 60.0) -> threading.Thread:
    """Kill the process whose pid appears in ``pid_file``, from a thread."""

    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["exit", "raise", "hang"])
def test_a_failed_worker_is_replaced_and_no_data_is_lost(
    ray_collectors, tmp_path, cross, reference, mode
):
    env, batcher, student = cross
    flag = tmp_path / "fail-once"
    flag.touch()
    behaviour = FaultyPolicy(StudentPolicy(student, batcher), flag, mode)
    watcher = kill_when_asked(Path(f"{flag}.pid")) if mode == "hang" else None

    collector = ray_collectors[2]
    replaced = collector.replaced
    data, episodes = collector.collect(
        behaviour, BETA, SEEDS, ROUND, _rng(), progress=False
    )
    if watcher is not None:
        watcher.join(timeout=1)

    assert not flag.exists()  # a worker did fail
    assert collector.replaced == replaced + 1
    assert_same(data, reference[0])
    assert episodes == reference[1]


def test_an_episode_that_always_fails_ends_the_collection(
    ray_collectors, tmp_path, cross, reference
):
    env, batcher, student = cross

    class Broken(FaultyPolicy):
        def _claim(self) -> bool:
            return True

    behaviour = Broken(StudentPolicy(student, batcher), tmp_path, "raise", at=1)
    collector = ray_collectors[1]
    replaced = collector.replaced
    collector.max_attempts = 2
    with pytest.raises(RuntimeError, match="failed 2 times.*simulated SUMO"):
        collector.collect(behaviour, BETA, [0], ROUND, _rng(), progress=False)
    collector.max_attempts = 3
    assert collector.replaced == replaced + 1

    # the replacement collects as if nothing had happened
    policy = StudentPolicy(student, batcher)
    data, _ = collector.collect(policy, BETA, SEEDS, ROUND, _rng(), progress=False)
    assert_same(data, reference[0])


def test_bad_settings_fail_at_once_with_the_workers_error(ray_session, cross):
    with pytest.raises(UserError, match="missing/teacher.pt"):
        ray_collector(cross, 1, teacher="missing/teacher.pt")


# ---------------------------------------------------------------------- CLI
def test_the_distill_flags_set_the_collect_keys():
    from marlkd.cli import build_parser, config_from_args

    parser = build_parser()
    args = parser.parse_args(["distill", "--workers", "3", "--ray-address", "auto"])
    collect = config_from_args(args).collect
    assert (collect.workers, collect.ray_address) == (3, "auto")
    collect = config_from_args(parser.parse_args(["distill"])).collect
    assert (collect.workers, collect.ray_address) == (0, None)
    with pytest.raises(UserError, match="collect.workers is -1"):
        config_from_args(parser.parse_args(["distill", "--workers", "-1"]))


def test_resume_may_change_where_episodes_run(tmp_path, monkeypatch):
    from marlkd import cli
    from marlkd.config import save_config

    save_config(load_config(None, ["collect.workers=0"]), tmp_path / "config.yaml")
    seen = {}

    def fake_distill(config, run_dir, resume=False, progress=True):
        seen.update(config=config, resume=resume)

    monkeypatch.setattr("marlkd.distill.dagger.distill", fake_distill)
    argv = ["distill", "--resume", "--out", str(tmp_path), "--no-eval"]
    assert cli.main([*argv, "--workers", "2", "--ray-address", "auto"]) == 0
    assert seen["resume"]
    assert (seen["config"].collect.workers, seen["config"].collect.ray_address) == (
        2,
        "auto",
    )


# ----------------------------------------------------- reinforcement learning
def rl_collect(collector, student, batcher, epsilon=0.3, rng=None, **record):
    """An RL collection: ε-greedy on ``student``, rewards and global states."""
    from marlkd.rl.behaviour import EpsilonGreedy

    return collector.collect(
        EpsilonGreedy(student, batcher, epsilon),
        0.0,
        SEEDS,
        ROUND,
        _rng() if rng is None else rng,
        progress=False,
        **{"label": False, "rl": True, "state": True, **record},
    )


@pytest.fixture(scope="module")
def rl_reference(cross):
    env, batcher, student = cross
    local = LocalCollector(env, None, batcher)
    return rl_collect(local, student, batcher)


def test_rl_samples_chain_into_episodes(cross, rl_reference):
    env, batcher, _ = cross
    data, episodes = rl_reference
    assert data.teacher_scores is None and data.teacher_action is None
    assert list(dict.fromkeys(data.episode.tolist())) == SEEDS
    rows = np.arange(len(data))
    assert data.mask[rows, data.action].all()
    assert np.isfinite(data.reward).all() and (data.reward != 0).any()
    for seed in SEEDS:
        at = np.flatnonzero(data.episode == seed)
        assert data.step[at].tolist() == list(range(len(at)))  # one agent
        # what follows a decision is what the next one sees
        np.testing.assert_array_equal(data.next_obs[at[:-1]], data.obs[at[1:]])
        np.testing.assert_array_equal(data.next_mask[at[:-1]], data.mask[at[1:]])
        np.testing.assert_array_equal(data.next_state[at[:-1]], data.state[at[1:]])
    assert data.state.shape == (len(data), env.state_space.shape[0])


@pytest.mark.parametrize("workers", [1, 2])
def test_same_rl_data_for_any_number_of_workers(
    ray_collectors, cross, rl_reference, workers
):
    env, batcher, student = cross
    data, episodes = rl_collect(ray_collectors[workers], student, batcher)
    assert_same(data, rl_reference[0])
    assert episodes == rl_reference[1]


def test_the_exploration_draws_shape_the_rl_data(cross, rl_reference):
    env, batcher, student = cross
    local = LocalCollector(env, None, batcher)
    other, _ = rl_collect(local, student, batcher, rng=np.random.default_rng(1))
    assert len(other) == len(rl_reference[0])
    assert not np.array_equal(other.action, rl_reference[0].action)


def test_rl_samples_labelled_on_workers_when_kickstarting(
    ray_collectors, cross, rl_reference
):
    env, batcher, student = cross
    data, _ = rl_collect(ray_collectors[2], student, batcher, label=True)
    assert data.teacher_scores is not None and data.teacher_action is not None
    np.testing.assert_array_equal(data.action, rl_reference[0].action)
    with pytest.raises(ValueError, match="behaviour policy takes every action"):
        ray_collectors[1].collect(None, 0.0, SEEDS, label=False, rl=True)


def _tiny_rl(algorithm: str):
    from marlkd.rl.config import PPOConfig, RLConfig

    if algorithm == "dqn":
        config = RLConfig(
            episodes=4, episodes_per_iteration=2, learning_starts=20, batch_size=16,
            eval_every=2, kickstart=1.0, kickstart_episodes=4,
        )  # fmt: skip
    else:
        config = PPOConfig(
            episodes=4, episodes_per_update=2, minibatch_size=16, update_epochs=2,
            eval_every=2, critic="central", kickstart=1.0, kickstart_episodes=4,
        )  # fmt: skip
    return config


@pytest.mark.parametrize("algorithm", ["dqn", "ppo"])
def test_rl_on_ray_workers_learns_what_it_learns_in_process(
    ray_collectors, cross, algorithm
):
    from marlkd.rl.dqn import train_dqn
    from marlkd.rl.ppo import train_ppo

    env, batcher, student = cross
    train = train_dqn if algorithm == "dqn" else train_ppo
    results = {}
    for workers in (0, 2):
        network = copy.deepcopy(student)
        collector = (
            LocalCollector(env, MaxPressure(env.specs), batcher)
            if workers == 0
            else ray_collectors[workers]
        )
        curve = train(
            env, network, _tiny_rl(algorithm), batcher=batcher, collector=collector,
            progress=False,
        )  # fmt: skip
        results[workers] = curve, network.state_dict()
    (curve, weights), (ray_curve, ray_weights) = results[0], results[2]
    assert [c["episode"] for c in curve] == [2, 4]
    assert curve == ray_curve
    assert not all(torch.equal(weights[k], student.state_dict()[k]) for k in weights)
    for key, value in weights.items():
        torch.testing.assert_close(ray_weights[key], value, rtol=1e-5, atol=1e-6)
