"""Episode metrics of a traffic simulation, read from SUMO's own outputs.

Network figures follow the RESCO benchmark (Ault & Sharon, 2021): the average
trip delay of a vehicle is SUMO's ``timeLoss + departDelay``, taken over every
vehicle that was due to depart in the episode, including those still driving at
the end (``--tripinfo-output.write-unfinished``) and those that never found
room to enter (``--tripinfo-output.write-undeparted``, whose delay is the time
they waited to depart).

Per intersection, the same figures come from SUMO's edge data over the
intersection's incoming edges: time lost on those edges per vehicle that
entered them, waiting time likewise, vehicles that left them, and the queue on
its incoming lanes averaged over the decision points.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

METRIC_KEYS = (
    "avg_delay_s",
    "avg_wait_s",
    "mean_queue_veh",
    "throughput_veh",
    "teleports",
)


@dataclass
class EpisodeMetrics:
    """One episode's figures for the whole network and for each intersection."""

    network: dict[str, float]
    per_intersection: dict[str, dict[str, float]]


def trip_metrics(tripinfo: Path) -> dict[str, float]:
    """Average delay and waiting time, throughput and counts from tripinfo XML."""
    delays, waits = [], []
    arrived = unfinished = undeparted = 0
    for _, elem in ET.iterparse(tripinfo, events=("end",)):
        if elem.tag != "tripinfo":
            continue
        a = elem.attrib
        delays.append(float(a["timeLoss"]) + float(a["departDelay"]))
        waits.append(float(a["waitingTime"]))
        if float(a["arrival"]) >= 0:
            arrived += 1
        elif float(a["depart"]) < 0:
            undeparted += 1
        else:
            unfinished += 1
        elem.clear()
    n = len(delays)
    return {
        "avg_delay_s": sum(delays) / n if n else 0.0,
        "avg_wait_s": sum(waits) / n if n else 0.0,
        "throughput_veh": float(arrived),
        "vehicles": float(n),
        "unfinished_veh": float(unfinished),
        "undeparted_veh": float(undeparted),
    }


def teleports(statistics: Path) -> int:
    """Number of teleports from SUMO's ``--statistic-output``."""
    node = ET.parse(statistics).getroot().find("teleports")
    return int(node.attrib["total"]) if node is not None else 0


def edge_totals(edgedata: Path) -> dict[str, dict[str, float]]:
    """Per edge, totals over the episode from SUMO's ``--edgedata-output``."""
    totals: dict[str, dict[str, float]] = {}
    for _, elem in ET.iterparse(edgedata, events=("end",)):
        if elem.tag != "edge":
            continue
        a = elem.attrib
        t = totals.setdefault(
            a["id"], {"timeLoss": 0.0, "waitingTime": 0.0, "vehicles": 0.0, "left": 0.0}
        )
        t["timeLoss"] += float(a.get("timeLoss", 0.0))
        t["waitingTime"] += float(a.get("waitingTime", 0.0))
        t["vehicles"] += float(a.get("entered", 0.0)) + float(a.get("departed", 0.0))
        t["left"] += float(a.get("left", 0.0))
        elem.clear()
    return totals


def episode_metrics(
    *,
    tripinfo: Path,
    edgedata: Path,
    statistics: Path,
    incoming_edges: dict[str, list[str]],
    mean_queue: dict[str, float],
) -> EpisodeMetrics:
    """Combine SUMO's outputs and the sampled queues into one episode's figures.

    Args:
        tripinfo: ``--tripinfo-output`` written with unfinished and undeparted
            vehicles.
        edgedata: ``--edgedata-output`` over the whole episode.
        statistics: ``--statistic-output``.
        incoming_edges: per intersection, the edges that feed it.
        mean_queue: per intersection, the mean number of halted vehicles on its
            incoming lanes over the decision points.
    """
    trips = trip_metrics(tripinfo)
    edges = edge_totals(edgedata)
    per_intersection = {}
    for agent, edge_ids in incoming_edges.items():
        rows = [edges[e] for e in edge_ids if e in edges]
        vehicles = sum(r["vehicles"] for r in rows)
        per_intersection[agent] = {
            "avg_delay_s": sum(r["timeLoss"] for r in rows) / vehicles
            if vehicles
            else 0.0,
            "avg_wait_s": sum(r["waitingTime"] for r in rows) / vehicles
            if vehicles
            else 0.0,
            "mean_queue_veh": float(mean_queue[agent]),
            "throughput_veh": sum(r["left"] for r in rows),
        }
    queues = list(mean_queue.values())
    network = {
        "avg_delay_s": trips["avg_delay_s"],
        "avg_wait_s": trips["avg_wait_s"],
        "mean_queue_veh": float(sum(queues) / len(queues)) if queues else 0.0,
        "throughput_veh": trips["throughput_veh"],
        "teleports": float(teleports(statistics)),
        "vehicles": trips["vehicles"],
        "unfinished_veh": trips["unfinished_veh"],
        "undeparted_veh": trips["undeparted_veh"],
    }
    return EpisodeMetrics(network=network, per_intersection=per_intersection)


def mean_over_episodes(episodes: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of several episodes' network figures."""
    keys = episodes[0].keys() if episodes else ()
    return {k: sum(e[k] for e in episodes) / len(episodes) for k in keys}
