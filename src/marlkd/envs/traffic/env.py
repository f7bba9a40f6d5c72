"""Traffic signal control on SUMO as a PettingZoo ``ParallelEnv``.

Every controlled traffic light is an agent. Each decision interval
(``delta_time``, 10 s by default) every agent picks one of its intersection's
green phases; a signal whose phase changes shows yellow (and optionally
all-red) first, then its new green for the rest of the interval.

SUMO is advanced with one ``simulationStep(target_time)`` call per segment of
the interval (at most three). Lane data is read once per decision, straight
from libsumo (through subscriptions over TraCI), and the observations, rewards
and queues of all agents are computed together with index arrays built once.
``bench/env_overhead.py`` measures the time this costs against the time inside
SUMO's step; ``docs/benchmarks.md`` records the figures.

Observation of an agent, in vehicles and seconds (``AgentSpec.obs_scale``
gives a per-entry scale for normalising):

    [ phase one-hot (P) | may switch (1) | green time s (1)
      | incoming count (I) | incoming queue (I)
      | outgoing count (O) | outgoing queue (O) ]

A queue is the number of vehicles slower than 0.1 m/s. Each agent's info holds
``action_mask``, the phases it may choose now (see ``SignalState``).
"""

from __future__ import annotations

import functools
import logging
import tempfile
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from marlkd.envs.traffic import metrics as traffic_metrics
from marlkd.envs.traffic import sumo as sumo_api
from marlkd.envs.traffic.signals import SignalPlan, SignalState, plan_from_program
from marlkd.errors import UserError
from marlkd.schema import option

if TYPE_CHECKING:
    from marlkd.envs.traffic.scenarios import Scenario

logger = logging.getLogger(__name__)

VEHICLE_LENGTH_M = 7.5  # jam spacing used to turn lane length into capacity
REWARDS = ("queue", "pressure", "wait", "delay")

# libsumo allows a single simulation per process: the env that holds it.
_ACTIVE_LIBSUMO_ENV: TrafficSignalEnv | None = None


@dataclass
class TrafficEnvConfig:
    """Settings of the traffic signal environment."""

    delta_time: float = option(10.0, "seconds between two decisions of every agent")
    yellow_time: float = option(3.0, "seconds of yellow on every phase change")
    all_red_time: float = option(0.0, "seconds of all-red clearance after the yellow")
    min_green: float = option(
        5.0, "seconds a green must last before its signal may switch away"
    )
    max_green: float = option(90.0, "seconds after which a green must end")
    reward: str = option(
        "queue",
        "reward of each agent: queue, pressure, wait (waiting-time difference)"
        " or delay",
    )
    demand_scale: float = option(1.0, "factor on the scenario's demand (SUMO --scale)")
    teleport_time: float = option(
        -1.0, "SUMO's --time-to-teleport in seconds; negative keeps teleporting off"
    )
    duration: float | None = option(
        None, "seconds simulated per episode; unset runs the scenario's whole span"
    )
    gui: bool = option(False, "show sumo-gui (through TraCI) instead of libsumo")
    sumo_args: list[str] = option([], "extra command-line options passed to SUMO")

    def validate(self) -> None:
        if self.delta_time <= 0:
            raise UserError(f"delta_time is {self.delta_time}: set it above 0 seconds")
        if self.yellow_time < 0 or self.all_red_time < 0:
            raise UserError("yellow_time and all_red_time must be 0 or more seconds")
        if self.yellow_time + self.all_red_time >= self.delta_time:
            raise UserError(
                f"yellow_time + all_red_time ({self.yellow_time + self.all_red_time}"
                f" s) must be shorter than delta_time ({self.delta_time} s)"
            )
        if self.min_green > self.max_green:
            raise UserError(
                f"min_green ({self.min_green}) exceeds max_green ({self.max_green})"
            )
        if self.reward not in REWARDS:
            raise UserError(
                f"unknown reward '{self.reward}': choose one of {', '.join(REWARDS)}"
            )
        if self.demand_scale <= 0:
            raise UserError(f"demand_scale is {self.demand_scale}: set it above 0")


