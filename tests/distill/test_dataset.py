"""Teacher-labelled transitions on disk: round trips, atomic writes, bad files."""

from __future__ import annotations

import json
import os
from dataclasses import fields

import numpy as np
import pytest

from marlkd.distill.dataset import FORMAT, DatasetFolder, Transitions
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import user_scenario
from marlkd.errors import UserError
from marlkd.rollout.batching import AgentBatcher
from marlkd.rollout.local import LocalCollector
from marlkd.students import AgentLayout
from marlkd.teachers.max_pressure import MaxPressure

# name -> dtype of every array in a round file, as the module docstring gives it
DOCUMENTED = {
    "obs": np.float32,
    "agent": np.int64,
    "mask": np.bool_,
    "teacher_scores": np.float32,
    "teacher_action": np.int64,
    "round": np.int32,
    "teacher_features": np.float32,
}


def transitions(n: int, *, features: bool, round_index: int = 0, seed: int = 0):
    rng = np.random.default_rng(seed)
    mask = rng.random((n, 4)) < 0.7
    mask[:, 0] = True
    return Transitions(
        obs=rng.normal(size=(n, 6)).astype(np.float32),
        agent=rng.integers(0, 3, n).astype(np.int64),
        mask=mask,
        teacher_scores=rng.normal(size=(n, 4)).astype(np.float32),
        teacher_action=rng.integers(0, 4, n).astype(np.int64),
        round=np.full(n, round_index, dtype=np.int32),
        teacher_features=rng.normal(size=(n, 5)).astype(np.float32)
        if features
        else None,
    )


def assert_same(a: Transitions, b: Transitions) -> None:
    for f in fields(Transitions):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if x is None or y is None:
            assert x is None and y is None, f.name
            continue
        assert x.dtype == y.dtype, f.name
        np.testing.assert_array_equal(x, y, err_msg=f.name)


@pytest.mark.parametrize("features", [False, True])
def test_round_trip(tmp_path, features):
    data = transitions(50, features=features)
    data.save(tmp_path / "r.npz")
    back = Transitions.load(tmp_path / "r.npz")
    assert_same(data, back)
    assert len(back) == 50
    assert (back.teacher_features is not None) == features


def test_folder_rounds_aggregate_in_order(tmp_path):
    folder = DatasetFolder(tmp_path / "dataset")
    parts = [transitions(n, features=False, round_index=k, seed=k) for k, n in
             enumerate([7, 3, 5])]  # fmt: skip
    for k in (2, 0, 1):
        folder.save_round(k, parts[k])
    assert folder.rounds() == [0, 1, 2]
    assert folder.has_round(1) and not folder.has_round(3)
    everything = folder.load_all()
    assert everything.round.tolist() == [0] * 7 + [1] * 3 + [2] * 5
    np.testing.assert_array_equal(
        everything.obs, np.concatenate([p.obs for p in parts])
    )


def test_concat_drops_features_unless_every_part_has_them():
    mixed = Transitions.concat(
        [transitions(4, features=True), transitions(2, features=False)]
    )
    assert len(mixed) == 6 and mixed.teacher_features is None
    both = Transitions.concat(
        [transitions(4, features=True), transitions(2, features=True, seed=1)]
    )
    assert both.teacher_features.shape == (6, 5)


def test_concat_of_nothing_is_an_empty_dataset_error():
    with pytest.raises(UserError, match="empty"):
        Transitions.concat([])
    with pytest.raises(UserError, match="empty"):
        Transitions.concat([transitions(0, features=False)])


def test_subset_keeps_missing_features_missing():
    data = transitions(10, features=False)
    part = data.subset(np.array([1, 3]))
    assert part.teacher_features is None
    np.testing.assert_array_equal(part.agent, data.agent[[1, 3]])


# ------------------------------------------------------------ atomic writes
def test_save_leaves_no_temporary_files(tmp_path):
    folder = DatasetFolder(tmp_path)
    folder.save_round(0, transitions(20, features=True))
    folder.write_meta({"agents": ["a"]})
    folder.save_round(0, transitions(30, features=True, seed=1))  # overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "round_000.npz"]


def test_failed_write_keeps_the_old_round(tmp_path, monkeypatch):
    folder = DatasetFolder(tmp_path)
    old = transitions(20, features=False)
    folder.save_round(0, old)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        folder.save_round(0, transitions(30, features=False, seed=1))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["round_000.npz"]
    assert_same(folder.load_round(0), old)


# ----------------------------------------------------------------- bad files
def corrupt(path, how: str) -> None:
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(b"not a dataset\n" * 20)
    elif how == "damaged":
        damaged = bytearray(good)
        for i in range(100, 160):  # inside the first compressed array
            damaged[i] ^= 0xFF
        path.write_bytes(bytes(damaged))


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "damaged"])
def test_corrupt_round_names_the_file(tmp_path, how):
    folder = DatasetFolder(tmp_path)
    folder.save_round(3, transitions(40, features=False))
    corrupt(folder.round_path(3), how)
    with pytest.raises(UserError) as info:
        folder.load_round(3)
    assert str(folder.round_path(3)) in str(info.value)
    assert "delete it" in str(info.value)


