"""Phase, yellow, all-red and green-limit logic of a signal plan."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from marlkd.envs.traffic.signals import (
    GREEN,
    Movement,
    SignalState,
    plan_from_program,
)

PROGRAM = [
    ("GGgrrrGGgrrr", 42.0),
    ("yyyrrryyyrrr", 3.0),
    ("rrrGGgrrrGGg", 30.0),
    ("rrryyyrrryyy", 3.0),
]


def links(n: int):
    return [[(f"in{i}", f"out{i}", f":via{i}")] for i in range(n)]


def test_green_phases_are_the_programs_green_states():
    plan = plan_from_program("C", PROGRAM + [("GGgrrrGGgrrr", 10.0)], links(12))
    assert plan.green_states == ("GGgrrrGGgrrr", "rrrGGgrrrGGg")
    assert plan.green_durations == (42.0, 30.0)
    assert plan.num_phases == 2


def test_all_red_and_yellow_only_phases_are_not_actions():
    program = [("rrrr", 2.0), ("GGrr", 20.0), ("yyrr", 3.0), ("rrGG", 20.0)]
    plan = plan_from_program("C", program, links(4))
    assert plan.green_states == ("GGrr", "rrGG")


def test_yellow_then_red_between_phases():
    plan = plan_from_program("C", PROGRAM, links(12))
    assert plan.yellow_state(0, 1) == "yyyrrryyyrrr"
    assert plan.red_state(0, 1) == "rrrrrrrrrrrr"
    assert plan.yellow_state(1, 0) == "rrryyyrrryyy"


def test_link_green_in_both_phases_stays_green():
    plan = plan_from_program("C", [("GGr", 20.0), ("GrG", 20.0)], links(3))
    assert plan.yellow_state(0, 1) == "Gyr"
    assert plan.red_state(0, 1) == "Grr"


def test_phase_movements_follow_green_links():
    plan = plan_from_program("C", PROGRAM, links(12))
    assert plan.phase_movements(1) == tuple(
        Movement(f"in{i}", f"out{i}") for i in (3, 4, 5, 9, 10, 11)
    )
    assert plan.in_lanes == tuple(f"in{i}" for i in range(12))


def test_min_green_allows_only_the_current_phase():
    plan = plan_from_program("C", PROGRAM, links(12))
    signal = SignalState(plan, min_green=15, max_green=60)
    signal.reset(0)
    signal.green_time = 7
    assert signal.action_mask() == [True, False]
    assert signal.resolve(1) == 0
    signal.green_time = 15
    assert signal.action_mask() == [True, True]
    assert signal.resolve(1) == 1


def test_max_green_forces_a_change():
    plan = plan_from_program("C", PROGRAM, links(12))
    signal = SignalState(plan, min_green=5, max_green=60)
    signal.reset(1)
    signal.green_time = 60
    assert signal.action_mask() == [True, False]
    assert signal.resolve(1) == 0


states = st.text(alphabet="GgrsyO", min_size=1, max_size=24)


@given(st.data())
def test_yellow_state_property(data):
    a = data.draw(states.filter(lambda s: any(c in GREEN for c in s) and "y" not in s))
    b = data.draw(
        st.text(alphabet="Ggrs", min_size=len(a), max_size=len(a)).filter(
            lambda s: any(c in GREEN for c in s) and s != a
        )
    )
    plan = plan_from_program("C", [(a, 10.0), (b, 10.0)], links(len(a)))
    yellow = plan.yellow_state(0, 1)
    for x, y, z in zip(a, b, yellow, strict=True):
        if x in GREEN and y not in GREEN:
            assert z == "y"
        else:
            assert z == x
    red = plan.red_state(0, 1)
    assert all(r not in GREEN or y in GREEN for r, y in zip(red, b, strict=True))
