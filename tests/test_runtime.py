"""The torch-free runtime: checks on load, both backends, deploy in SUMO."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from test_export import (
    DURATION_S,
    KIND_IDS,
    KINDS,
    SCENARIO,
    build_student,
    make_run,
    padded,
    traffic_data,
)

from marlkd.cli import build_parser, main
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.metrics import METRIC_KEYS
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.errors import UserError
from marlkd.export import deploy, export_run, export_student
from marlkd.rollout.batching import AgentBatcher
from marlkd.runtime import Runtime
from marlkd.runtime.onnx_reader import read_initializers
from marlkd.students import load_student
from marlkd.students.policy import StudentPolicy


def _wired() -> bool:
    commands = build_parser()._subparsers._group_actions[0].choices
    return {"export", "deploy"} <= set(commands)


cli_wired = pytest.mark.skipif(
    not _wired(), reason="marlkd.cli has no export and deploy commands yet"
)


@pytest.fixture(scope="module")
def phase_export(tmp_path_factory):
    """An export of an untrained phase student on grid2x2."""
    folder = tmp_path_factory.mktemp("export")
    export_student(build_student("phase", {}, traffic_data().layout), folder)
    return folder


def one_line(message: str) -> bool:
    return "\n" not in message and len(message) < 400


# ----------------------------------------------------------- no torch at all
def test_importing_the_runtime_imports_neither_torch_nor_onnxruntime():
    code = (
        "import marlkd.runtime, sys; "
        "assert 'torch' not in sys.modules; "
        "assert 'onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_loading_acting_and_deploying_never_import_torch(tmp_path):
    run = make_run(tmp_path / "run")
    out, _ = export_run(run)
    code = f"""
import sys
import numpy as np
from marlkd.runtime import Runtime
from marlkd.export import deploy
from marlkd.envs.traffic.env import TrafficEnvConfig
for backend in ("numpy", "onnxruntime"):
    runtime = Runtime.load({str(out)!r}, backend=backend)
    agents = runtime.metadata["agents"][:2]
    runtime.act({{a["name"]: np.zeros(a["obs_size"], np.float32) for a in agents}},
                {{a["name"]: np.ones(a["num_actions"], bool) for a in agents}})
