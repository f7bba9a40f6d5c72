"""Built-in scenario generation, user scenarios and their input checks."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from marlkd.envs.traffic import scenarios
from marlkd.envs.traffic import sumo as sumo_api
from marlkd.errors import UserError

SIGNALS = {"single": 1, "grid2x2": 4, "grid4x4": 16, "arterial4": 4, "city": 11}


def read_net(path: Path):
    sumo_api.sumo_home()
    import sumolib

    return sumolib.net.readNet(str(path), withPrograms=True)


def green_states(tls) -> set[str]:
    """Distinct green phases: states with a green and no yellow light."""
    (program,) = tls.getPrograms().values()
    return {
        phase.state
        for phase in program.getPhases()
        if "y" not in phase.state and any(c in "Gg" for c in phase.state)
    }


def named(path: Path) -> str:
    """A pattern matching the path literally in an error message."""
    return re.escape(str(path))


def departures(route_file: Path) -> list[tuple[str, float]]:
    root = ET.parse(route_file).getroot()
    return [(v.get("id"), float(v.get("depart"))) for v in root.iter("vehicle")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenario-cache")


@pytest.fixture(scope="module")
def other_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("scenario-cache-2")


@pytest.fixture(scope="module")
def single(cache) -> scenarios.Scenario:
    return scenarios.get_scenario("single", cache_dir=cache)


# ------------------------------------------------------------------ built-ins
def test_list_names_every_builtin_with_its_signal_count():
    listed = {name: signals for name, signals, _ in scenarios.list_scenarios()}
    assert listed == SIGNALS
    assert all(description for _, _, description in scenarios.list_scenarios())


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_builtin_net_has_stated_signals_each_with_two_green_phases(name, cache):
    scenario = scenarios.get_scenario(name, cache_dir=cache)
    net = read_net(scenario.net_file)

    signals = net.getTrafficLights()
    assert len(signals) == SIGNALS[name]
    assert all(len(green_states(tls)) >= 2 for tls in signals)
    assert scenario.end == scenario.begin + 3600
    if name != "city":  # there, smaller junctions are left unsignalised
        junctions = [n for n in net.getNodes() if len(n.getIncoming()) >= 3]
        assert {n.getType() for n in junctions} == {"traffic_light"}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_same_seed_gives_same_bytes_and_other_seeds_differ(name, cache, other_cache):
    first = scenarios.get_scenario(name, cache_dir=cache)
    again = scenarios.get_scenario(name, cache_dir=other_cache)
    (routes,) = first.route_files(1)

    assert routes == first.folder / "routes-seed1.rou.xml"
    assert first.net_file.read_bytes() == again.net_file.read_bytes()
    assert routes.read_bytes() == again.route_files(1)[0].read_bytes()
    assert routes.read_bytes() != first.route_files(2)[0].read_bytes()


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_demand_peaks_inside_the_hour(name, cache):
    scenario = scenarios.get_scenario(name, cache_dir=cache)
    vehicles = departures(scenario.route_files(1)[0])
    times = [depart - scenario.begin for _, depart in vehicles]

    assert len({vehicle_id for vehicle_id, _ in vehicles}) == len(vehicles)
    assert all(0 <= t < 3600 and t == int(t) for t in times)
    first_sixth = sum(t < 600 for t in times)
    middle_third = sum(1200 <= t < 2400 for t in times)
    # Expected rate ratio 1.3 / 0.6; per 600 s the middle has at least 1.5x.
    assert middle_third / 2 > 1.5 * first_sixth > 0


def test_city_is_heterogeneous_and_starts_at_seven(cache):
    scenario = scenarios.get_scenario("city", cache_dir=cache)
    net = read_net(scenario.net_file)
    signals = net.getTrafficLights()

    in_lanes = {len({c[0].getID() for c in tls.getConnections()}) for tls in signals}
    arms = {
        len({c[0].getEdge().getID() for c in tls.getConnections()}) for tls in signals
    }
    greens = {len(green_states(tls)) for tls in signals}
    assert len(in_lanes) >= 2 and len(greens) >= 2
    assert {3, 4} <= arms
    assert scenario.begin == 25200 and scenario.end == 28800
    assert min(t for _, t in departures(scenario.route_files(1)[0])) >= 25200


def test_arterial_demand_is_heavier_on_the_main_road(cache):
    scenario = scenarios.get_scenario("arterial4", cache_dir=cache)
    root = ET.parse(scenario.route_files(1)[0]).getroot()
    entries = Counter(
        v.find("route").get("edges").split()[0] for v in root.iter("vehicle")
    )

    main = [entries["WA0"], entries["EA3"]]
    side = [n for edge, n in entries.items() if edge[0] in "NS"]
    assert min(main) > 2 * max(side)


def test_unknown_name_lists_the_choices(cache):
    with pytest.raises(
        UserError, match="unknown scenario 'x': choose one of .*grid4x4"
    ):
        scenarios.get_scenario("x", cache_dir=cache)


def test_negative_seed_is_refused(single):
    with pytest.raises(UserError, match="seed -1"):
        single.route_files(-1)


def test_cache_dir_defaults_to_marlkd_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MARLKD_CACHE", str(tmp_path))
    assert scenarios.default_cache_dir() == tmp_path
    monkeypatch.delenv("MARLKD_CACHE")
    assert scenarios.default_cache_dir().parts[-3:] == (".cache", "marlkd", "scenarios")


def test_pickled_scenario_regenerates_a_deleted_cache(tmp_path):
    scenario = scenarios.get_scenario("single", cache_dir=tmp_path)
    net = scenario.net_file.read_bytes()
    copy = pickle.loads(pickle.dumps(scenario))
    scenario.net_file.unlink()  # as on a worker that has another cache

    assert copy == scenario
    (routes,) = copy.route_files(3)
    assert routes.exists() and copy.net_file.read_bytes() == net


BUILD = """
import logging, sys
from pathlib import Path
from marlkd.envs.traffic.scenarios import get_scenario
logging.basicConfig(level=logging.INFO, format="%(message)s")
get_scenario("grid2x2", cache_dir=Path(sys.argv[1])).route_files(5)
"""


def test_concurrent_builders_generate_one_whole_file_once(tmp_path):
    builders = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(tmp_path)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    logs = [builder.communicate(timeout=60)[1] for builder in builders]
    assert [builder.returncode for builder in builders] == [0, 0, 0], logs

    generated = [line for log in logs for line in log.splitlines()]
    assert sum(line.startswith("generating") for line in generated) == 2  # net, routes
    folder = next(tmp_path.glob("*/grid2x2"))
    assert (folder / "routes-seed5.rou.xml").read_text().rstrip().endswith("</routes>")
    assert sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) == [
        "net.net.xml",
        "routes-seed5.rou.xml",
    ]


# ------------------------------------------------------------- user scenarios
def write_routes(path: Path, body: str) -> Path:
    path.write_text(f"<routes>\n{body}\n</routes>\n")
    return path


@pytest.fixture
def routes(tmp_path) -> Path:
    return write_routes(
        tmp_path / "late.rou.xml",
        '<vType id="car"/>\n'
        '<vehicle id="t" depart="triggered" route="r"/>\n'
        '<trip id="a" depart="07:00:05.5" from="WA0" to="A0E"/>\n'
        '<flow id="f" begin="25300" end="26000" number="3" from="WA0" to="A0E"/>',
    )


def test_user_scenario_begins_at_the_earliest_departure(single, routes):
    scenario = scenarios.user_scenario(single.net_file, [routes])

    assert (scenario.begin, scenario.end) == (25205, 25205 + 3600)
    assert scenario.route_files(0) == scenario.route_files(1) == (routes,)
    assert scenario.name == "net"


def test_user_scenario_keeps_given_begin_and_end(single, routes):
    scenario = scenarios.user_scenario(single.net_file, [routes], begin=100, end=700)
    assert (scenario.begin, scenario.end) == (100, 700)
    with pytest.raises(UserError, match="not after begin"):
        scenarios.user_scenario(single.net_file, [routes], begin=100, end=100)


def test_missing_net_is_named(tmp_path, routes):
    missing = tmp_path / "nowhere.net.xml"
    with pytest.raises(
        UserError, match=f"net file {named(missing)} not found: .*--net"
    ):
        scenarios.user_scenario(missing, [routes])


def test_malformed_net_is_named(tmp_path, routes):
    broken = tmp_path / "broken.net.xml"
    broken.write_text('<net version="1.20">\n  <edge id="a" from=')
    with pytest.raises(UserError, match=f"{named(broken)} is not a valid SUMO network"):
        scenarios.user_scenario(broken, [routes])


def test_net_without_traffic_lights_is_named(tmp_path, routes):
    plain = tmp_path / "plain.net.xml"
    subprocess.run(
        [
            sumo_api.binary("netgenerate"),
            "--grid", "--grid.number", "2",
            "--default.junctions.type", "priority",
            "--output-file", str(plain),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    with pytest.raises(
        UserError, match=f"{named(plain)} has no traffic lights: .*tls.guess"
    ):
        scenarios.user_scenario(plain, [routes])


def test_missing_and_malformed_routes_are_named(single, tmp_path):
    missing = tmp_path / "nowhere.rou.xml"
    with pytest.raises(UserError, match=f"route file {named(missing)} not found"):
        scenarios.user_scenario(single.net_file, [missing])

    broken = tmp_path / "broken.rou.xml"
    broken.write_text('<routes>\n  <vehicle id="0" depart="0">\n</routes>\n')
    with pytest.raises(UserError, match=f"route file {named(broken)} is not valid XML"):
        scenarios.user_scenario(single.net_file, [broken])

    with pytest.raises(UserError, match="no route files"):
        scenarios.user_scenario(single.net_file, [])


def test_routes_without_timed_departures_need_a_begin(single, tmp_path):
    empty = write_routes(tmp_path / "empty.rou.xml", '<vType id="car"/>')
    with pytest.raises(UserError, match=f"{named(empty)} define no vehicle"):
        scenarios.user_scenario(single.net_file, [empty])
    assert scenarios.user_scenario(single.net_file, [empty], begin=0).end == 3600


def test_sumocfg_gives_files_relative_to_its_folder_and_times(single, tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "town.net.xml").write_bytes(single.net_file.read_bytes())
    a = write_routes(folder / "a.rou.xml", '<trip id="a" depart="50" from="x" to="y"/>')
    b = write_routes(folder / "b.rou.xml", '<trip id="b" depart="9" from="x" to="y"/>')
    config = folder / "town.sumocfg"
    config.write_text(
        "<configuration>\n"
        '  <input><net-file value="town.net.xml"/>'
        '<route-files value="a.rou.xml, b.rou.xml"/></input>\n'
        '  <time><begin value="01:00:00"/><end value="7200"/></time>\n'
        "</configuration>\n"
    )

    scenario = scenarios.scenario_from_sumocfg(config)
    assert scenario.net_file == folder / "town.net.xml"
    assert scenario.route_files(0) == (a, b)
    assert (scenario.begin, scenario.end) == (3600, 7200)

    text = config.read_text()
    config.write_text(text.replace('value="7200"', 'value="-1"'))
    assert scenarios.scenario_from_sumocfg(config).end == 3600 + 3600
    config.write_text(text.replace("<time>", "<!--").replace("</time>", "-->"))
    assert scenarios.scenario_from_sumocfg(config).begin == 9


def test_sumocfg_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere.sumocfg"
    with pytest.raises(UserError, match=f"SUMO config {named(missing)} not found"):
        scenarios.scenario_from_sumocfg(missing)

    config = tmp_path / "no-net.sumocfg"
    config.write_text(
        '<configuration><input><route-files value="a.rou.xml"/></input></configuration>'
    )
    with pytest.raises(UserError, match=f"{named(config)} names no <net-file>"):
        scenarios.scenario_from_sumocfg(config)

    config.write_text(
        '<configuration><input><net-file value="gone.net.xml"/>'
        '<route-files value="a.rou.xml"/></input></configuration>'
    )
    with pytest.raises(
        UserError, match=f"net file {named(tmp_path / 'gone.net.xml')} not"
    ):
        scenarios.scenario_from_sumocfg(config)


# ---------------------------------------------------------------- time parsing
@given(st.integers(min_value=0, max_value=9 * 86400), st.sampled_from([0, 0.25, 0.5]))
def test_clock_times_parse_to_seconds(seconds, fraction):
    days, rest = divmod(seconds, 86400)
    clock = f"{rest // 3600:02d}:{rest // 60 % 60:02d}:{rest % 60 + fraction:05.2f}"

    assert scenarios._parse_time(f"{days}:{clock}") == seconds + fraction
    if days == 0:
        assert scenarios._parse_time(clock) == seconds + fraction
    assert scenarios._parse_time(f" {seconds + fraction!r} ") == seconds + fraction


@pytest.mark.parametrize("word", ["triggered", "now", "begin", "", "1:2", "inf", "nan"])
def test_words_are_not_times(word):
    assert scenarios._parse_time(word) is None
