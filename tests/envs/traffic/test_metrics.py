"""Episode metrics agree with SUMO's own trip statistics."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from marlkd.envs.traffic.env import TrafficEnvConfig, TrafficSignalEnv
from marlkd.envs.traffic.scenarios import user_scenario
from marlkd.teachers import make_controller

from conftest import build_cross, write_flows


def run(env, controller, seed=0):
    obs, infos = env.reset(seed=seed)
    while env.agents:
        masks = {a: infos[a]["action_mask"] for a in env.agents}
        obs, _, _, _, infos = env.step(controller(obs, masks))
    return env.last_episode


def test_delay_equals_sumo_trip_statistics(tmp_path, cross_net):
    # Demand stops at 400 s and the episode runs to 900 s, so every trip
    # finishes and SUMO's statistics (arrived vehicles only) cover them all.
    routes = write_flows(tmp_path / "r.rou.xml", {"NS": 400, "EW": 400}, end=400)
    scenario = user_scenario(cross_net, [routes], begin=0, end=900)
    env = TrafficSignalEnv(scenario, TrafficEnvConfig(), output_dir=tmp_path / "out")
    try:
        episode = run(env, make_controller("fixed", env))
    finally:
        env.close()
    stats = ET.parse(tmp_path / "out" / "statistics.xml").getroot()
    trips = stats.find("vehicleTripStatistics").attrib
    assert episode.network["unfinished_veh"] == 0
    assert episode.network["vehicles"] == float(trips["count"]) > 50
    expected = float(trips["timeLoss"]) + float(trips["departDelay"])
    assert episode.network["avg_delay_s"] == pytest.approx(expected, abs=0.01)
    assert episode.network["avg_wait_s"] == pytest.approx(
        float(trips["waitingTime"]), abs=0.01
    )
    assert episode.network["throughput_veh"] == float(trips["count"])


def test_vehicles_that_never_depart_are_counted(tmp_path):
    # One lane per arm, 1,500 veh/h on each of the four approaches: far more
    # than the signal can serve, so a backlog builds at every entry.
    net = build_cross(tmp_path / "net")
    rates = {"NS": 1500, "SN": 1500, "EW": 1500, "WE": 1500}
    routes = write_flows(tmp_path / "r.rou.xml", rates, end=600)
    scenario = user_scenario(net, [routes], begin=0, end=600)
    env = TrafficSignalEnv(scenario, TrafficEnvConfig(), output_dir=tmp_path / "out")
    try:
        episode = run(env, make_controller("fixed", env))
    finally:
        env.close()
    net_metrics = episode.network
    assert net_metrics["undeparted_veh"] > 0
    assert net_metrics["teleports"] == 0
    # Every vehicle due in the 600 s is counted: arrived, driving, or waiting.
    due = sum(int(rate * 600 / 3600) for rate in rates.values())
    assert net_metrics["vehicles"] == pytest.approx(due, abs=4)
    intersection = episode.per_intersection["C"]
    assert intersection["avg_delay_s"] > 0 and intersection["mean_queue_veh"] > 5