deploy({str(out)!r}, env_config=TrafficEnvConfig(duration=60), progress=False)
assert "torch" not in sys.modules, "torch was imported"
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------- bad exports
def test_a_missing_network_file_names_it_and_the_fix(phase_export, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_bytes(
        (phase_export / "metadata.json").read_bytes()
    )
    with pytest.raises(UserError) as info:
        Runtime.load(broken)
    message = str(info.value)
    assert one_line(message)
    assert "student.onnx is missing" in message and "re-export" in message


def test_an_altered_network_file_is_detected(phase_export, tmp_path):
    altered = tmp_path / "altered"
    altered.mkdir()
    for name in ("metadata.json", "student.onnx"):
        (altered / name).write_bytes((phase_export / name).read_bytes())
    data = bytearray((altered / "student.onnx").read_bytes())
    data[-20] ^= 0x01  # one bit of one weight
    (altered / "student.onnx").write_bytes(bytes(data))
    with pytest.raises(UserError) as info:
        Runtime.load(altered)
    message = str(info.value)
    assert one_line(message)
    assert "student.onnx does not match its SHA-256" in message
    assert "re-export" in message


def test_edited_or_missing_metadata_is_detected(phase_export, tmp_path):
    edited = tmp_path / "edited"
    edited.mkdir()
    (edited / "student.onnx").write_bytes((phase_export / "student.onnx").read_bytes())
    with pytest.raises(UserError, match="metadata.json not found"):
        Runtime.load(edited)

    meta = json.loads((phase_export / "metadata.json").read_text())
    meta["agents"][0]["obs_scale"][0] *= 2
    (edited / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as info:
        Runtime.load(edited)
    assert one_line(str(info.value))
    assert "metadata.json does not match its checksum" in str(info.value)

    (edited / "metadata.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        Runtime.load(edited)


def test_an_unknown_agent_is_named(phase_export):
    runtime = Runtime.load(phase_export)
    obs = {"nowhere": np.zeros(5, dtype=np.float32)}
    with pytest.raises(UserError) as info:
        runtime.act(obs, {"nowhere": np.ones(2, dtype=bool)})
    message = str(info.value)
    assert one_line(message)
    assert "agent 'nowhere' is not in the export" in message

    data = traffic_data()
    observations, masks = data.steps[0]
    both = {**observations, "nowhere": obs["nowhere"]}
    with pytest.raises(UserError, match="'nowhere'"):
        runtime.act(both, {**masks, "nowhere": np.ones(2, dtype=bool)})


def test_a_wrong_observation_or_missing_mask_is_a_user_error(phase_export):
    runtime = Runtime.load(phase_export)
    name = runtime.agents[0]
    with pytest.raises(UserError, match=f"agent '{name}' got an observation"):
        runtime.act({name: np.zeros(3)}, {name: np.ones(4, dtype=bool)})
    observations, masks = traffic_data().steps[0]
    masks = {a: m for a, m in masks.items() if a != name}
    with pytest.raises(UserError, match=f"agent '{name}' has an observation but no"):
        runtime.act(observations, masks)
    assert runtime.act({}, {}) == {}


def test_backends_that_cannot_run_an_export_are_user_errors(phase_export, tmp_path):
    with pytest.raises(UserError, match="unknown runtime backend 'gpu'"):
        Runtime.load(phase_export, backend="gpu")
    with pytest.raises(UserError, match="holds an ONNX network"):
        Runtime.load(phase_export, backend="torchscript")
    export_student(
        build_student("mlp", {}, traffic_data().layout),
        tmp_path,
        network_format="torchscript",
    )
    with pytest.raises(UserError, match="TorchScript network"):
        Runtime.load(tmp_path, backend="numpy")
    assert Runtime.load(tmp_path).backend == "torchscript"


# ------------------------------------------------------ numpy = onnxruntime
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize(("kind", "kwargs"), KINDS, ids=KIND_IDS)
def test_numpy_path_gives_the_actions_of_onnxruntime(kind, kwargs, quantize, tmp_path):
    data = traffic_data()
    export_student(
        build_student(kind, kwargs, data.layout), tmp_path, quantize=quantize
    )
    numpy_rt = Runtime.load(tmp_path, backend="numpy")
    ort_rt = Runtime.load(tmp_path, backend="onnxruntime")

    obs, agent, mask = padded(data.layout, data.steps)
    logits, actions = numpy_rt.run(obs, agent, mask)
    ort_logits, ort_actions = ort_rt.run(obs, agent, mask)
    np.testing.assert_array_equal(actions, ort_actions)
    np.testing.assert_allclose(logits, ort_logits, rtol=0, atol=1e-5)

    # One agent alone (the per-agent numpy path), and any subset in a batch.
    for observations, masks in data.steps:
        for name in observations:
            alone = ({name: observations[name]}, {name: masks[name]})
            assert numpy_rt.act(*alone) == ort_rt.act(*alone)
        subset = list(observations)[1:3]
        picked = ({n: observations[n] for n in subset}, {n: masks[n] for n in subset})
        assert numpy_rt.act(*picked) == ort_rt.act(*picked)
        assert set(numpy_rt.act(*picked)) == set(subset)


@pytest.mark.parametrize("kind", ["phase", "mlp"])
def test_one_agent_at_a_time_decides_as_the_batch_in_closed_loop(kind, tmp_path):
    from marlkd.evaluate import simulate

    export_student(build_student(kind, {}, traffic_data().layout, seed=5), tmp_path)
    alone, batch = Runtime.load(tmp_path), Runtime.load(tmp_path, backend="onnxruntime")
    decisions = []

    def both(observations, masks, state=None):
        actions = batch.act(observations, masks)
        for name, obs in observations.items():
            single = alone.act({name: obs}, {name: masks[name]})
            decisions.append(single[name] == actions[name])
        return actions

    env = TrafficSignalEnv(get_scenario(SCENARIO), TrafficEnvConfig(duration=600))
    try:
        simulate(env, both, episodes=1, seed=2, progress=False)
    finally:
        env.close()
    assert len(decisions) == 4 * 59 and all(decisions)


def test_onnx_initializers_are_read_without_the_onnx_package(phase_export):
    data = (phase_export / "student.onnx").read_bytes()
    ours = read_initializers(data)
    model = onnx.load_from_string(data)
    theirs = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(ours) == set(theirs)
    for name, array in theirs.items():
        assert ours[name].dtype == array.dtype, name
        np.testing.assert_array_equal(ours[name], array)


# ------------------------------------------------------------------ deploy
def test_deploy_delay_equals_the_pytorch_students(tmp_path):
    run = make_run(tmp_path / "run", seed=3)
    out, _ = export_run(run)
    config = TrafficEnvConfig(duration=DURATION_S)
    result = deploy(out, env_config=config, episodes=2, seed=7, progress=False)

    student = load_student(run / "checkpoints" / "student.pt")
    env = TrafficSignalEnv(get_scenario(SCENARIO), config)
    try:
        from marlkd.evaluate import simulate

        batcher = AgentBatcher(
            env.possible_agents, student.layout.max_obs_size, student.layout.max_actions
        )
        expected = simulate(
            env, StudentPolicy(student, batcher), episodes=2, seed=7, progress=False
        )
    finally:
        env.close()

    assert result["scenario"] == SCENARIO and result["signals"] == 4
    delays = [e["avg_delay_s"] for e in result["episodes"]]
    assert delays == [e["avg_delay_s"] for e in expected["episodes"]]
    for key in METRIC_KEYS:
        assert result["mean"][key] == expected["mean"][key]


def test_deploy_rejects_an_export_for_other_signals(tmp_path, cross_net, cross_routes):
    from marlkd.envs.traffic.scenarios import user_scenario

    run = make_run(tmp_path / "run")
    out, _ = export_run(run)
    other = user_scenario(cross_net, [cross_routes], begin=0, end=600)
    with pytest.raises(UserError, match="does not fit this scenario's signals"):
        deploy(out, scenario=other, progress=False)


# --------------------------------------------------------------------- cli
@cli_wired
def test_cli_export_then_deploy_reports_simulate_keys(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    assert (
        main(["--log-level", "WARNING", "export", str(run), "--quantize", "int8"]) == 0
    )
    out = tmp_path / "deploy.json"
    code = main(
        [
            "--log-level", "WARNING", "deploy", str(run / "export"),
            "--duration", "120", "--episodes", "2", "--seed", "4",
            "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert [e["seed"] for e in data["episodes"]] == [4, 5]
    assert {"scenario", "controller", "signals", "episodes", "mean"} <= set(data)
    for entry in (*data["episodes"], data["mean"]):
        assert set(METRIC_KEYS) <= set(entry)
    assert "| mean |" in capsys.readouterr().out


@cli_wired
def test_cli_bad_export_exits_2_with_one_line(phase_export, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metadata.json").write_bytes(
        (phase_export / "metadata.json").read_bytes()
    )
    assert main(["deploy", str(broken), "--duration", "60"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and "student.onnx is missing" in err[0]
    assert main(["export", str(tmp_path / "nothing")]) == 2
