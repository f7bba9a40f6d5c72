"""The run report: its data, its errors, and the page as a browser shows it."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from marlkd.cli import main
from marlkd.config import load_config
from marlkd.envs.traffic import sumo as sumo_api
from marlkd.errors import UserError
from marlkd.report import add_report_args, cmd_report, write_report
from marlkd.report.network import read_geometry

pytest.importorskip("matplotlib")

# The page's own figures: queue over time, delay per intersection, map and
# learning curves.
FIGURES = 4

# Appended to a copy of the page: once everything loaded, the body says how
# many images decoded to a picture out of how many there are.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + images.length);
});
</script>"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    code = main(
        [
            "--log-level", "WARNING", "distill", "--scenario", "grid2x2",
            "--out", str(out),
            "--set", "collect.iterations=2", "--set", "train.epochs=3",
            "--set", "env.duration=600", "--set", "eval.episodes=1",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_episodes_record_the_queue_over_time(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    config = load_config(tiny_run / "config.yaml")
    signals = len(results["controllers"]["teacher"]["episodes"][0]["per_intersection"])
    for entry in results["controllers"].values():
        for episode in entry["episodes"]:
            trace = episode["queue_trace"]
            times = np.array(trace["time_s"])
            queues = np.array(trace["queue_veh"])
            assert len(times) == len(queues) == 600 / config.env.delta_time
            assert np.all(np.diff(times) == config.env.delta_time)
            assert times[-1] == pytest.approx(600)
            assert np.all(queues >= 0) and queues.max() > 0
            # The network's mean queue is per signal, over the same decisions.
            assert queues.mean() / signals == pytest.approx(
                episode["mean_queue_veh"], rel=0.05, abs=0.05
            )


def test_report_page_holds_every_section(tiny_run):
    path = write_report(tiny_run)
    assert path == tiny_run / "report.html"
    page = path.read_text()
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', page)) == FIGURES
    for heading in (
        "Queue over the simulated 10 minutes",
        "Per intersection",
        "Student minus teacher, on the map",
        "Learning curves",
        "Teacher, student and baselines",
    ):
        assert heading in page
    rows = re.findall(r'<tr class="(\w+)">', page)
    assert rows == list(load_config(tiny_run / "config.yaml").eval.controllers)


def test_every_image_loads_in_chromium(tiny_run, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: apt-get install -y chromium")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    page = write_report(tiny_run, out=tmp_path / "report.html").read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))

    result = subprocess.run(
        [
            browser, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000", "--dump-dom", checked.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = re.search(r'data-images="(\d+)/(\d+)"', result.stdout)
    assert found, f"the check script did not run:\n{result.stderr[-2000:]}"
    assert found.groups() == (str(FIGURES), str(FIGURES))


def test_report_without_results_asks_for_evaluate(tiny_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_run / "config.yaml", run / "config.yaml")
    with pytest.raises(UserError, match=r"run `marlkd evaluate .*` first"):
        write_report(run)
    assert not (run / "report.html").exists()


def test_report_command_prints_the_path(tiny_run, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_report_args(parser)
    out = tmp_path / "page.html"
    assert cmd_report(parser.parse_args([str(tiny_run), "--out", str(out)])) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_signal_of_a_differently_named_light_stands_at_its_junction(tmp_path):
    # Junction C is controlled by a traffic light named T, as in joined lights.
    (tmp_path / "x.nod.xml").write_text(
        "<nodes>"
        '<node id="C" x="500" y="300" type="traffic_light" tl="T"/>'
        '<node id="N" x="500" y="500"/><node id="S" x="500" y="100"/>'
        '<node id="E" x="700" y="300"/><node id="W" x="300" y="300"/>'
        "</nodes>"
    )
    (tmp_path / "x.edg.xml").write_text(
        "<edges>"
        + "".join(
            f'<edge id="{a}C" from="{a}" to="C"/><edge id="C{a}" from="C" to="{a}"/>'
            for a in "NESW"
        )
        + "</edges>"
    )
    net = tmp_path / "x.net.xml"
    subprocess.run(
        [
            sumo_api.binary("netconvert"),
            "--node-files", str(tmp_path / "x.nod.xml"),
            "--edge-files", str(tmp_path / "x.edg.xml"),
            "--offset.disable-normalization", "true",
            "--output-file", str(net),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip

    geometry = read_geometry(net, ["T", "C", "nowhere"])
    assert set(geometry.signals) == {"T", "C"}
    assert geometry.signals["C"] == pytest.approx((500, 300))
    # the stop lines lie a few metres around the junction's centre
    assert geometry.signals["T"] == pytest.approx((500, 300), abs=2.0)
    assert len(geometry.edges) == 8
    assert geometry.bounds == pytest.approx((300, 100, 700, 500), abs=5.0)