@dataclass(frozen=True)
class AgentSpec:
    """Static description of one agent: its signal plan and observation layout.

    Attributes:
        agent: the agent's name, the traffic light's id.
        plan: green phases and the movements they serve.
        in_capacity: vehicles each incoming lane holds at jam density.
        out_capacity: the same for outgoing lanes.
        phase_in: (P, I) count of each phase's green movements per incoming lane.
        phase_out: (P, O) the same per outgoing lane.
    """

    agent: str
    plan: SignalPlan
    in_capacity: np.ndarray
    out_capacity: np.ndarray
    phase_in: np.ndarray
    phase_out: np.ndarray

    @property
    def num_phases(self) -> int:
        return self.plan.num_phases

    @property
    def num_in(self) -> int:
        return len(self.in_capacity)

    @property
    def num_out(self) -> int:
        return len(self.out_capacity)

    @property
    def obs_size(self) -> int:
        return self.num_phases + 2 + 2 * self.num_in + 2 * self.num_out

    def obs_slices(self) -> dict[str, slice]:
        """Where each block of the observation lies."""
        p, i, o = self.num_phases, self.num_in, self.num_out
        bounds = {
            "phase": p,
            "may_switch": 1,
            "green_time_s": 1,
            "in_count_veh": i,
            "in_queue_veh": i,
            "out_count_veh": o,
            "out_queue_veh": o,
        }
        slices, start = {}, 0
        for name, size in bounds.items():
            slices[name] = slice(start, start + size)
            start += size
        return slices

    def obs_scale(self, max_green: float) -> np.ndarray:
        """A scale per observation entry that brings it roughly into [0, 1]."""
        return np.concatenate(
            [
                np.ones(self.num_phases + 1),
                [max_green],
                self.in_capacity,
                self.in_capacity,
                self.out_capacity,
                self.out_capacity,
            ]
        ).astype(np.float32)