def test_round_without_a_field_is_refused(tmp_path):
    np.savez(tmp_path / "round_000.npz", obs=np.zeros((2, 3)), agent=np.zeros(2))
    with pytest.raises(UserError, match="lacks mask, round, teacher_action"):
        DatasetFolder(tmp_path).load_round(0)


def test_meta_format(tmp_path):
    folder = DatasetFolder(tmp_path / "d")
    with pytest.raises(UserError, match="no meta.json"):
        folder.read_meta()
    folder.write_meta({"agents": ["a", "b"], "obs_size": 6, "num_actions": 4})
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta == {"format": FORMAT, "agents": ["a", "b"], "obs_size": 6,
                    "num_actions": 4}  # fmt: skip
    assert folder.read_meta() == meta

    (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(UserError, match=f"format 99, this marlkd reads {FORMAT}"):
        folder.read_meta()


# ------------------------------------------------- the documented file format
def test_collected_round_has_the_documented_format(tmp_path, cross_net, cross_routes):
    scenario = user_scenario(cross_net, [cross_routes], None, None)
    env = TrafficSignalEnv(scenario, TrafficEnvConfig(duration=300))
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
        batcher = AgentBatcher(
            env.possible_agents, layout.max_obs_size, layout.max_actions
        )
        collector = LocalCollector(env, MaxPressure(env.specs), batcher)
        data, episodes = collector.collect(None, 1.0, [0], round_index=2)
    finally:
        env.close()
    DatasetFolder(tmp_path).save_round(2, data)

    # plain numpy reads it, with the documented names, dtypes and shapes
    with np.load(tmp_path / "round_002.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == set(DOCUMENTED) - {"teacher_features"}
        n = len(arrays["agent"])
        assert n == 300 // 10 - 1  # one agent, a decision every 10 s
        for name in arrays.files:
            assert arrays[name].dtype == DOCUMENTED[name], name
            assert len(arrays[name]) == n
        assert arrays["obs"].shape == (n, layout.max_obs_size)
        assert arrays["mask"].shape == (n, layout.max_actions)
        assert arrays["teacher_scores"].shape == (n, layout.max_actions)
        assert set(arrays["round"].tolist()) == {2}
        assert set(arrays["agent"].tolist()) == {0}
        # the teacher's action is allowed and scores best among allowed ones
        rows = np.arange(n)
        action = arrays["teacher_action"]
        assert arrays["mask"][rows, action].all()
        allowed = np.where(arrays["mask"], arrays["teacher_scores"], -np.inf)
        np.testing.assert_allclose(allowed[rows, action], allowed.max(axis=1))
    assert episodes[0]["seed"] == 0 and episodes[0]["vehicles"] > 0


# ----------------------------------------------------- reinforcement learning
def rl_transitions(n: int, *, labelled: bool, seed: int = 0) -> Transitions:
    rng = np.random.default_rng(seed)
    data = transitions(n, features=False, seed=seed)
    if not labelled:
        data.teacher_scores = data.teacher_action = None
    data.action = rng.integers(0, 4, n).astype(np.int64)
    data.reward = rng.normal(size=n).astype(np.float32)
    data.next_obs = rng.normal(size=(n, 6)).astype(np.float32)
    data.next_mask = data.mask[::-1].copy()
    data.episode = np.full(n, seed, dtype=np.int64)
    data.step = np.arange(n, dtype=np.int32)
    return data


def test_rl_samples_concat_with_or_without_labels():
    parts = [rl_transitions(3, labelled=False, seed=s) for s in (0, 1)]
    data = Transitions.concat(parts)
    assert data.teacher_scores is None and data.state is None
    assert data.episode.tolist() == [0, 0, 0, 1, 1, 1]
    np.testing.assert_array_equal(data.reward[3:], parts[1].reward)
    # a labelled and an unlabelled part: labels only where every part has them
    mixed = Transitions.concat([rl_transitions(2, labelled=True), parts[0]])
    assert mixed.teacher_action is None and len(mixed.next_obs) == 5


def test_rl_samples_round_trip_and_old_rounds_still_load(tmp_path):
    data = rl_transitions(5, labelled=True)
    data.save(tmp_path / "rl.npz")
    assert_same(Transitions.load(tmp_path / "rl.npz"), data)

    # a round written before the RL arrays existed: exactly the documented keys
    old = transitions(4, features=True)
    arrays = {k: getattr(old, k) for k in DOCUMENTED}
    np.savez_compressed(tmp_path / "round_000.npz", **arrays)
    loaded = DatasetFolder(tmp_path).load_round(0)
    assert_same(loaded, old)
    assert loaded.action is None and loaded.next_obs is None
