"""The command line: output, JSON keys, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from marlkd.cli import main
from marlkd.envs.traffic.metrics import METRIC_KEYS

from conftest import build_cross


def run_cli(*args):
    """Run marlkd in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "marlkd.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_simulate_writes_json(tmp_path, cross_net, cross_routes, capsys):
    out = tmp_path / "result.json"
    code = main(
        [
            "--log-level", "WARNING", "simulate",
            "--net", str(cross_net), "--routes", str(cross_routes),
            "--controller", "max-pressure", "--episodes", "2", "--seed", "5",
            "--duration", "600", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    data = json.loads(out.read_text())
    assert [e["seed"] for e in data["episodes"]] == [5, 6]
    for entry in (*data["episodes"], data["mean"]):
        assert set(METRIC_KEYS) <= set(entry)
    assert set(data["episodes"][0]["per_intersection"]) == {"C"}
    mean = sum(e["avg_delay_s"] for e in data["episodes"]) / 2
    assert data["mean"]["avg_delay_s"] == pytest.approx(mean)
    printed = capsys.readouterr().out
    assert "| mean |" in printed and "avg_delay_s" in printed


def test_scenarios_lists_builtins(capsys):
    assert main(["scenarios"]) == 0
    out = capsys.readouterr().out
    for name in ("grid2x2", "grid4x4", "arterial4"):
        assert name in out


def test_missing_net_file(tmp_path, cross_routes):
    result = run_cli(
        "simulate", "--net", tmp_path / "nope.net.xml", "--routes", cross_routes
    )
    assert_one_line_error(result, "nope.net.xml")


def test_malformed_net_file(tmp_path, cross_routes):
    bad = tmp_path / "bad.net.xml"
    bad.write_text("<net><edge id='a'")
    assert_one_line_error(
        run_cli("simulate", "--net", bad, "--routes", cross_routes), "bad.net.xml"
    )


def test_missing_and_malformed_routes(tmp_path, cross_net):
    assert_one_line_error(
        run_cli("simulate", "--net", cross_net, "--routes", tmp_path / "no.rou.xml"),
        "no.rou.xml",
    )
    bad = tmp_path / "bad.rou.xml"
    bad.write_text("<routes><vehicle id='x' depart='0'")
    assert_one_line_error(
        run_cli("simulate", "--net", cross_net, "--routes", bad), "bad.rou.xml"
    )


def test_net_without_traffic_lights(tmp_path, cross_routes):
    net = build_cross(tmp_path / "plain", tls=False)
    assert_one_line_error(
        run_cli("simulate", "--net", net, "--routes", cross_routes), "traffic light"
    )


def test_unknown_scenario_and_controller(cross_net, cross_routes):
    assert_one_line_error(
        run_cli("simulate", "--scenario", "atlantis"), "atlantis", "marlkd scenarios"
    )
    assert_one_line_error(
        run_cli(
            "simulate", "--net", cross_net, "--routes", cross_routes,
            "--controller", "oracle",
        ),
        "oracle",
        "max-pressure",
    )  # fmt: skip


def test_bad_environment_setting(cross_net, cross_routes):
    assert_one_line_error(
        run_cli(
            "simulate", "--net", cross_net, "--routes", cross_routes,
            "--yellow-time", "12",
        ),
        "yellow_time",
    )  # fmt: skip


def test_sumo_not_importable(tmp_path, cross_net, cross_routes):
    # A stand-in `sumo` package that fails to import, first on the path.
    (tmp_path / "sumo").mkdir()
    (tmp_path / "sumo" / "__init__.py").write_text("raise ImportError('gone')\n")
    (tmp_path / "libsumo").mkdir()
    (tmp_path / "libsumo" / "__init__.py").write_text("raise ImportError('gone')\n")
    result = subprocess.run(
        [
            sys.executable, "-c",
            f"import sys; sys.path.insert(0, {str(tmp_path)!r});"
            "from marlkd.cli import main; sys.exit(main(sys.argv[1:]))",
            "simulate", "--net", str(cross_net), "--routes", str(cross_routes),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert_one_line_error(result, "SUMO", "pip install")
