"""Which signals are neighbours, and observations that include the neighbours'.

Two signals are neighbours when traffic leaving one reaches the other on the
next stretch of road: an outgoing lane of one lies on an edge that is, or leads
through junctions without signals to, an incoming edge of the other. Matching
whole edges (the lane id up to its last ``_``) rather than lanes catches roads
whose lane numbers differ at the two ends; following the road through
unsignalised junctions catches edges that SUMO splits, such as the turn-lane
pockets ``netgenerate`` adds (``A0A1`` then ``A0A1.50.00`` into ``A1``). The
graph is symmetric.

A neighbourhood view gives each agent, in a fixed layout of K + 1 slots,

    [ own obs (D) | neighbour 1 obs (D) | ... | neighbour K obs (D) | present (K) ]

every observation zero-padded to the largest observation size D of the
environment, neighbours in order of their ids, and a presence flag of 1 per
filled neighbour slot. With ``observe="global"`` every other agent is a
neighbour (K = N - 1), so each agent sees the whole state with itself first.
``NeighbourObservationEnv`` serves these views as an environment's
observations, so any marlkd trainer can fit a network to them.
"""

from __future__ import annotations

import functools
import heapq
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from marlkd.errors import UserError

logger = logging.getLogger(__name__)

OBSERVE_MODES = ("neighbours", "global")
DEFAULT_NEIGHBOURS = 4
MAX_ROAD_M = 600.0
"""Longest stretch of road through unsignalised junctions that joins neighbours."""


def lane_edge(lane: str) -> str:
    """The edge a lane id belongs to: the id up to its last underscore."""
    return lane.rsplit("_", 1)[0]


def neighbour_graph(
    specs: Mapping,
    net_file: str | Path | None = None,
    *,
    k: int | None = None,
    max_road_m: float = MAX_ROAD_M,
) -> dict[str, tuple[str, ...]]:
    """Every agent's neighbours, in order of their ids.

    Args:
        specs: the environment's ``AgentSpec`` per agent.
        net_file: the SUMO network; with it the road is followed through
            junctions without signals, up to ``max_road_m`` metres. Without it
            only an outgoing edge that is itself another agent's incoming edge
            joins them.
        k: keep at most this many neighbours per agent, the nearest by road
            (ties by id); a warning names the ones dropped.
        max_road_m: how far along the road to look for the next signal.

    Returns:
        ``{agent: neighbour ids}``, every agent of ``specs`` a key.
    """
    distance = _road_distances(specs, net_file, max_road_m)
    graph: dict[str, dict[str, float]] = {a: {} for a in specs}
    for (a, b), metres in distance.items():
        for x, y in ((a, b), (b, a)):
            graph[x][y] = min(metres, graph[x].get(y, np.inf))

    out = {}
    for a, near in graph.items():
        chosen = sorted(near, key=lambda b: (near[b], b))
        if k is not None and len(chosen) > k:
            logger.warning(
                "signal %s has %d neighbours; its view keeps the %d nearest and "
                "leaves out %s",
                a,
                len(chosen),
                k,
                ", ".join(chosen[k:]),
            )
            chosen = chosen[:k]
        out[a] = tuple(sorted(chosen))
    return out


def _road_distances(specs, net_file, max_road_m) -> dict[tuple[str, str], float]:
    """Metres of road from each agent to each agent its traffic reaches."""
    owner: dict[str, str] = {}  # incoming edge -> the agent it leads into
    for a, spec in specs.items():
        for lane in spec.plan.in_lanes:
            owner.setdefault(lane_edge(lane), a)
    starts = {
        a: sorted({lane_edge(x) for x in spec.plan.out_lanes})
        for a, spec in specs.items()
    }

    found: dict[tuple[str, str], float] = {}
    if net_file is None:
        for a, edges in starts.items():
            for edge in edges:
                b = owner.get(edge)
                if b is not None and b != a:
                    found[a, b] = 0.0
        return found

    net = _read_net(net_file)
    for a, edges in starts.items():
        # Dijkstra along the road from the signal's outgoing edges; a branch
        # ends at another signal's incoming edge or at a signalised junction.
        queue = [(0.0, e) for e in edges if net.hasEdge(e)]
        heapq.heapify(queue)
        seen: set[str] = set()
        while queue:
            before, edge_id = heapq.heappop(queue)
            if edge_id in seen:
                continue
            seen.add(edge_id)
            edge = net.getEdge(edge_id)
            metres = before + edge.getLength()
            b = owner.get(edge_id)
            if b is not None:
                if b != a and metres < found.get((a, b), np.inf):
                    found[a, b] = metres
                continue
            if edge.getToNode().getType().startswith("traffic_light"):
                continue
            if metres >= max_road_m:
                continue
            for nxt in edge.getOutgoing():
                if nxt.getID() not in seen:
                    heapq.heappush(queue, (metres, nxt.getID()))
    return found


