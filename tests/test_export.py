"""Export: the files and metadata, and outputs equal to PyTorch's on real data."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from marlkd.config import RunConfig, save_config
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.errors import UserError
from marlkd.export import (
    agent_descriptions,
    export_run,
    export_student,
    network_from_student,
    quantize_int8,
)
from marlkd.runtime import Runtime
from marlkd.runtime.numpy_net import dense_tensors
from marlkd.students import AgentEntry, AgentLayout, make_student, save_student
from marlkd.teachers import make_controller

SCENARIO = "grid2x2"
DURATION_S = 300.0
KINDS = [
    ("phase", {}),
    ("phase", {"agent_embedding": 3, "hidden": [16, 8, 8]}),
    ("mlp", {"agent_embedding": 4, "hidden": [32, 32]}),
    ("mlp", {"shared": False, "hidden": [16]}),
]
KIND_IDS = ["phase", "phase-embedding", "mlp", "mlp-per-agent"]


# ------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=1)
def traffic_data():
    """Real observations of grid2x2: MaxPressure drives for 20 decisions.

    Returns the layout, the agent specs and, per decision, every agent's
    (observations, masks).
    """
    env = TrafficSignalEnv(
        get_scenario(SCENARIO), TrafficEnvConfig(duration=DURATION_S)
    )
    try:
        teacher = make_controller("max-pressure", env)
        observations, infos = env.reset(seed=1)
        steps = []
        for _ in range(20):
            masks = {a: infos[a]["action_mask"] for a in env.agents}
            steps.append((observations, masks))
            observations, _, _, _, infos = env.step(teacher(observations, masks))
        layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
        return SimpleNamespace(layout=layout, specs=dict(env.specs), steps=steps)
    finally:
        env.close()


def build_student(kind: str, kwargs: dict, layout: AgentLayout, seed: int = 0):
    torch.manual_seed(seed)
    return make_student(kind, layout, **kwargs).eval()


def padded(layout: AgentLayout, steps, rows: int | None = None):
    """Every recorded (agent, decision) as one padded batch, or its first rows."""
    obs, agent, mask = [], [], []
    for observations, masks in steps:
        for name, o in observations.items():
            i = layout.index(name)
            row = np.zeros(layout.max_obs_size, dtype=np.float32)
            row[: len(o)] = o
            allowed = np.zeros(layout.max_actions, dtype=bool)
            allowed[: len(masks[name])] = masks[name]
            obs.append(row)
            agent.append(i)
            mask.append(allowed)
    obs, agent, mask = np.stack(obs), np.array(agent), np.stack(mask)
    return (obs[:rows], agent[:rows], mask[:rows]) if rows else (obs, agent, mask)


def torch_logits(student, obs, agent, mask) -> np.ndarray:
    with torch.no_grad():
        out = student(
            torch.from_numpy(obs), torch.from_numpy(agent), torch.from_numpy(mask)
        )
    return out.logits.numpy()


def make_run(
    folder: Path, kind: str = "phase", kwargs: dict | None = None, seed: int = 0
) -> Path:
    """A run folder as `marlkd distill` leaves it, with an untrained student."""
    data = traffic_data()
    config = RunConfig()
    config.scenario.name = SCENARIO
    config.env.duration = DURATION_S
    config.student.kind = kind
    save_config(config, folder / "config.yaml")
    student = build_student(kind, kwargs or {}, data.layout, seed)
    save_student(student, folder / "checkpoints" / "student.pt")
    return folder


def hand_layout() -> AgentLayout:
    """Three agents of obs sizes 5/8/11 and 2/3/4 actions, with feature maps."""
    rng = np.random.default_rng(0)
    agents = []
    for i, (d, a) in enumerate(((5, 2), (8, 3), (11, 4))):
        m = np.zeros((d, a, 3), dtype=np.float32)
        m[np.arange(d), np.arange(d) % a, 0] = 1.0
        m[:, :, 1] = rng.normal(size=(d, a)) * (rng.random((d, a)) < 0.3)
        m[np.arange(d), np.arange(d) % a, 2] = rng.uniform(0.5, 2, d)
        scale = rng.uniform(1, 20, d).astype(np.float32)
        agents.append(AgentEntry(f"tls{i}", d, a, scale, m))
    return AgentLayout(tuple(agents))


# --------------------------------------------------------- equal to PyTorch
@pytest.mark.parametrize(("kind", "kwargs"), KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("network_format", ["onnx", "torchscript"])
def test_exported_outputs_equal_pytorch_on_recorded_observations(
    kind, kwargs, network_format, tmp_path
):
    data = traffic_data()
    student = build_student(kind, kwargs, data.layout)
    export_student(student, tmp_path, network_format=network_format)
    backend = "onnxruntime" if network_format == "onnx" else "torchscript"
    runtime = Runtime.load(tmp_path, backend=backend)

    # B = 1, B = all agents at one decision, and every recorded row at once.
    n = data.layout.num_agents
    for rows in (1, n, None):
        obs, agent, mask = padded(data.layout, data.steps, rows)
        logits, actions = runtime.run(obs, agent, mask)
        expected = torch_logits(student, obs, agent, mask)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(actions, expected.argmax(axis=1))
        assert logits.shape == (len(agent), data.layout.max_actions)
        assert actions.dtype == np.int64


@pytest.mark.parametrize(("kind", "kwargs"), KINDS, ids=KIND_IDS)
def test_agents_of_different_sizes_share_one_padded_batch(kind, kwargs, tmp_path):
    layout = hand_layout()
    student = build_student(kind, kwargs, layout)
    export_student(student, tmp_path)
    runtime = Runtime.load(tmp_path, backend="onnxruntime")

    rng = np.random.default_rng(1)
    agent = np.array([2, 0, 1, 1, 2, 0, 2])
    obs = np.zeros((len(agent), layout.max_obs_size), dtype=np.float32)
    mask = layout.action_exists()[agent]
    for row, i in enumerate(agent):
        obs[row, : layout.agents[i].obs_size] = rng.uniform(0, 10, i * 3 + 5)
        mask[row, 0] = row % 2 == 0 or layout.agents[i].num_actions < 3
    logits, actions = runtime.run(obs, agent, mask)
    expected = torch_logits(student, obs, agent, mask)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(actions, expected.argmax(axis=1))
    assert all(mask[row, a] for row, a in enumerate(actions))

    # A mask that allows padded actions still never picks an action an agent
    # lacks, as in PyTorch.
    everything = np.ones_like(mask)
    logits, actions = runtime.run(obs, agent, everything)
    expected = torch_logits(student, obs, agent, everything)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    assert all(actions < layout.action_exists()[agent].sum(axis=1))


# ------------------------------------------------------------------- int8
@pytest.mark.parametrize(("kind", "kwargs"), KINDS, ids=KIND_IDS)
def test_int8_export_is_the_network_with_int8_rounded_weights(kind, kwargs, tmp_path):
    data = traffic_data()
    student = build_student(kind, kwargs, data.layout)
    meta = export_student(student, tmp_path / "int8", quantize="int8")
    float_meta = export_student(student, tmp_path / "float")

    # Per tensor: w = q * max|w| / 127, q an int8 in [-127, 127].
    network = quantize_int8(network_from_student(student))
    for name in network.structure["quantized"]:
        q, scale = network.tensors[f"{name}_q"], network.tensors[f"{name}_scale"]
        assert q.dtype == np.int8 and np.abs(q).max() == 127
        original = network_from_student(student).tensors[name]
        assert np.abs(q * scale - original).max() <= scale / 2 + 1e-7

    # The runtime computes the float network with those rounded weights.
    rounded = dense_tensors(network.structure, network.tensors)
    float_runtime = Runtime.load(tmp_path / "float", backend="numpy")
    for name in network.structure["quantized"]:
        float_runtime._numpy.t[name] = rounded[name]
    obs, agent, mask = padded(data.layout, data.steps)
    logits, actions = Runtime.load(tmp_path / "int8", backend="onnxruntime").run(
        obs, agent, mask
    )
    expected, _ = float_runtime._numpy.run(obs, agent, mask)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)

    # Each weight takes one byte instead of four; each tensor adds a scale and
    # two constant nodes.
    assert meta["quantize"] == "int8"
    saved = (
        float_meta["files"]["student.onnx"]["bytes"]
        - meta["files"]["student.onnx"]["bytes"]
    )
    quantized = meta["network"]["quantized"]
    weights = sum(network.tensors[f"{n}_q"].size for n in quantized)
    assert 3 * weights - 160 * len(quantized) <= saved <= 3 * weights


# --------------------------------------------------------------- metadata
def test_export_run_writes_network_and_metadata(tmp_path):
    run = make_run(tmp_path / "run")
    out, meta = export_run(run)

    assert out == run / "export"
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "student.onnx"]
    assert json.loads((out / "metadata.json").read_text()) == meta

    data = traffic_data()
    assert meta["format"] == "marlkd.export" and meta["version"] == 1
    assert meta["network_format"] == "onnx" and meta["quantize"] is None
    assert meta["student"]["kind"] == "phase"
    student = build_student("phase", {}, data.layout)
    assert meta["student"]["parameters"] == student.num_parameters()
    assert meta["padded"] == {
        "obs_size": data.layout.max_obs_size,
        "num_actions": data.layout.max_actions,
    }
    assert [a["name"] for a in meta["agents"]] == list(data.specs)
    for entry, spec in zip(meta["agents"], data.specs.values(), strict=True):
        assert entry["obs_size"] == spec.obs_size
        assert entry["num_actions"] == spec.num_phases
        assert entry["actions"] == list(spec.plan.green_states)
        assert entry["obs_slices"] == {
            block: [s.start, s.stop] for block, s in spec.obs_slices().items()
        }
        np.testing.assert_allclose(
            entry["obs_scale"], spec.obs_scale(meta["env"]["max_green"])
        )
        assert entry["network"] == "student.onnx"
    assert meta["scenario"]["name"] == SCENARIO
    assert meta["env"]["duration"] == DURATION_S
    assert meta["run"] == str(run.resolve())

    for name, entry in meta["files"].items():
        data_bytes = (out / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data_bytes).hexdigest()
        assert entry["bytes"] == len(data_bytes)


def test_export_run_torchscript_into_chosen_folder(tmp_path):
    run = make_run(tmp_path / "run", "mlp")
    out, meta = export_run(run, tmp_path / "ts", network_format="torchscript")
    assert out == tmp_path / "ts"
    assert set(meta["files"]) == {"student.pt"}
    assert {a["network"] for a in meta["agents"]} == {"student.pt"}
    runtime = Runtime.load(out)
    assert runtime.backend == "torchscript"
    observations, masks = traffic_data().steps[0]
    assert set(runtime.act(observations, masks)) == set(observations)


def test_agent_descriptions_without_specs_name_actions_by_index():
    agents = agent_descriptions(hand_layout())
    assert [a["actions"] for a in agents] == [
        ["0", "1"],
        ["0", "1", "2"],
        ["0", "1", "2", "3"],
    ]
    assert all(a["obs_slices"] == {} for a in agents)


def test_export_run_rejects_a_folder_without_a_run(tmp_path):
    with pytest.raises(UserError, match="not a marlkd run folder"):
        export_run(tmp_path)
    save_config(RunConfig(), tmp_path / "config.yaml")
    with pytest.raises(UserError, match="student.pt not found"):
        export_run(tmp_path)


def test_unknown_format_and_quantization_are_user_errors(tmp_path):
    student = build_student("mlp", {}, hand_layout())
    with pytest.raises(UserError, match="unknown export format 'tflite'"):
        export_student(student, tmp_path, network_format="tflite")
    with pytest.raises(UserError, match="unknown quantization 'int4'"):
        export_student(student, tmp_path, quantize="int4")
