"""Networks and demand to simulate: built-in scenarios and the user's own files.

A :class:`Scenario` names a SUMO network, the simulated span ``[begin, end)``
and, for each seed, the route files holding its demand.

Built-in scenarios are generated with SUMO's own tools (``netgenerate``,
``netconvert``, ``randomTrips.py`` with ``duarouter``) into a cache folder,
``<cache>/v1-sumo<version>/<name>/``: the network once, as ``net.net.xml``, and
the demand once per seed, as ``routes-seed<seed>.rou.xml``. Generation is
deterministic; the tools' headers, which hold dates and temporary paths, are
replaced by a fixed comment so the same seed gives the same bytes. Files are
written to a temporary folder beside their target and moved in place with
``os.replace`` under a lock, so concurrent processes never see half a file.

Demand lasts one hour and peaks in its middle: the hour is cut into six equal
intervals whose insertion rates are the scenario's base rate times
``DEMAND_PROFILE``. Departures fall on whole seconds, drawn per second from a
binomial distribution (``randomTrips.py --binomial``). Scaling the demand up or
down is the simulation's job (SUMO ``--scale``), not this module's.

User scenarios (:func:`user_scenario`, :func:`scenario_from_sumocfg`) check
their files up front and raise :class:`~marlkd.errors.UserError` naming the
file at fault.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import logging
import math
import operator
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from marlkd.envs.traffic import sumo as sumo_api
from marlkd.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: temp file + os.replace still keeps files whole
    fcntl = None

logger = logging.getLogger(__name__)

CACHE_VERSION = "v1"  # bump when a network or demand recipe changes
HOUR_S = 3600.0
DEMAND_PROFILE = (0.6, 0.9, 1.3, 1.3, 0.9, 0.6)  # factors on six equal intervals
NET_FILE = "net.net.xml"

# Elements of a route file that insert traffic, and the attribute with their time.
_DEPARTURE_ATTRIBUTE = {
    "vehicle": "depart",
    "trip": "depart",
    "person": "depart",
    "container": "depart",
    "flow": "begin",
    "personFlow": "begin",
    "containerFlow": "begin",
}


@dataclass(frozen=True)
class Scenario(abc.ABC):
    """A SUMO network, the simulated span and the demand for each seed.

    Attributes:
        name: short name, e.g. ``grid4x4`` or the stem of the user's net file.
        net_file: the SUMO ``.net.xml``.
        begin: simulation start time in seconds; may be non-zero.
        end: absolute end time in seconds (``begin`` + duration).
        description: one line for listings.
    """

    name: str
    net_file: Path
    begin: float
    end: float
    description: str = ""

    @abc.abstractmethod
    def route_files(self, seed: int) -> tuple[Path, ...]:
        """Route files holding the demand of the episode run with ``seed``."""


@dataclass(frozen=True, kw_only=True)
class FileScenario(Scenario):
    """A scenario from the user's files: the same demand for every seed.

    Attributes:
        routes: the route files, loaded together.
    """

    routes: tuple[Path, ...]

    def route_files(self, seed: int) -> tuple[Path, ...]:
        """The user's route files; the seed only changes SUMO's own randomness."""
        return self.routes


@dataclass(frozen=True)
class _Recipe:
    """How a built-in scenario's network and demand are generated.

    Attributes:
        signals: number of traffic lights the network gets.
        description: one line for listings.
        build_net: writes the raw network into a work folder, returns its path.
        base_rate: vehicles per hour before ``DEMAND_PROFILE`` is applied.
        trip_options: options of ``randomTrips.py`` that shape origins and
            destinations.
        begin: simulation start time in seconds.
    """

    signals: int
    description: str
    build_net: Callable[[Path], Path]
    base_rate: float
    trip_options: tuple[str, ...]
    begin: float = 0.0


@dataclass(frozen=True, kw_only=True)
class BuiltinScenario(Scenario):
    """A generated scenario: a fixed network and per-seed random demand.

    Attributes:
        recipe: how the network and demand are generated.
        folder: cache folder holding the network and the route files.
    """

    recipe: _Recipe = field(repr=False, compare=False)
    folder: Path

    def route_files(self, seed: int) -> tuple[Path, ...]:
        """Generate (once) and return the demand for ``seed``."""
        seed = operator.index(seed)
        if seed < 0:
            raise UserError(f"seed {seed} is negative: use a non-negative integer")
        # The net is rebuilt if this process sees another cache than the creator.
        net = _cached(self.net_file, self.recipe.build_net, self._header())
        target = self.folder / f"routes-seed{seed}.rou.xml"
        build = functools.partial(_build_routes, self, net, seed)
        return (_cached(target, build, self._header(f"seed {seed}")),)

    def _header(self, detail: str = "") -> str:
        extra = f", {detail}" if detail else ""
        return (
            f"marlkd scenario {self.name}{extra}, {CACHE_VERSION}, "
            f"generated with SUMO {_sumo_version()}"
        )


# --------------------------------------------------------------------- networks
_GRID_OPTIONS = (
    "--grid",
    "--grid.length", "200",
    "--grid.attach-length", "200",
    "--default.lanenumber", "2",
    "--default.speed", "13.89",
    "--turn-lanes", "1",
    "--turn-lanes.length", "150",
    "--tls.guess", "true",
    "--no-turnarounds", "true",
)  # fmt: skip


def _netgenerate(work: Path, options: Sequence[str]) -> Path:
    net = work / NET_FILE
    _run([sumo_api.binary("netgenerate"), *options, "--output-file", str(net)], work)
    return net


def _grid_net(work: Path, *, size: int) -> Path:
    """A ``size`` x ``size`` grid of signals, 200 m blocks, streets to the fringe.

    Each approach has two lanes and a 150 m left-turn pocket, so a signal's
    program has four green phases: two through and two protected left.
    """
    return _netgenerate(work, [*_GRID_OPTIONS, "--grid.number", str(size)])


def _arterial_net(work: Path) -> Path:
    """Four signals 250 m apart on a 2+2-lane, 60 km/h main road.

    Single-lane, 40 km/h side streets of 200 m cross it at each signal.
    """
    main = 'numLanes="2" speed="16.67" priority="3"'
    side = 'numLanes="1" speed="11.11" priority="1"'
    nodes = ['<node id="W" x="-250" y="0"/>', '<node id="E" x="1000" y="0"/>']
    edges = []
    for i in range(4):
        x = 250 * i
        nodes.append(f'<node id="A{i}" x="{x}" y="0" type="traffic_light"/>')
        nodes.append(f'<node id="N{i}" x="{x}" y="200"/>')
        nodes.append(f'<node id="S{i}" x="{x}" y="-200"/>')
        for end in (f"N{i}", f"S{i}"):
            edges.append(f'<edge id="{end}A{i}" from="{end}" to="A{i}" {side}/>')
            edges.append(f'<edge id="A{i}{end}" from="A{i}" to="{end}" {side}/>')
    chain = ["W", "A0", "A1", "A2", "A3", "E"]
    for a, b in zip(chain, chain[1:], strict=False):
        edges.append(f'<edge id="{a}{b}" from="{a}" to="{b}" {main}/>')
        edges.append(f'<edge id="{b}{a}" from="{b}" to="{a}" {main}/>')

    node_file = work / "arterial.nod.xml"
    edge_file = work / "arterial.edg.xml"
    node_file.write_text("<nodes>\n  " + "\n  ".join(nodes) + "\n</nodes>\n")
    edge_file.write_text("<edges>\n  " + "\n  ".join(edges) + "\n</edges>\n")
    net = work / NET_FILE
    _run(
        [
            sumo_api.binary("netconvert"),
            "--node-files", str(node_file),
            "--edge-files", str(edge_file),
            "--no-turnarounds", "true",
            "--output-file", str(net),
        ],
        work,
    )  # fmt: skip
    return net


def _city_net(work: Path) -> Path:
    """A random city-like net: 30 junctions on a 200 m lattice, 1-3 lanes.

    Junctions whose incoming lanes sum to more than 100 m/s of speed limit get
    signals (11 of them, with 3 or 4 arms and 2 to 4 green phases); the rest
    are priority junctions; dead ends form the fringe.
    """
    return _netgenerate(
        work,
        [
            "--rand",
            "--seed", "2",
            "--rand.iterations", "30",
            "--rand.grid", "true",
            "--rand.min-distance", "200",
            "--rand.max-distance", "400",
            "--default.lanenumber", "3",
            "--random-lanenumber", "true",
            "--default.speed", "13.89",
            "--tls.guess", "true",
            "--tls.guess.threshold", "100",
            "--no-turnarounds", "true",
        ],
    )  # fmt: skip


# Through traffic: origins and destinations mostly on the fringe, 20:1.
_THROUGH = ("--fringe-factor", "20", "--min-distance", "300")

_RECIPES: dict[str, _Recipe] = {
    "single": _Recipe(
        signals=1,
        description="one 4-arm intersection, 2 lanes + left pocket per arm; ~930 veh/h",
        build_net=functools.partial(_grid_net, size=1),
        base_rate=1000.0,
        trip_options=("--fringe-factor", "20", "--min-distance", "100"),
    ),
    "grid2x2": _Recipe(
        signals=4,
        description="2x2 grid, 200 m blocks, 2 lanes + left pocket, 4 green "
        "phases; ~1,100 veh/h",
        build_net=functools.partial(_grid_net, size=2),
        base_rate=1200.0,
        trip_options=_THROUGH,
    ),
    "grid4x4": _Recipe(
        signals=16,
        description="4x4 grid, 200 m blocks, 2 lanes + left pocket, 4 green "
        "phases; ~1,500 veh/h",
        build_net=functools.partial(_grid_net, size=4),
        base_rate=1600.0,
        trip_options=_THROUGH,
    ),
    "arterial4": _Recipe(
        signals=4,
        description="four signals on a 2+2-lane main road crossed by 1-lane "
        "side streets; ~1,300 veh/h, most on the main road",
        build_net=_arterial_net,
        base_rate=1400.0,
        # Weighting edges by lanes and speed^3 puts ~half the trips end to end
        # on the main road.
        trip_options=(*_THROUGH, "--lanes", "--speed-exponent", "3"),
    ),
    "city": _Recipe(
        signals=11,
        description="random city net: 3- and 4-arm signals, 1-3 lanes, 2-4 "
        "green phases; 07:00-08:00, ~1,000 veh/h",
        build_net=_city_net,
        base_rate=1100.0,
        trip_options=("--fringe-factor", "5", "--min-distance", "400"),
        begin=7 * HOUR_S,
    ),
}


def list_scenarios() -> list[tuple[str, int, str]]:
    """The built-in scenarios as ``(name, number of signals, description)``."""
    return [(name, r.signals, r.description) for name, r in _RECIPES.items()]


def default_cache_dir() -> Path:
    """``$MARLKD_CACHE`` if set, else ``~/.cache/marlkd/scenarios``."""
    configured = os.environ.get("MARLKD_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "marlkd" / "scenarios"


def get_scenario(name: str, *, cache_dir: Path | None = None) -> Scenario:
    """A built-in scenario, its network generated into the cache if missing.

    Args:
        name: one of the names of :func:`list_scenarios`.
        cache_dir: root of the cache; :func:`default_cache_dir` when None.

    Returns:
        The scenario; its demand is generated per seed by ``route_files``.

    Raises:
        UserError: if ``name`` is not a built-in scenario.
    """
    recipe = _RECIPES.get(name)
    if recipe is None:
        choices = ", ".join(_RECIPES)
        raise UserError(
            f"unknown scenario {name!r}: choose one of {choices} "
            "(see `marlkd scenarios`)"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root.expanduser().absolute()  # the tools run in other folders
    folder = root / f"{CACHE_VERSION}-sumo{_sumo_version()}" / name
    scenario = BuiltinScenario(
        name=name,
        net_file=folder / NET_FILE,
        begin=recipe.begin,
        end=recipe.begin + HOUR_S,
        description=recipe.description,
        recipe=recipe,
        folder=folder,
    )
    _cached(scenario.net_file, recipe.build_net, scenario._header())
    return scenario


# --------------------------------------------------------------------- demand
def _build_routes(scenario: BuiltinScenario, net: Path, seed: int, work: Path) -> Path:
    """Write the demand of ``scenario`` for ``seed`` into ``work``; return its path.

    ``randomTrips.py`` draws the trips and has ``duarouter`` turn them into full
    routes; trips that cannot be routed are dropped.
    """
    rates = [f"{scenario.recipe.base_rate * factor:g}" for factor in DEMAND_PROFILE]
    routes = work / "routes.rou.xml"
    command = [
        sys.executable,
        sumo_api.tool("randomTrips.py"),
        "--net-file", str(net),
        "--output-trip-file", str(work / "trips.xml"),
        "--route-file", str(routes),
        "--seed", str(seed),
        "--begin", f"{scenario.begin:g}",
        "--end", f"{scenario.end:g}",
        "--trip-attributes", 'departLane="best" departSpeed="max"',
        *scenario.recipe.trip_options,
        "--binomial", "4",
        "--insertion-rate", *rates,
    ]  # fmt: skip
    _run(command, work)
    if not routes.exists():
        raise RuntimeError(f"randomTrips.py wrote no routes for {scenario.name}")
    return routes


# --------------------------------------------------------------------- caching
def _cached(target: Path, build: Callable[[Path], Path], header: str) -> Path:
    """Return ``target``, generating it first if it does not exist.

    ``build`` writes the file into a fresh work folder beside ``target`` and
    returns its path; the file gets ``header`` as its only comment and is moved
    to ``target`` atomically. A lock file makes concurrent callers wait for the
    first one instead of generating the same file again.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _lock(target.parent / f".{target.name}.lock"):
        if target.exists():  # another process generated it while we waited
            return target
        logger.info("generating %s", target)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".work-") as tmp:
            produced = build(Path(tmp))
            final = Path(tmp) / "final.xml"
            _replace_header(produced, final, header)
            os.replace(final, target)
        logger.info("generated %s in %.1f s", target, time.perf_counter() - start)
    return target


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (no lock where fcntl is missing)."""
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


# The XML declaration, comments and blank space before the root element.
_PROLOGUE = re.compile(r"(?:\s*(?:<\?.*?\?>|<!--.*?-->))*\s*", re.DOTALL)


def _replace_header(source: Path, destination: Path, header: str) -> None:
    """Copy an XML file, replacing everything before its root element.

    SUMO's tools write their configuration there, with the date and file paths;
    dropping it makes generated files reproducible byte for byte.
    """
    text = source.read_text(encoding="utf-8")
    body = text[_PROLOGUE.match(text).end() :]
    if not body.startswith("<"):
        raise RuntimeError(f"{source} holds no XML element")
    destination.write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n\n<!-- {header} -->\n\n' + body,
        encoding="utf-8",
    )


def _run(command: list[str], cwd: Path) -> None:
    """Run a SUMO tool in ``cwd``; raise with its error output if it fails."""
    env = {**os.environ, "SUMO_HOME": str(sumo_api.sumo_home())}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    program = Path(command[1] if command[0] == sys.executable else command[0]).name
    if done.stderr.strip():
        logger.debug("%s said: %s", program, done.stderr.strip())
    if done.returncode != 0:
        tail = " ".join(done.stderr.split()[-60:])
        raise RuntimeError(f"{program} failed with code {done.returncode}: {tail}")


@functools.cache
def _sumo_version() -> str:
    try:
        return metadata.version("eclipse-sumo")
    except metadata.PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------- user scenarios
def user_scenario(
    net: Path,
    routes: Sequence[Path],
    begin: float | None = None,
    end: float | None = None,
) -> Scenario:
    """A scenario from the user's network and route files, checked up front.

    Args:
        net: a SUMO ``.net.xml`` with at least one traffic light.
        routes: route files with the demand.
        begin: simulation start in seconds; by default the earliest departure
            in ``routes``, rounded down to a whole second.
        end: simulation end in seconds; by default ``begin`` + one hour.

    Returns:
        The scenario; every seed gets the same route files.

    Raises:
        UserError: if a file is missing or unreadable, the net has no traffic
            light, or the span is empty.
    """
    net = Path(net)
    routes = tuple(Path(r) for r in routes)
    _check_net(net)
    if not routes:
        raise UserError("no route files given: pass SUMO .rou.xml files with --routes")
    earliest = _earliest_departure(routes)
    if begin is None:
        if earliest is None:
            raise UserError(
                f"{', '.join(map(str, routes))} define no vehicle, trip or flow with "
                "a numeric departure time: add demand or give the begin time"
            )
        begin = float(math.floor(earliest))
    end = begin + HOUR_S if end is None else end
    if end <= begin:
        raise UserError(
            f"end {end:g} s is not after begin {begin:g} s: pass end > begin"
        )
    name = net.name.removesuffix(".gz").removesuffix(".xml").removesuffix(".net")
    return FileScenario(
        name=name,
        net_file=net,
        begin=float(begin),
        end=float(end),
        description=f"{net.name} with {', '.join(r.name for r in routes)}",
        routes=routes,
    )


def scenario_from_sumocfg(path: Path) -> Scenario:
    """A scenario from a ``.sumocfg``: its net, route files, begin and end.

    Relative file names are taken from the config's folder. A missing or
    negative end means one hour after begin. Additional files are not loaded; a
    warning names them.

    Raises:
        UserError: if the config or a file it names is missing or unreadable,
            or the net has no traffic light.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SUMO config {path} not found: pass an existing .sumocfg")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise UserError(
            f"SUMO config {path} is not valid XML ({exc}): fix it or pass net and "
            "route files directly"
        ) from exc
    values = {
        element.tag: element.get("value", "")
        for element in root.iter()
        if element.tag
        in ("net-file", "route-files", "additional-files", "begin", "end")
    }
    for key in ("net-file", "route-files"):
        if not values.get(key, "").strip():
            raise UserError(
                f'{path} names no <{key}>: add <{key} value="..."/> under <input>'
            )
    if values.get("additional-files", "").strip():
        logger.warning(
            "%s: additional files %s are not loaded; put vehicle types the routes "
            "need into a route file",
            path,
            values["additional-files"],
        )

    def files(value: str) -> list[Path]:
        return [
            path.parent / name.strip()
            for name in re.split("[,;]", value)
            if name.strip()
        ]

    def seconds(key: str) -> float | None:
        if key not in values:
            return None
        parsed = _parse_time(values[key])
        if parsed is None:
            raise UserError(
                f'{path}: <{key} value="{values[key]}"> is not a time: use seconds '
                "or HH:MM:SS"
            )
        return parsed

    end = seconds("end")
    return user_scenario(
        files(values["net-file"])[0],
        files(values["route-files"]),
        begin=seconds("begin"),
        end=None if end is not None and end < 0 else end,  # SUMO's -1: no end
    )