@functools.lru_cache(maxsize=4)
def _read_net(net_file: str | Path):
    import sumolib

    from marlkd.envs.traffic import sumo as sumo_api

    sumo_api.sumo_home()
    try:
        return sumolib.net.readNet(str(net_file))
    except Exception as exc:
        raise UserError(
            f"{net_file} is not a readable SUMO network ({exc}): the neighbour "
            "graph needs the scenario's .net.xml"
        ) from exc


def env_neighbour_graph(
    env, observe: str = "neighbours", k: int = DEFAULT_NEIGHBOURS
) -> dict[str, tuple[str, ...]]:
    """The neighbours of every agent of a traffic environment.

    ``observe="global"`` makes every other agent a neighbour; ``k`` is then
    ignored.
    """
    if observe not in OBSERVE_MODES:
        raise UserError(
            f"unknown observe mode '{observe}': choose one of "
            f"{', '.join(OBSERVE_MODES)}"
        )
    agents = list(env.possible_agents)
    if observe == "global":
        return {a: tuple(sorted(b for b in agents if b != a)) for a in agents}
    net_file = getattr(getattr(env, "scenario", None), "net_file", None)
    return neighbour_graph(env.specs, net_file, k=k)


class NeighbourView:
    """Builds every agent's own-plus-neighbours observation.

    Args:
        obs_sizes: each agent's observation size, in the order of the
            environment's ``possible_agents`` (the order of ``state()``).
        neighbours: each agent's neighbours; at most ``k`` of them.
        k: neighbour slots per agent; unused slots are zeros with flag 0.
    """

    def __init__(
        self,
        obs_sizes: Mapping[str, int],
        neighbours: Mapping[str, Sequence[str]],
        k: int,
    ):
        self.agents = list(obs_sizes)
        self.sizes = {a: int(obs_sizes[a]) for a in self.agents}
        self.neighbours = {a: tuple(neighbours.get(a, ())) for a in self.agents}
        self.k = int(k)
        if self.k < 0:
            raise ValueError(f"k is {k}: give 0 or more neighbour slots")
        self.slot_size = max(self.sizes.values())
        self.obs_size = (1 + self.k) * self.slot_size + self.k
        self.index = {a: i for i, a in enumerate(self.agents)}
        for a, near in self.neighbours.items():
            unknown = [b for b in near if b not in self.index or b == a]
            if unknown or len(near) > self.k:
                raise ValueError(
                    f"agent {a!r}: neighbours {list(near)} must be at most {self.k} "
                    f"other agents of the environment (bad: {unknown})"
                )

        # One gather builds every view from the extended vector
        #   [ state (L) | 0 | presence of each agent (N) ],
        # so padding points at the 0 and a flag at its neighbour's presence.
        offsets = np.cumsum([0] + [self.sizes[a] for a in self.agents])
        self.state_size = int(offsets[-1])
        zero = self.state_size
        gather = np.full((len(self.agents), self.obs_size), zero, dtype=np.int64)
        for i, a in enumerate(self.agents):
            for slot, b in enumerate((a, *self.neighbours[a])):
                j = self.index[b]
                start = slot * self.slot_size
                gather[i, start : start + self.sizes[b]] = offsets[j] + np.arange(
                    self.sizes[b]
                )
                if slot:
                    gather[i, (1 + self.k) * self.slot_size + slot - 1] = zero + 1 + j
        self._gather = gather
        self._offsets = offsets

    @classmethod
    def from_env(
        cls, env, observe: str = "neighbours", k: int = DEFAULT_NEIGHBOURS
    ) -> NeighbourView:
        """The view of a traffic environment's agents."""
        graph = env_neighbour_graph(env, observe, k)
        if observe == "global":
            k = max(len(env.possible_agents) - 1, 1)
        sizes = {a: env.specs[a].obs_size for a in env.possible_agents}
        return cls(sizes, graph, k)

    # --------------------------------------------------------------- views
    def from_state(
        self, state: np.ndarray, names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The views of ``names`` (every agent when None) from ``env.state()``."""
        state = np.asarray(state, dtype=np.float32)
        if state.shape != (self.state_size,):
            raise ValueError(
                f"the state has shape {state.shape}; this view expects "
                f"({self.state_size},), every agent's observation end to end"
            )
        extended = np.concatenate(
            [state, np.zeros(1, np.float32), np.ones(len(self.agents), np.float32)]
        )
        return self._views(extended, self.agents if names is None else names)

    def from_observations(
        self, observations: Mapping[str, np.ndarray], names: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """The views of ``names`` (every key when None) from per-agent observations.

        An agent missing from ``observations`` counts as absent: its slot in
        its neighbours' views is zeros with flag 0.
        """
        flat = np.zeros(self.state_size + 1 + len(self.agents), dtype=np.float32)
        for a, obs in observations.items():
            j = self.index[a]
            obs = np.asarray(obs, dtype=np.float32)
            if obs.shape != (self.sizes[a],):
                raise ValueError(
                    f"agent {a!r} gave an observation of shape {obs.shape}; its "
                    f"size is {self.sizes[a]}"
                )
            flat[self._offsets[j] : self._offsets[j + 1]] = obs
            flat[self.state_size + 1 + j] = 1.0
        return self._views(flat, list(observations) if names is None else names)

    def _views(self, extended: np.ndarray, names) -> dict[str, np.ndarray]:
        rows = [self.index[a] for a in names]
        views = extended[self._gather[rows]]
        return {a: views[i] for i, a in enumerate(names)}

    def missing(self, observations: Mapping, names: Sequence[str]) -> list[str]:
        """Neighbours of ``names`` whose observations are not in ``observations``."""
        return sorted(
            {b for a in names for b in self.neighbours[a] if b not in observations}
        )

    # -------------------------------------------------------------- scales
    def obs_scales(self, scales: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each view's scale from the agents' own: 1 on padding and flags."""
        out = {}
        for a in self.agents:
            scale = np.ones(self.obs_size, dtype=np.float32)
            for slot, b in enumerate((a, *self.neighbours[a])):
                start = slot * self.slot_size
                scale[start : start + self.sizes[b]] = scales[b]
            out[a] = scale
        return out

    def to_dict(self) -> dict:
        """The view as plain data, for checkpoints."""
        return {
            "k": self.k,
            "obs_sizes": dict(self.sizes),
            "neighbours": {a: list(n) for a, n in self.neighbours.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> NeighbourView:
        return cls(data["obs_sizes"], data["neighbours"], int(data["k"]))


class NeighbourObservationEnv(ParallelEnv):
    """A traffic environment whose observations are neighbourhood views.

    Everything but the observations (rewards, masks in the infos, ``state()``,
    ``specs``, ``config``, ``last_episode``, ...) is the wrapped environment's.

    Args:
        env: a ``TrafficSignalEnv`` (anything with ``specs`` and the
            ParallelEnv API).
        observe: "neighbours" (its own and up to ``k`` neighbours'
            observations) or "global" (every agent's, its own first).
        k: neighbour slots per agent.
    """

    def __init__(self, env, observe: str = "neighbours", k: int = DEFAULT_NEIGHBOURS):
        self.env = env
        self.observe = observe
        self.view = NeighbourView.from_env(env, observe, k)
        self.metadata = getattr(env, "metadata", {})
        self._observation_spaces = {
            a: spaces.Box(0.0, np.inf, shape=(self.view.obs_size,), dtype=np.float32)
            for a in env.possible_agents
        }

    def __getattr__(self, name):
        if name.startswith("_") or name == "env":
            raise AttributeError(name)
        return getattr(self.env, name)

    @property
    def unwrapped(self):
        return self.env.unwrapped

    @property
    def agents(self) -> list[str]:
        return self.env.agents

    @property
    def possible_agents(self) -> list[str]:
        return self.env.possible_agents

    def observation_space(self, agent: str) -> spaces.Box:
        return self._observation_spaces[agent]

    def action_space(self, agent: str):
        return self.env.action_space(agent)

    @property
    def state_space(self):
        return self.env.state_space

    def state(self) -> np.ndarray:
        return self.env.state()

    def reset(self, seed: int | None = None, options: dict | None = None):
        observations, infos = self.env.reset(seed=seed, options=options)
        return self.view.from_observations(observations), infos

    def step(self, actions: dict):
        observations, rewards, terminations, truncations, infos = self.env.step(actions)
        views = self.view.from_observations(observations)
        return views, rewards, terminations, truncations, infos

    def render(self):
        return self.env.render()

    def close(self) -> None:
        self.env.close()

    def layout(self):
        """The ``AgentLayout`` of the views: their sizes, actions and scales."""
        return view_layout(self.view, self.env.specs, self.env.config.max_green)


def view_layout(view: NeighbourView, specs: Mapping, max_green: float):
    """The ``AgentLayout`` of a view's observations of agents with ``specs``.

    Each agent's scale is its own and its neighbours' ``obs_scale`` in their
    slots, 1 on padding and presence flags; its actions are its phases.
    """
    from marlkd.students import AgentLayout

    own = {a: specs[a].obs_scale(max_green) for a in view.agents}
    return AgentLayout.from_sizes(
        dict.fromkeys(view.agents, view.obs_size),
        {a: specs[a].num_phases for a in view.agents},
        view.obs_scales(own),
    )
