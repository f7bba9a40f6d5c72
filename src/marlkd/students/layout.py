"""What a student needs to know about the agents it acts for.

An ``AgentLayout`` lists, per agent, the size of its observation, its number of
actions, a scale that brings each observation entry roughly into [0, 1] and,
optionally, a linear map from the observation to K features per action:

    f[a, k] = sum_d (obs[d] / scale[d]) * M[d, a, k]

Students see a batch of agents at once: each observation zero-padded to the
largest size ``max_obs_size`` and each action mask padded with False to
``max_actions``. The layout is independent of any environment; it is built from
the traffic environment's ``AgentSpec`` objects or from bare sizes, and it turns
into a JSON-able dict for checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from marlkd.errors import UserError

if TYPE_CHECKING:
    from marlkd.envs.traffic.env import AgentSpec

LAYOUT_VERSION = 1

PRESSURE_SCALE_VEH = 10.0
"""Vehicles per unit of the raw pressure feature, to keep it near [-1, 1]."""

TRAFFIC_FEATURES = (
    "in_count",
    "in_queue",
    "out_count",
    "out_queue",
    "pressure",
    "is_current",
    "may_switch",
    "green_time",
)
"""The per-phase features of ``AgentLayout.from_traffic_specs``, in order."""


@dataclass(frozen=True, eq=False)
class AgentEntry:
    """One agent of a layout.

    Attributes:
        name: the agent's name in the environment.
        obs_size: length of the agent's observation.
        num_actions: number of the agent's actions.
        obs_scale: (obs_size,) positive scale; students divide the observation
            by it.
        action_features: optional (obs_size, num_actions, K) linear map from the
            scaled observation to K features per action.
    """

    name: str
    obs_size: int
    num_actions: int
    obs_scale: np.ndarray
    action_features: np.ndarray | None = None

    def __post_init__(self) -> None:
        scale = np.asarray(self.obs_scale, dtype=np.float32)
        object.__setattr__(self, "obs_scale", scale)
        if self.obs_size < 1 or self.num_actions < 1:
            raise ValueError(
                f"agent {self.name!r} has obs size {self.obs_size} and "
                f"{self.num_actions} actions: both must be at least 1"
            )
        if scale.shape != (self.obs_size,) or not np.all(scale > 0):
            raise ValueError(
                f"agent {self.name!r}: obs_scale must hold {self.obs_size} positive "
                f"numbers, got shape {scale.shape}"
            )
        if self.action_features is not None:
            features = np.asarray(self.action_features, dtype=np.float32)
            object.__setattr__(self, "action_features", features)
            if features.ndim != 3 or features.shape[:2] != (
                self.obs_size,
                self.num_actions,
            ):
                raise ValueError(
                    f"agent {self.name!r}: action_features must have shape "
                    f"({self.obs_size}, {self.num_actions}, K), got {features.shape}"
                )

    def features(self, obs: np.ndarray) -> np.ndarray:
        """The (num_actions, K) action features of one raw observation."""
        if self.action_features is None:
            raise ValueError(f"agent {self.name!r} has no action features")
        return np.einsum("d,dak->ak", obs / self.obs_scale, self.action_features)


@dataclass(frozen=True, eq=False)
class AgentLayout:
    """The agents a student serves, in index order.

    Attributes:
        agents: one entry per agent; a batch's ``agent`` tensor indexes it.
        feature_names: optional names of the K action features.
    """

    agents: tuple[AgentEntry, ...]
    feature_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        agents = tuple(self.agents)
        object.__setattr__(self, "agents", agents)
        object.__setattr__(self, "feature_names", tuple(self.feature_names))
        if not agents:
            raise ValueError("a layout needs at least one agent")
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names repeat in the layout: {names}")
        with_features = {a.action_features is not None for a in agents}
        if len(with_features) > 1:
            raise ValueError(
                "either every agent of a layout has action features or none has"
            )
        widths = {
            a.action_features.shape[2] for a in agents if a.action_features is not None
        }
        if len(widths) > 1:
            raise ValueError(
                f"agents give different numbers of action features: {sorted(widths)}"
            )
        if self.feature_names and widths and len(self.feature_names) not in widths:
            raise ValueError(
                f"{len(self.feature_names)} feature names for "
                f"{widths.pop()} action features"
            )

    # ------------------------------------------------------------ builders
    @classmethod
    def from_sizes(
        cls,
        obs_sizes: Mapping[str, int] | Sequence[int],
        num_actions: Mapping[str, int] | Sequence[int],
        obs_scales: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None,
    ) -> AgentLayout:
        """A layout without action features, for any environment.

        Args:
            obs_sizes: per agent its observation length; a mapping keys the
                agents by name, a sequence names them "0", "1", ...
            num_actions: per agent its number of actions, in the same form.
            obs_scales: per agent its observation scale; ones when None.

        Returns:
            The layout, agents in the order of ``obs_sizes``.
        """
        if isinstance(obs_sizes, Mapping):
            names = list(obs_sizes)
            sizes = [obs_sizes[n] for n in names]
        else:
            sizes = list(obs_sizes)
            names = [str(i) for i in range(len(sizes))]

        def per_agent(values, what):
            if isinstance(values, Mapping):
                missing = [n for n in names if n not in values]
                if missing:
                    raise ValueError(f"{what} lacks agents {missing}")
                return [values[n] for n in names]
            values = list(values)
            if len(values) != len(names):
                raise ValueError(
                    f"{what} has {len(values)} entries for {len(names)} agents"
                )
            return values

        actions = per_agent(num_actions, "num_actions")
        if obs_scales is None:
            scales = [np.ones(int(s), dtype=np.float32) for s in sizes]
        else:
            scales = per_agent(obs_scales, "obs_scales")
        return cls(
            tuple(
                AgentEntry(n, int(s), int(a), sc)
                for n, s, a, sc in zip(names, sizes, actions, scales, strict=True)
            )
        )

    @classmethod
    def from_traffic_specs(
        cls, specs: Mapping[str, AgentSpec], max_green: float
    ) -> AgentLayout:
        """A layout with per-phase features for the traffic environment.

        Each phase p gets the features of ``TRAFFIC_FEATURES``, all linear in
        the observation (x is the observation divided by ``obs_scale``, so counts
        and queues are in units of their lane's capacity):

            in_count    sum over p's movements of the incoming lane's count
            in_queue    the same for the incoming queue
            out_count   sum over p's movements of the outgoing lane's count
            out_queue   the same for the outgoing queue
            pressure    (phase_in @ in_queue - phase_out @ out_queue) in
                        vehicles, over PRESSURE_SCALE_VEH: MaxPressure's score
            is_current  1 when p is the phase showing now
            may_switch  1 when the signal may change phase (same for every p)
            green_time  seconds of the current green over max_green (same)

        Args:
            specs: the environment's agent specs, in agent order.
            max_green: the environment's maximum green, seconds.

        Returns:
            The layout, agents in the order of ``specs``.
        """
        agents = []
        for name, spec in specs.items():
            sl = spec.obs_slices()
            pin = np.asarray(spec.phase_in, dtype=np.float32)
            pout = np.asarray(spec.phase_out, dtype=np.float32)
            phases = np.arange(spec.num_phases)
            m = np.zeros(
                (spec.obs_size, spec.num_phases, len(TRAFFIC_FEATURES)),
                dtype=np.float32,
            )
            m[sl["in_count_veh"], :, 0] = pin.T
            m[sl["in_queue_veh"], :, 1] = pin.T
            m[sl["out_count_veh"], :, 2] = pout.T
            m[sl["out_queue_veh"], :, 3] = pout.T
            # x holds queue / capacity: times capacity gives vehicles back.
            in_cap = np.asarray(spec.in_capacity, dtype=np.float32)[:, None]
            out_cap = np.asarray(spec.out_capacity, dtype=np.float32)[:, None]
            m[sl["in_queue_veh"], :, 4] = pin.T * in_cap / PRESSURE_SCALE_VEH
            m[sl["out_queue_veh"], :, 4] = -pout.T * out_cap / PRESSURE_SCALE_VEH
            m[sl["phase"].start + phases, phases, 5] = 1.0
            m[sl["may_switch"], :, 6] = 1.0
            m[sl["green_time_s"], :, 7] = 1.0
            agents.append(
                AgentEntry(
                    name=name,
                    obs_size=spec.obs_size,
                    num_actions=spec.num_phases,
                    obs_scale=spec.obs_scale(max_green),
                    action_features=m,
                )
            )
        return cls(tuple(agents), feature_names=TRAFFIC_FEATURES)

    # ---------------------------------------------------------- properties
    @property
    def num_agents(self) -> int:
        return len(self.agents)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.agents]

    @property
    def max_obs_size(self) -> int:
        return max(a.obs_size for a in self.agents)

    @property
    def max_actions(self) -> int:
        return max(a.num_actions for a in self.agents)

    @property
    def has_action_features(self) -> bool:
        return self.agents[0].action_features is not None

    @property
    def num_action_features(self) -> int:
        """K, or 0 when the layout has no action features."""
        if not self.has_action_features:
            return 0
        return self.agents[0].action_features.shape[2]

    def index(self, name: str) -> int:
        """The index of agent ``name``."""
        return self.names.index(name)

    # ------------------------------------------------------------- padding
    def inverse_scales(self) -> np.ndarray:
        """(N, max_obs_size) one over each obs scale; 0 on padded entries."""
        out = np.zeros((self.num_agents, self.max_obs_size), dtype=np.float32)
        for i, a in enumerate(self.agents):
            out[i, : a.obs_size] = 1.0 / a.obs_scale
        return out

    def action_exists(self) -> np.ndarray:
        """(N, max_actions) True where the agent has that action."""
        out = np.zeros((self.num_agents, self.max_actions), dtype=bool)
        for i, a in enumerate(self.agents):
            out[i, : a.num_actions] = True
        return out

    def padded_action_features(self) -> np.ndarray:
        """(N, max_obs_size, max_actions, K) every agent's map, zero-padded."""
        if not self.has_action_features:
            raise ValueError("the layout has no action features")
        out = np.zeros(
            (
                self.num_agents,
                self.max_obs_size,
                self.max_actions,
                self.num_action_features,
            ),
            dtype=np.float32,
        )
        for i, a in enumerate(self.agents):
            out[i, : a.obs_size, : a.num_actions] = a.action_features
        return out

    # ------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        """The layout as plain lists, numbers and strings (JSON-able).

        Action feature maps are mostly zeros, so they are stored sparse: their
        shape, the (d, a, k) index of each non-zero entry and its value.
        """
        agents = []
        for a in self.agents:
            item = {
                "name": a.name,
                "obs_size": a.obs_size,
                "num_actions": a.num_actions,
                "obs_scale": [float(x) for x in a.obs_scale],
                "action_features": None,
            }
            if a.action_features is not None:
                nonzero = np.argwhere(a.action_features != 0)
                item["action_features"] = {
                    "shape": list(a.action_features.shape),
                    "index": nonzero.tolist(),
                    "value": [float(v) for v in a.action_features[tuple(nonzero.T)]],
                }
            agents.append(item)
        return {
            "version": LAYOUT_VERSION,
            "feature_names": list(self.feature_names),
            "agents": agents,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> AgentLayout:
        """The layout ``to_dict`` wrote."""
        try:
            if data["version"] != LAYOUT_VERSION:
                raise UserError(
                    f"agent layout version {data['version']} is not supported "
                    f"(this marlkd reads version {LAYOUT_VERSION}): distil the "
                    "student again with this marlkd"
                )
            agents = []
            for item in data["agents"]:
                features = None
                sparse = item.get("action_features")
                if sparse is not None:
                    features = np.zeros(sparse["shape"], dtype=np.float32)
                    if sparse["index"]:
                        index = np.asarray(sparse["index"], dtype=np.int64)
                        features[tuple(index.T)] = sparse["value"]
                agents.append(
                    AgentEntry(
                        name=str(item["name"]),
                        obs_size=int(item["obs_size"]),
                        num_actions=int(item["num_actions"]),
                        obs_scale=np.asarray(item["obs_scale"], dtype=np.float32),
                        action_features=features,
                    )
                )
            return cls(tuple(agents), tuple(data.get("feature_names", ())))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise UserError(
                f"the stored agent layout is damaged ({exc!r}): distil the "
                "student again"
            ) from exc