class TrafficSignalEnv(ParallelEnv):
    """Multi-intersection traffic signal control; one agent per traffic light.

    Args:
        scenario: the network and demand to simulate.
        config: timing, reward and SUMO settings.
        output_dir: where SUMO writes the trip and edge statistics of each
            episode; a temporary folder when None.
    """

    metadata = {"name": "marlkd_traffic_v0", "render_modes": ["human"]}

    def __init__(
        self,
        scenario: Scenario,
        config: TrafficEnvConfig | None = None,
        output_dir: Path | None = None,
        render_mode: str | None = None,
    ):
        self.scenario = scenario
        self.config = config or TrafficEnvConfig()
        if render_mode == "human":
            self.config.gui = True
        self.config.validate()
        self.render_mode = render_mode
        self._tmp = None
        if output_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="marlkd-sumo-")
            output_dir = Path(self._tmp.name)
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.begin = float(scenario.begin)
        span = float(scenario.end) - self.begin
        self.end = self.begin + (self.config.duration or span)

        self._sumo = sumo_api.api(gui=self.config.gui)
        self._running = False
        self._episode = 0
        self._rng = np.random.default_rng()
        self.timers = {"sumo_step_s": 0.0, "sumo_start_s": 0.0, "sumo_close_s": 0.0}
        self.last_episode: traffic_metrics.EpisodeMetrics | None = None

        self.specs = self._read_network()
        self.possible_agents = list(self.specs)
        self.agents: list[str] = []
        self._signals = {
            a: SignalState(s.plan, self.config.min_green, self.config.max_green)
            for a, s in self.specs.items()
        }
        # Masks by (phase, green time), which alone decide them, and the
        # transition states of every phase change, so a decision builds none.
        self._mask_cache: dict[str, dict] = {a: {} for a in self.specs}
        self._yellow_states = {
            a: {
                (i, j): s.plan.yellow_state(i, j)
                for i in range(s.num_phases)
                for j in range(s.num_phases)
                if i != j
            }
            for a, s in self.specs.items()
        }
        self._agent_state = {
            a: (self._signals[a], self._mask_cache[a]) for a in self.specs
        }
        self._index_lanes()
        self._observation_spaces = {
            a: spaces.Box(0.0, np.inf, shape=(s.obs_size,), dtype=np.float32)
            for a, s in self.specs.items()
        }
        self._action_spaces = {
            a: spaces.Discrete(s.num_phases) for a, s in self.specs.items()
        }

    # ------------------------------------------------------------------ spaces
    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str) -> spaces.Discrete:
        return self._action_spaces[agent]

    @functools.cached_property
    def state_space(self) -> spaces.Box:
        size = sum(s.obs_size for s in self.specs.values())
        return spaces.Box(0.0, np.inf, shape=(size,), dtype=np.float32)

    def state(self) -> np.ndarray:
        """The global view: every agent's observation, in ``possible_agents`` order."""
        return self._observe_all()

    # --------------------------------------------------------------- episode
    def reset(self, seed: int | None = None, options: dict | None = None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        else:
            seed = int(self._rng.integers(2**31 - 1))
        self._close_simulation(collect=False)
        self._start_simulation(seed)

        self.agents = list(self.possible_agents)
        for signal in self._signals.values():
            signal.reset(0)
            self._set_state(signal.plan.tls_id, signal.plan.green_states[0])
        self._queue_sum = np.zeros(len(self.possible_agents))
        self._samples = 0
        self._advance(self.begin + self.config.delta_time)
        for signal in self._signals.values():
            signal.green_time = self.config.delta_time
        self._read_lanes()
        self._prev_wait = self._wait_per_agent()
        return self._observations(), self._infos()

    def step(self, actions: dict[str, int]):
        cfg = self.config
        now = self._time
        changing = []
        for agent in self.agents:
            signal, masks = self._agent_state[agent]
            phase = signal.phase
            action = int(actions.get(agent, phase))
            entry = masks.get((phase, signal.green_time)) or self._allowed(agent)
            # An allowed action runs as asked; for any other, the signal's
            # own rule (SignalState.resolve) says which phase runs.
            allowed = entry[0]
            if not (0 <= action < len(allowed) and allowed[action]):
                action = signal.resolve(action)
            if action != phase:
                changing.append((agent, signal, phase, action))

        for agent, signal, src, dst in changing:
            self._set_state(signal.plan.tls_id, self._yellow_states[agent][src, dst])
        if changing and cfg.yellow_time > 0:
            self._advance(now + cfg.yellow_time)
        if changing and cfg.all_red_time > 0:
            for _, signal, src, dst in changing:
                self._set_state(signal.plan.tls_id, signal.plan.red_state(src, dst))
            self._advance(now + cfg.yellow_time + cfg.all_red_time)
        switch_time = cfg.yellow_time + cfg.all_red_time
        for _, signal, _, dst in changing:
            self._set_state(signal.plan.tls_id, signal.plan.green_states[dst])
            signal.phase = dst
            signal.green_time = -switch_time
        delta = cfg.delta_time
        for agent in self.agents:
            self._signals[agent].green_time += delta
        self._advance(now + delta)

        self._read_lanes()
        rewards = self._rewards()
        obs = self._observations()
        done = self._time >= self.end - 1e-6
        terminations = dict.fromkeys(self.agents, False)
        truncations = dict.fromkeys(self.agents, done)
        infos = self._infos()
        if done:
            self._close_simulation(collect=True)
            for agent in self.agents:
                infos[agent]["episode"] = self.last_episode.network
            self.agents = []
        return obs, rewards, terminations, truncations, infos

    def close(self) -> None:
        self._close_simulation(collect=False)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def render(self) -> None:
        """The GUI renders itself; ask for it with ``render_mode="human"``."""

    @property
    def sim_time(self) -> float:
        """Current simulation time in seconds."""
        return self._time

    def action_masks(self) -> dict[str, np.ndarray]:
        return {a: self._mask(a) for a in self.agents}

    # ------------------------------------------------------------- simulation
    def _sumo_command(self, seed: int, routes: tuple[Path, ...]) -> list[str]:
        cfg = self.config
        out = self.output_dir
        return [
            sumo_api.binary("sumo-gui" if cfg.gui else "sumo"),
            "--net-file", str(self.scenario.net_file),
            "--route-files", ",".join(str(r) for r in routes),
            "--begin", f"{self.begin:g}",
            "--end", f"{self.end:g}",
            "--seed", str(seed),
            "--scale", f"{cfg.demand_scale:g}",
            "--time-to-teleport", f"{cfg.teleport_time:g}",
            "--tripinfo-output", str(out / "tripinfo.xml"),
            "--tripinfo-output.write-unfinished", "true",
            "--tripinfo-output.write-undeparted", "true",
            "--edgedata-output", str(out / "edgedata.xml"),
            "--statistic-output", str(out / "statistics.xml"),
            "--no-step-log", "true",
            "--no-warnings", "true",
            "--duration-log.disable", "true",
            *cfg.sumo_args,
        ]  # fmt: skip

    def _start_simulation(self, seed: int) -> None:
        global _ACTIVE_LIBSUMO_ENV
        if not self.config.gui:
            if _ACTIVE_LIBSUMO_ENV is not None and _ACTIVE_LIBSUMO_ENV is not self:
                raise RuntimeError(
                    "libsumo runs one simulation per process and another "
                    "TrafficSignalEnv holds it: close that env first, or run "
                    "simulations in separate processes (marlkd's Ray collector)"
                )
            _ACTIVE_LIBSUMO_ENV = self
        routes = self.scenario.route_files(seed)
        command = self._sumo_command(seed, routes)
        logger.debug("starting SUMO: %s", " ".join(command))
        start = time.perf_counter()
        try:
            self._sumo.start(command)
        except Exception as exc:
            _ACTIVE_LIBSUMO_ENV = None
            raise UserError(
                f"SUMO could not load {self.scenario.net_file} with routes "
                f"{', '.join(map(str, routes))}: {exc}; check the files with "
                "`sumo -n NET -r ROUTES`"
            ) from exc
        self.timers["sumo_start_s"] += time.perf_counter() - start
        self._running = True
        self._episode += 1
        self._time = self.begin
        for lane in self._lanes:
            self._sumo.lane.subscribe(lane, self._lane_vars)

    def _close_simulation(self, collect: bool) -> None:
        global _ACTIVE_LIBSUMO_ENV
        if not self._running:
            return
        start = time.perf_counter()
        self._sumo.close()
        self.timers["sumo_close_s"] += time.perf_counter() - start
        self._running = False
        if _ACTIVE_LIBSUMO_ENV is self:
            _ACTIVE_LIBSUMO_ENV = None
        if collect:
            self.last_episode = traffic_metrics.episode_metrics(
                tripinfo=self.output_dir / "tripinfo.xml",
                edgedata=self.output_dir / "edgedata.xml",
                statistics=self.output_dir / "statistics.xml",
                incoming_edges={a: self._in_edges[a] for a in self.possible_agents},
                mean_queue=dict(
                    zip(
                        self.possible_agents,
                        self._queue_sum / max(self._samples, 1),
                        strict=True,
                    )
                ),
            )

    def _advance(self, target: float) -> None:
        start = time.perf_counter()
        self._sumo.simulationStep(target)
        self.timers["sumo_step_s"] += time.perf_counter() - start
        self._time = target

    def _set_state(self, tls_id: str, state: str) -> None:
        self._sumo.trafficlight.setRedYellowGreenState(tls_id, state)

    # ---------------------------------------------------------------- network
    def _read_network(self) -> dict[str, AgentSpec]:
        """Start SUMO once on the network alone to read signals and lanes."""
        import sumolib

        sumo_api.sumo_home()
        try:
            net = sumolib.net.readNet(str(self.scenario.net_file), withPrograms=True)
        except Exception as exc:
            raise UserError(
                f"{self.scenario.net_file} is not a readable SUMO network ({exc}):"
                " pass a .net.xml written by netconvert or netgenerate"
            ) from exc
        lane_length = {
            lane.getID(): lane.getLength()
            for edge in net.getEdges()
            for lane in edge.getLanes()
        }
        self._lane_speed = {
            lane.getID(): lane.getSpeed()
            for edge in net.getEdges()
            for lane in edge.getLanes()
        }
        self._lane_edge = {
            lane.getID(): edge.getID()
            for edge in net.getEdges()
            for lane in edge.getLanes()
        }
        specs = {}
        skipped = []
        for tls in sorted(net.getTrafficLights(), key=lambda t: t.getID()):
            plan = _plan_from_sumolib(tls)
            if plan.num_phases < 2 or not plan.movements:
                skipped.append(tls.getID())
                continue
            specs[tls.getID()] = _agent_spec(plan, lane_length)
        if skipped:
            logger.warning(
                "%d traffic lights have fewer than two green phases and keep "
                "their own programs: %s",
                len(skipped),
                ", ".join(skipped),
            )
        if not specs:
            raise UserError(
                f"{self.scenario.net_file} has no traffic light with two or more "
                "green phases: marlkd controls signalised intersections; build the "
                "net with `netconvert --tls.guess` or pick one with <tlLogic>s"
            )
        return specs

    def _index_lanes(self) -> None:
        lanes = []
        for spec in self.specs.values():
            lanes.extend(spec.plan.in_lanes)
            lanes.extend(spec.plan.out_lanes)
        self._lanes = list(dict.fromkeys(lanes))
        position = {lane: i for i, lane in enumerate(self._lanes)}
        n = len(self._lanes)
        self._in_idx = {
            a: np.array([position[x] for x in s.plan.in_lanes])
            for a, s in self.specs.items()
        }
        self._out_idx = {
            a: np.array([position[x] for x in s.plan.out_lanes])
            for a, s in self.specs.items()
        }
        self._in_edges = {
            a: sorted({self._lane_edge[x] for x in s.plan.in_lanes})
            for a, s in self.specs.items()
        }
        self._max_speed = np.array([self._lane_speed[x] for x in self._lanes])

        # Lane variables, one row each in _lane_data: count and halting always,
        # then what the reward needs.
        c = self._sumo.constants
        variables = {
            c.LAST_STEP_VEHICLE_NUMBER: "getLastStepVehicleNumber",
            c.LAST_STEP_VEHICLE_HALTING_NUMBER: "getLastStepHaltingNumber",
        }
        if self.config.reward == "wait":
            variables[c.VAR_WAITING_TIME] = "getWaitingTime"
        if self.config.reward == "delay":
            variables[c.LAST_STEP_MEAN_SPEED] = "getLastStepMeanSpeed"
        self._lane_vars = list(variables)
        self._lane_data = np.zeros((len(self._lane_vars), n))
        self._lane_names = np.array(self._lanes, dtype=object)
        # SUMO computes the subscribed variables inside its step and hands
        # them over in one call as {lane: {variable: value}}, lanes and
        # variables in sorted order (it keeps them in std::maps): read in
        # that order, the answer becomes one array without a lookup per lane.
        self._sorted_lanes = sorted(self._lanes)
        lane_pos = {lane: i for i, lane in enumerate(self._lanes)}
        self._lane_order = np.array([lane_pos[x] for x in self._sorted_lanes])
        sorted_vars = sorted(self._lane_vars)
        rows = [sorted_vars.index(v) for v in self._lane_vars]
        self._var_rows = None if rows == sorted(rows) else np.array(rows)

        # Agent k's sums over its lanes as one product: row k of these
        # matrices holds a 1 for each of its incoming (outgoing) lanes.
        agents = self.possible_agents
        self._in_matrix = np.zeros((len(agents), n))
        self._out_matrix = np.zeros((len(agents), n))
        for k, a in enumerate(agents):
            self._in_matrix[k, self._in_idx[a]] = 1.0
            self._out_matrix[k, self._out_idx[a]] = 1.0

        # Every agent's observation is a slice of one vector (the global
        # state): lane entries are gathered from the count and halting rows
        # of _lane_data in one indexing, the phase head is set per signal.
        bounds, lane_dst, lane_src, heads = {}, [], [], []
        start = 0
        for a in agents:
            spec, i, o = self.specs[a], self._in_idx[a], self._out_idx[a]
            head = start + spec.num_phases
            heads.append((self._signals[a], start, head))
            src = np.concatenate([i, n + i, o, n + o])
            lane_dst.append(head + 2 + np.arange(len(src)))
            lane_src.append(src)
            bounds[a] = slice(start, start + spec.obs_size)
            start += spec.obs_size
        self._obs_bounds = bounds
        self._obs_lane_dst = np.concatenate(lane_dst)
        self._obs_lane_src = np.concatenate(lane_src)
        self._obs_heads = heads  # (signal, block start, may-switch entry)
        self._obs_size = start

    def _read_lanes(self) -> None:
        data = self._lane_data
        results = self._sumo.lane.getAllSubscriptionResults()
        if list(results) == self._sorted_lanes:
            values = chain.from_iterable(map(dict.values, results.values()))
            table = np.fromiter(values, np.float64, data.size).reshape(-1, len(data)).T
            if self._var_rows is not None:
                table = table[self._var_rows]
            data[:, self._lane_order] = table
        else:  # an API that keeps another order: look each lane up by name
            for j, lane in enumerate(self._lanes):
                lane_values = results[lane]
                for i, var in enumerate(self._lane_vars):
                    data[i, j] = lane_values[var]
        # Halting counts are whole numbers: the product sums them exactly.
        self._queue = self._in_matrix @ data[1]
        self._queue_sum += self._queue
        self._samples += 1

    # ----------------------------------------------------------- agent views
    def _observe_all(self) -> np.ndarray:
        """Every agent's observation, end to end in ``possible_agents`` order."""
        flat = np.zeros(self._obs_size, dtype=np.float32)
        flat[self._obs_lane_dst] = self._lane_data[:2].ravel()[self._obs_lane_src]
        min_green = self.config.min_green
        for signal, start, may_switch_at in self._obs_heads:
            flat[start + signal.phase] = 1.0
            flat[may_switch_at] = float(signal.green_time >= min_green)
            flat[may_switch_at + 1] = max(signal.green_time, 0.0)
        return flat

    def _observations(self) -> dict[str, np.ndarray]:
        flat, bounds = self._observe_all(), self._obs_bounds
        # Copies, so that an observation kept does not hold the whole vector.
        return {a: flat[bounds[a]].copy() for a in self.agents}

    def _allowed(self, agent: str) -> tuple[list[bool], np.ndarray]:
        """The signal's ``action_mask()``, as it gives it and as int8."""
        signal = self._signals[agent]
        cache = self._mask_cache[agent]
        key = (signal.phase, signal.green_time)
        entry = cache.get(key)
        if entry is None:
            allowed = signal.action_mask()
            entry = cache[key] = (allowed, np.array(allowed, dtype=np.int8))
        return entry

    def _mask(self, agent: str) -> np.ndarray:
        return self._allowed(agent)[1].copy()

    def _infos(self) -> dict[str, dict]:
        infos = {}
        for agent in self.agents:
            signal, masks = self._agent_state[agent]
            entry = masks.get((signal.phase, signal.green_time)) or self._allowed(agent)
            infos[agent] = {"action_mask": entry[1].copy()}
        return infos

    def _wait_per_agent(self) -> dict[str, float]:
        if self.config.reward != "wait":
            return {}
        wait = self._lane_data[2]
        return {a: float(wait[self._in_idx[a]].sum()) for a in self.possible_agents}

    def _rewards(self) -> dict[str, float]:
        kind = self.config.reward
        count = self._lane_data[0]
        # Counts are whole numbers, so the products give the exact sums.
        if kind == "queue":
            per_agent = -self._queue  # the queues _read_lanes summed
        elif kind == "pressure":
            per_agent = -np.abs(self._in_matrix @ count - self._out_matrix @ count)
        if kind in ("queue", "pressure"):
            rewards = dict(zip(self.possible_agents, per_agent.tolist(), strict=True))
            if len(self.agents) != len(rewards):
                rewards = {a: rewards[a] for a in self.agents}
            return rewards
        rewards = {}
        if kind == "wait":
            wait = self._wait_per_agent()
            for a in self.agents:
                rewards[a] = self._prev_wait[a] - wait[a]
            self._prev_wait = wait
            return rewards
        for a in self.agents:  # delay: vehicles times their relative speed loss
            i = self._in_idx[a]
            speed = self._lane_data[-1][i]
            loss = 1.0 - np.minimum(speed / self._max_speed[i], 1.0)
            rewards[a] = -float((count[i] * loss).sum())
        return rewards


def _plan_from_sumolib(tls) -> SignalPlan:
    """The plan of a sumolib traffic light: its first program and its links."""
    programs = tls.getPrograms()
    program = programs[sorted(programs)[0]] if "0" not in programs else programs["0"]
    phases = [(p.state, p.duration) for p in program.getPhases()]
    size = max(len(p[0]) for p in phases) if phases else 0
    links: list[list[tuple[str, str, str]]] = [[] for _ in range(size)]
    for in_lane, out_lane, index in tls.getConnections():
        if 0 <= index < size:
            links[index].append((in_lane.getID(), out_lane.getID(), ""))
    return plan_from_program(tls.getID(), phases, links)


def _agent_spec(plan: SignalPlan, lane_length: dict[str, float]) -> AgentSpec:
    in_lanes, out_lanes = plan.in_lanes, plan.out_lanes
    in_pos = {x: i for i, x in enumerate(in_lanes)}
    out_pos = {x: i for i, x in enumerate(out_lanes)}
    phase_in = np.zeros((plan.num_phases, len(in_lanes)), dtype=np.float32)
    phase_out = np.zeros((plan.num_phases, len(out_lanes)), dtype=np.float32)
    for p in range(plan.num_phases):
        for m in plan.phase_movements(p):
            phase_in[p, in_pos[m.in_lane]] += 1
            phase_out[p, out_pos[m.out_lane]] += 1

    def capacity(lanes):
        return np.array(
            [max(lane_length[x] / VEHICLE_LENGTH_M, 1.0) for x in lanes],
            dtype=np.float32,
        )

    return AgentSpec(
        agent=plan.tls_id,
        plan=plan,
        in_capacity=capacity(in_lanes),
        out_capacity=capacity(out_lanes),
        phase_in=phase_in,
        phase_out=phase_out,
    )
