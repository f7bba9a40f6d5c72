"""Signal plans: green phases, yellow and all-red transitions, green limits.

A signalised intersection is controlled through the states SUMO knows from its
programs: one character per controlled link (``G``/``g`` green, ``y`` yellow,
``r`` red, ...). The green phases an agent chooses among are the distinct green
states of the network's own program; marlkd inserts the transition states
itself whenever the chosen phase changes:

    green(i) --yellow_time--> yellow(i→j) --all_red_time--> red(i→j) --> green(j)

A link keeps its green through the transition when it is green in both phases,
so a movement served by both never stops.
"""

from __future__ import annotations

from dataclasses import dataclass

GREEN = frozenset("Gg")
TRANSITION = frozenset("yYu")


@dataclass(frozen=True)
class Movement:
    """Traffic from one incoming lane to one outgoing lane through a signal."""

    in_lane: str
    out_lane: str


@dataclass(frozen=True)
class SignalPlan:
    """The phases of one traffic light and the movements each phase serves.

    Attributes:
        tls_id: SUMO id of the traffic light.
        green_states: one state string per green phase, the agent's actions.
        green_durations: each green phase's duration in the network's own
            program, seconds; the fixed-time controller replays them.
        link_movements: for each link index of the state strings, the
            movements it carries (empty when the index controls nothing).
    """

    tls_id: str
    green_states: tuple[str, ...]
    green_durations: tuple[float, ...]
    link_movements: tuple[tuple[Movement, ...], ...]

    @property
    def num_phases(self) -> int:
        return len(self.green_states)

    @property
    def in_lanes(self) -> tuple[str, ...]:
        """Incoming lanes in order of first appearance in the link list."""
        return _unique(m.in_lane for links in self.link_movements for m in links)

    @property
    def out_lanes(self) -> tuple[str, ...]:
        """Outgoing lanes in order of first appearance in the link list."""
        return _unique(m.out_lane for links in self.link_movements for m in links)

    @property
    def movements(self) -> tuple[Movement, ...]:
        return _unique(m for links in self.link_movements for m in links)

    def phase_movements(self, phase: int) -> tuple[Movement, ...]:
        """Movements that have green (protected or permissive) in a phase."""
        state = self.green_states[phase]
        return _unique(
            m
            for link, links in enumerate(self.link_movements)
            if state[link] in GREEN
            for m in links
        )

    def yellow_state(self, src: int, dst: int) -> str:
        """Links green in ``src`` but not in ``dst`` turn yellow; others hold."""
        a, b = self.green_states[src], self.green_states[dst]
        return "".join(
            "y" if x in GREEN and y not in GREEN else x
            for x, y in zip(a, b, strict=True)
        )

    def red_state(self, src: int, dst: int) -> str:
        """The all-red clearance after ``yellow_state``: yellow links show red."""
        return self.yellow_state(src, dst).replace("y", "r")


def plan_from_program(
    tls_id: str,
    phases: list[tuple[str, float]],
    controlled_links: list[list[tuple[str, str, str]]],
) -> SignalPlan:
    """Build a plan from a program's (state, duration) phases and SUMO's links.

    Args:
        tls_id: id of the traffic light.
        phases: the phases of the program in force, as (state, duration).
        controlled_links: ``trafficlight.getControlledLinks(tls_id)``: per link
            index a list of (incoming lane, outgoing lane, internal lane).

    Returns:
        The plan whose actions are the program's distinct green states, in
        program order. A state counts as green when it gives some link green
        and none yellow.
    """
    greens: dict[str, float] = {}
    for state, duration in phases:
        if any(c in GREEN for c in state) and not any(c in TRANSITION for c in state):
            greens.setdefault(state, float(duration))
    link_movements = tuple(
        tuple(_unique(Movement(i, o) for i, o, _ in links))
        for links in controlled_links
    )
    return SignalPlan(
        tls_id=tls_id,
        green_states=tuple(greens),
        green_durations=tuple(greens.values()),
        link_movements=link_movements,
    )


class SignalState:
    """The running state of one signal: its phase, transition and green time.

    The environment advances every signal on a common decision grid; within a
    decision interval a signal that switches shows yellow (and all-red) first,
    then its new green for the rest of the interval.
    """

    def __init__(self, plan: SignalPlan, min_green: float, max_green: float):
        self.plan = plan
        self.min_green = min_green
        self.max_green = max_green
        self.phase = 0
        self.green_time = 0.0

    def reset(self, phase: int = 0) -> None:
        self.phase = phase
        self.green_time = 0.0

    def action_mask(self) -> list[bool]:
        """Phases that may be chosen now.

        Until the current green has lasted ``min_green`` seconds only the
        current phase is allowed; once it has lasted ``max_green`` seconds it
        must end, so every other phase is allowed and it is not.
        """
        n = self.plan.num_phases
        if self.green_time < self.min_green:
            return [p == self.phase for p in range(n)]
        if self.green_time >= self.max_green:
            return [p != self.phase for p in range(n)]
        return [True] * n

    def resolve(self, action: int) -> int:
        """The phase that will run for a requested action.

        An action outside the mask is not an error: the signal keeps its
        phase while min green holds, and moves to the next phase of the cycle
        when max green has run out.
        """
        mask = self.action_mask()
        if 0 <= action < len(mask) and mask[action]:
            return action
        if mask[self.phase]:
            return self.phase
        return (self.phase + 1) % self.plan.num_phases


def _unique(items):
    return tuple(dict.fromkeys(items))
