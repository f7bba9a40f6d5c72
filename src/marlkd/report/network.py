"""The network's geometry for the map: road shapes and where each signal stands."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class NetworkGeometry:
    """What the map draws, in the network's own metres.

    Attributes:
        edges: one (K, 2) array of x, y points per road (internal edges left out).
        lanes: the number of lanes of each road in ``edges``.
        junctions: one (K, 2) outline per junction that has one.
        signals: per agent (traffic light id) its (x, y) position.
    """

    edges: list[np.ndarray]
    lanes: list[int]
    junctions: list[np.ndarray]
    signals: dict[str, tuple[float, float]]

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) over roads and signals."""
        points = list(self.edges)
        if self.signals:
            points.append(np.array(list(self.signals.values())))
        stacked = np.concatenate(points)
        (xmin, ymin), (xmax, ymax) = stacked.min(axis=0), stacked.max(axis=0)
        return float(xmin), float(ymin), float(xmax), float(ymax)


def read_geometry(net_file: Path, agents: list[str]) -> NetworkGeometry:
    """Road shapes and signal positions from a SUMO ``.net.xml``.

    A signal stands at the junction of the same id, as in ``netgenerate`` and
    most ``netconvert`` networks. A traffic light that joins several junctions
    has no such junction; it stands at the mean of the end points of the lanes
    it controls, which is where those lanes meet the stop lines.
    """
    import sumolib

    net = sumolib.net.readNet(str(net_file))
    edges, lanes = [], []
    for edge in net.getEdges():
        shape = np.asarray(edge.getShape(), dtype=float)
        if len(shape) >= 2:
            edges.append(shape[:, :2])
            lanes.append(edge.getLaneNumber())

    junctions = []
    for node in net.getNodes():
        outline = np.asarray(node.getShape() or [], dtype=float)
        if len(outline) >= 3:
            junctions.append(outline[:, :2])

    lights = {tls.getID(): tls for tls in net.getTrafficLights()}
    signals = {}
    for agent in agents:
        if net.hasNode(agent):
            x, y = net.getNode(agent).getCoord()[:2]
            signals[agent] = (float(x), float(y))
            continue
        tls = lights.get(agent)
        if tls is None:
            continue
        ends = [connection[0].getShape()[-1][:2] for connection in tls.getConnections()]
        if ends:
            x, y = np.mean(np.asarray(ends, dtype=float), axis=0)
            signals[agent] = (float(x), float(y))
    return NetworkGeometry(
        edges=edges, lanes=lanes, junctions=junctions, signals=signals
    )
