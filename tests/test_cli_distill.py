"""``marlkd distill`` and ``marlkd evaluate``: a whole run, and bad input.

Bad input must end in exit code 2 and one line on stderr, at the default log
level, without a traceback and without writing anything.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from marlkd.cli import main
from marlkd.config import load_config
from marlkd.distill.dagger import distill
from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import get_scenario
from marlkd.students import AgentLayout, load_student, make_student, save_student

MEAN_KEYS = {"avg_delay_s", "avg_wait_s", "mean_queue_veh", "throughput_veh",
             "teleports"}  # fmt: skip
TINY = ["--set", "collect.iterations=2", "--set", "train.epochs=3",
        "--set", "eval.episodes=1"]  # fmt: skip


def run_cli(*args, cwd: Path):
    """marlkd in a fresh interpreter, as a user would run it."""
    return subprocess.run(
        [sys.executable, "-m", "marlkd.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("marlkd: error: ")
    for needle in needles:
        assert needle in lines[0]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``: its bytes' hash and modification time."""
    return {
        p.relative_to(folder): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory, cross_net, cross_routes) -> Path:
    """A finished tiny run on the cross net, without evaluation."""
    run_dir = tmp_path_factory.mktemp("cross-run")
    config = load_config(
        None,
        [
            "scenario.name=null",
            f'scenario.net="{cross_net}"',
            f'scenario.routes=["{cross_routes}"]',
            "env.duration=300",
            "collect.iterations=1",
            "train.epochs=2",
        ],
    )
    distill(config, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def grid_student(tmp_path_factory) -> Path:
    """An (untrained) student checkpoint for the four signals of grid2x2."""
    env = TrafficSignalEnv(get_scenario("grid2x2"), TrafficEnvConfig(duration=60))
    try:
        layout = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
    finally:
        env.close()
    path = tmp_path_factory.mktemp("grid-student") / "student.pt"
    save_student(make_student("phase", layout), path)
    return path


# --------------------------------------------------------------- happy path
def test_distill_then_evaluate_on_more_demand(
    tmp_path, cross_net, cross_routes, capsys
):
    run = tmp_path / "run"
    code = main(
        ["--log-level", "WARNING", "distill", "--net", str(cross_net),
         "--routes", str(cross_routes), "--duration", "300", "--out", str(run),
         *TINY]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"student written to {run / 'checkpoints' / 'student.pt'}" in printed
    assert "| student |" in printed
    config = load_config(run / "config.yaml")
    assert config.env.duration == 300 and config.collect.iterations == 2
    assert config.scenario.routes == [str(cross_routes)]
    first = json.loads((run / "results.json").read_text())
    assert first["demand_scale"] == 1.0

    out = tmp_path / "more-demand.json"
    code = main(
        ["--log-level", "WARNING", "evaluate", str(run), "--episodes", "1",
         "--demand-scale", "1.3", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    assert "cross, demand x1.3, seeds 10000-10000" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report == json.loads((run / "results-demand1.3.json").read_text())
    assert (run / "results-demand1.3.md").exists()
    assert report["demand_scale"] == 1.3 and report["seeds"] == [10000]

    assert list(report["controllers"]) == ["teacher", "student", "fixed", "random"]
    for name, entry in report["controllers"].items():
        assert MEAN_KEYS <= set(entry["mean"]), name
        assert len(entry["episodes"]) == 1
    student = report["controllers"]["student"]["mean"]
    assert 0.0 <= student["agreement"] <= 1.0
    network = load_student(run / "checkpoints" / "student.pt")
    assert student["parameters"] == sum(p.numel() for p in network.parameters()) > 0
    assert student["latency_one_us"] > 0
    # the scaled demand really is more traffic than the run's own evaluation
    teacher_at = {r["demand_scale"]: r["controllers"]["teacher"]["mean"]
                  for r in (first, report)}  # fmt: skip
    assert teacher_at[1.3]["vehicles"] > teacher_at[1.0]["vehicles"]


def test_teacher_path_with_yaml_characters(tmp_path, cross_run, capsys):
    # ": " and " #" would change the path's meaning if it were read as YAML
    folder = tmp_path / "run: #1"
    folder.mkdir()
    teacher = folder / "student.pt"
    shutil.copy(cross_run / "checkpoints" / "student.pt", teacher)
    config = load_config(cross_run / "config.yaml")
    code = main(
        ["--log-level", "WARNING", "distill", "--net", config.scenario.net,
         "--routes", config.scenario.routes[0], "--teacher", str(teacher),
         "--duration", "60", "--out", str(tmp_path / "out"), "--no-eval",
         "--set", "collect.iterations=1", "--set", "train.epochs=1"]
    )  # fmt: skip
    assert code == 0
    assert load_config(tmp_path / "out" / "config.yaml").teacher == str(teacher)


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("train:\n  epoch: 3\n", "unknown config key 'train.epoch'"),
        ("train:\n  epochs: three\n", "'train.epochs' must be a whole number"),
        ("train:\n  epochs: [3\n", "is not valid YAML"),
    ],
    ids=["unknown-key", "wrong-type", "malformed"],
)
def test_bad_config_file(tmp_path, text, needle):
    (tmp_path / "preset.yaml").write_text(text)
    result = run_cli("distill", "--config", "preset.yaml", "--out", "run",
                     cwd=tmp_path)  # fmt: skip
    assert_one_line_error(result, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset.yaml"]


def test_missing_config_file(tmp_path):
    result = run_cli("distill", "--config", "absent.yaml", cwd=tmp_path)
    assert_one_line_error(result, "absent.yaml", "not found")
    assert not any(tmp_path.iterdir())


def test_no_collection_rounds_is_refused(tmp_path):
    result = run_cli(
        "distill", "--scenario", "grid2x2", "--out", "run",
        "--set", "collect.iterations=0", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, "collect.iterations", ">= 1")
    assert not any(tmp_path.iterdir())


def test_teacher_trained_on_another_scenario(tmp_path, cross_run):
    get_scenario("grid2x2")  # generated now, so the CLI logs nothing about it
    teacher = cross_run / "checkpoints" / "student.pt"
    result = run_cli(
        "distill", "--scenario", "grid2x2", "--teacher", teacher,
        "--duration", "300", "--out", "run", *TINY, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(
        result, "does not fit", "1 agents in the student, 4 in the environment"
    )
    assert not any(tmp_path.iterdir())  # no half-made run folder


def test_missing_teacher_checkpoint(tmp_path, cross_run):
    config = load_config(cross_run / "config.yaml")
    result = run_cli(
        "distill", "--net", config.scenario.net,
        "--routes", config.scenario.routes[0], "--teacher", "nonexistent.pt",
        "--out", "run", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, "nonexistent.pt", "not found")
    assert not any(tmp_path.iterdir())


def test_existing_run_needs_resume(tmp_path, cross_run):
    run = tmp_path / "run"
    shutil.copytree(cross_run, run)
    before = snapshot(run)
    config = load_config(run / "config.yaml")
    result = run_cli(
        "distill", "--net", config.scenario.net,
        "--routes", config.scenario.routes[0], "--out", run, cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, "already holds a run", "--resume")
    assert snapshot(run) == before


def test_resume_of_a_finished_run_changes_nothing(tmp_path, cross_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(cross_run, run)
    kept = {
        p: v
        for p, v in snapshot(run).items()
        if p.suffix == ".npz" or p.name == "student.pt"
    }
    assert len(kept) == 2
    code = main(
        ["--log-level", "WARNING", "distill", "--resume", "--out", str(run),
         "--no-eval"]
    )  # fmt: skip
    assert code == 0
    after = snapshot(run)
    assert {p: after[p] for p in kept} == kept
    assert json.loads((run / "progress.json").read_text())["rounds_done"] == 1


def test_resume_needs_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_cli("distill", "--resume", "--out", "empty", cwd=tmp_path)
    assert_one_line_error(result, "empty holds no run to resume", "drop --resume")
    assert not any((tmp_path / "empty").iterdir())


def test_evaluate_a_folder_that_is_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run\n")
    result = run_cli("evaluate", tmp_path, cwd=tmp_path)
    assert_one_line_error(result, str(tmp_path), "no config.yaml")


def test_evaluate_a_student_of_another_scenario(tmp_path, cross_run, grid_student):
    run = tmp_path / "run"
    shutil.copytree(cross_run, run)
    shutil.copy(grid_student, run / "checkpoints" / "student.pt")
    before = snapshot(run)
    result = run_cli("evaluate", run, "--episodes", "1", cwd=tmp_path)
    assert_one_line_error(
        result, "does not fit", "4 agents in the student, 1 in the environment"
    )
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--episodes", "0"], "--episodes is 0"),
     (["--demand-scale", "-1"], "demand_scale is -1.0")],
)  # fmt: skip
def test_evaluate_bad_flags(tmp_path, cross_run, flags, needle):
    result = run_cli("evaluate", cross_run, *flags, cwd=tmp_path)
    assert_one_line_error(result, needle)


# ------------------------------------------------------- learning together
COOPERATIVE = ["--scenario", "grid2x2", "--duration", "300", "--set",
               "collect.iterations=2", "--set", "collect.episodes_per_iteration=2",
               "--set", "cooperate.clients=2", "--set", "cooperate.rounds=2",
               "--set", "student.kind=mlp", "--set", "eval.episodes=1"]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "split", "kind"),
    [("fedavg", "episodes", "mlp"), ("mutual", "agents", "routing")],
)
def test_cooperative_distill_evaluate_export(tmp_path, capsys, method, split, kind):
    run = tmp_path / "run"
    code = main(
        ["--log-level", "WARNING", "distill", "--out", str(run), *COOPERATIVE,
         "--set", f"cooperate.method={method}", "--set", f"cooperate.split={split}"]
    )  # fmt: skip
    assert code == 0
    assert "| student |" in capsys.readouterr().out
    assert load_config(run / "config.yaml").cooperate.method == method
    student = load_student(run / "checkpoints" / "student.pt")
    assert student.kind == kind
    results = json.loads((run / "results.json").read_text())
    assert 0.0 <= results["controllers"]["student"]["mean"]["agreement"] <= 1.0

    assert main(["--log-level", "WARNING", "export", str(run)]) == 0
    assert f"the {kind} student" in capsys.readouterr().out
    assert (run / "export" / "student.onnx").exists()


def test_cooperative_preset_is_a_valid_config():
    preset = Path(__file__).resolve().parents[1] / "configs" / "cooperative.yaml"
    config = load_config(preset)
    assert (config.cooperate.method, config.cooperate.split) == ("mutual", "agents")
    assert config.student.kind == "mlp"  # so that its routing student exports


def test_routing_student_of_phase_clients_cannot_export(tmp_path):
    run = tmp_path / "run"
    code = main(
        ["--log-level", "WARNING", "distill", "--out", str(run), "--no-eval",
         *COOPERATIVE, "--set", "student.kind=phase",
         "--set", "cooperate.method=mutual"]
    )  # fmt: skip
    assert code == 0
    result = run_cli("export", run, cwd=tmp_path)
    assert_one_line_error(result, "routing student of phase clients", "mlp")


def test_more_clients_than_signals_is_one_line(tmp_path):
    result = run_cli(
        "distill", "--out", "run", *COOPERATIVE, "--set", "cooperate.clients=5",
        "--set", "cooperate.method=mutual", cwd=tmp_path,
    )  # fmt: skip
    assert_one_line_error(result, "cooperate.clients", "4 signals")
    assert not (tmp_path / "run").exists()
