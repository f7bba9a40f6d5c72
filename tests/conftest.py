"""Shared fixtures: a one-intersection network built with netconvert."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from marlkd.envs.traffic import sumo as sumo_api

# marlkd's networks are tiny and share two cores with SUMO: one thread is
# faster, and under load many times faster (the CLI's training commands do
# the same).
torch.set_num_threads(1)

ARM_M = 200.0


def build_cross(folder: Path, *, tls: bool = True, lanes: int = 1) -> Path:
    """A four-arm intersection ``C`` with arms N, E, S, W of 200 m."""
    folder.mkdir(parents=True, exist_ok=True)
    kind = "traffic_light" if tls else "priority"
    nodes = {"C": (0, 0), "N": (0, ARM_M), "E": (ARM_M, 0), "S": (0, -ARM_M),
             "W": (-ARM_M, 0)}  # fmt: skip
    (folder / "cross.nod.xml").write_text(
        "<nodes>\n"
        + "".join(
            f'  <node id="{n}" x="{x}" y="{y}" type="{t}"/>\n'
            for n, (x, y) in nodes.items()
            for t in [kind if n == "C" else "priority"]
        )
        + "</nodes>\n"
    )
    edges = "".join(
        f'  <edge id="{a}C" from="{a}" to="C" numLanes="{lanes}" speed="13.89"/>\n'
        f'  <edge id="C{a}" from="C" to="{a}" numLanes="{lanes}" speed="13.89"/>\n'
        for a in "NESW"
    )
    (folder / "cross.edg.xml").write_text(f"<edges>\n{edges}</edges>\n")
    net = folder / "cross.net.xml"
    subprocess.run(
        [
            sumo_api.binary("netconvert"),
            "--node-files", str(folder / "cross.nod.xml"),
            "--edge-files", str(folder / "cross.edg.xml"),
            "--no-turnarounds", "true",
            "--output-file", str(net),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return net


def write_flows(path: Path, per_hour: dict[str, float], end: float = 3600) -> Path:
    """Straight-through flows, e.g. ``{"NS": 300}`` from N to S, vehicles/hour."""
    flows = "".join(
        f'  <flow id="f{od}" from="{od[0]}C" to="C{od[1]}" begin="0" end="{end}"'
        f' vehsPerHour="{rate}" departSpeed="max" departLane="best"/>\n'
        for od, rate in per_hour.items()
    )
    path.write_text(f"<routes>\n{flows}</routes>\n")
    return path


@pytest.fixture(scope="session")
def cross_net(tmp_path_factory) -> Path:
    return build_cross(tmp_path_factory.mktemp("cross"))


@pytest.fixture(scope="session")
def cross_routes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cross-routes")
    return write_flows(
        folder / "cross.rou.xml", {"NS": 300, "SN": 300, "EW": 200, "WE": 200}
    )