def _check_net(net: Path) -> None:
    """Raise UserError unless ``net`` is a readable SUMO net with a traffic light."""
    if not net.is_file():
        raise UserError(
            f"net file {net} not found: pass an existing SUMO .net.xml with --net"
        )
    sumo_api.sumo_home()
    import sumolib

    try:
        parsed = sumolib.net.readNet(str(net))
    except Exception as exc:  # sumolib raises SAX, value and key errors alike
        raise UserError(
            f"{net} is not a valid SUMO network ({_one_line(exc)}): pass a .net.xml "
            "written by netconvert or netgenerate"
        ) from exc
    if not parsed.getTrafficLights():
        raise UserError(
            f"{net} has no traffic lights: marlkd controls signalised intersections; "
            "pick a net with <tlLogic> elements or build one with netconvert "
            "--tls.guess"
        )


def _earliest_departure(routes: Sequence[Path]) -> float | None:
    """Earliest numeric departure in ``routes``; each file is parsed in full.

    Raises:
        UserError: if a file is missing or is not well-formed XML.
    """
    earliest = None
    for path in routes:
        if not path.is_file():
            raise UserError(
                f"route file {path} not found: pass existing SUMO route files with "
                "--routes"
            )
        try:
            for event, element in ET.iterparse(path, events=("start", "end")):
                if event == "end":
                    element.clear()  # keep memory flat on large files
                    continue
                attribute = _DEPARTURE_ATTRIBUTE.get(element.tag)
                if attribute is None:
                    continue
                # A flow without begin starts at 0; "triggered" and the like
                # name no time.
                default = "0" if attribute == "begin" else ""
                departure = _parse_time(element.get(attribute, default))
                if departure is not None and (earliest is None or departure < earliest):
                    earliest = departure
        except ET.ParseError as exc:
            raise UserError(
                f"route file {path} is not valid XML ({exc}): fix it or generate "
                "routes with randomTrips.py or duarouter"
            ) from exc
    return earliest


def _parse_time(value: str) -> float | None:
    """Seconds in a SUMO time: ``25200``, ``25200.5``, ``07:00:00``, ``1:07:00:00``.

    Returns:
        The time in seconds, or None for words such as ``triggered`` or ``now``.
    """
    parts = value.strip().split(":")
    if len(parts) not in (1, 3, 4):
        return None
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        return None
    seconds = sum(
        number * unit
        for number, unit in zip(reversed(numbers), (1, 60, 3600, 86400), strict=False)
    )
    return seconds if math.isfinite(seconds) else None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
