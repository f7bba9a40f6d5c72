"""MaxPressure picks the phase of highest pressure in a hand-made situation."""

from __future__ import annotations

import numpy as np

from marlkd.envs.traffic.env import _agent_spec
from marlkd.envs.traffic.signals import plan_from_program
from marlkd.teachers.fixed_time import FixedTime
from marlkd.teachers.max_pressure import MaxPressure

# Four approaches N, E, S, W, one lane each, going straight through:
# link 0: N->S, link 1: S->N (phase 0), link 2: E->W, link 3: W->E (phase 1).
LINKS = [
    [("N_in", "S_out", "")],
    [("S_in", "N_out", "")],
    [("E_in", "W_out", "")],
    [("W_in", "E_out", "")],
]
PROGRAM = [("GGrr", 30.0), ("yyrr", 3.0), ("rrGG", 20.0), ("rryy", 3.0)]
LENGTHS = {x: 75.0 for x in ("N_in", "S_in", "E_in", "W_in", "S_out", "N_out",
                             "W_out", "E_out")}  # fmt: skip


def make_spec():
    return _agent_spec(plan_from_program("C", PROGRAM, LINKS), LENGTHS)


def observation(spec, phase, green_time, in_queue, out_queue):
    sl = spec.obs_slices()
    obs = np.zeros(spec.obs_size, dtype=np.float32)
    obs[sl["phase"]][phase] = 1
    obs[sl["green_time_s"]] = green_time
    obs[sl["in_queue_veh"]] = in_queue
    obs[sl["in_count_veh"]] = in_queue
    obs[sl["out_queue_veh"]] = out_queue
    obs[sl["out_count_veh"]] = out_queue
    return obs


def expected_scores(pressure, current):
    """Pressure, +0.5 for the current phase, +0.2 tanh(count pressure / 20).

    In these observations every vehicle is queued, so counts equal queues.
    """
    pressure = np.asarray(pressure, dtype=float)
    scores = pressure + 0.2 * np.tanh(pressure / 20)
    scores[current] += 0.5
    return scores


def test_highest_pressure_phase_wins():
    spec = make_spec()
    teacher = MaxPressure({"C": spec})
    # in lanes in order N_in, S_in, E_in, W_in; out lanes S_out, N_out, W_out, E_out
    # phase 0: (4 - 0) + (3 - 1) = 6; phase 1: (5 - 4) + (2 - 0) = 3.
    obs = observation(spec, 1, 20, in_queue=[4, 3, 5, 2], out_queue=[0, 1, 4, 0])
    out = teacher.act({"C": obs}, {"C": np.array([1, 1])})
    np.testing.assert_allclose(out.scores["C"], expected_scores([6, 3], 1), rtol=1e-6)
    assert out.actions["C"] == 0


def test_outgoing_queue_lowers_pressure():
    spec = make_spec()
    teacher = MaxPressure({"C": spec})
    # The N-S approaches are long but their exits are blocked.
    obs = observation(spec, 0, 20, in_queue=[6, 6, 2, 2], out_queue=[8, 8, 0, 0])
    out = teacher.act({"C": obs}, {"C": np.array([1, 1])})
    np.testing.assert_allclose(out.scores["C"], expected_scores([-4, 4], 0), rtol=1e-6)
    assert out.actions["C"] == 1


def test_min_green_mask_is_respected_and_ties_keep_the_phase():
    spec = make_spec()
    teacher = MaxPressure({"C": spec})
    obs = observation(spec, 1, 7, in_queue=[9, 9, 0, 0], out_queue=[0, 0, 0, 0])
    assert teacher.act({"C": obs}, {"C": np.array([0, 1])}).actions["C"] == 1
    tie = observation(spec, 1, 20, in_queue=[1, 1, 1, 1], out_queue=[0, 0, 0, 0])
    assert teacher.act({"C": tie}, {"C": np.array([1, 1])}).actions["C"] == 1


def test_count_pressure_breaks_ties_only():
    spec = make_spec()
    teacher = MaxPressure({"C": spec})
    sl = spec.obs_slices()
    # Queue pressures tie at 2 and 2; E-W carries more moving vehicles.
    obs = observation(spec, 0, 20, in_queue=[1, 1, 1, 1], out_queue=[0, 0, 0, 0])
    obs[sl["in_count_veh"]] = [1, 1, 6, 6]
    scores = teacher.act({"C": obs}, {"C": np.array([1, 1])}).scores["C"]
    # count pressures: phase 0 = 1 + 1 = 2, phase 1 = 6 + 6 = 12
    expected = [2 + 0.2 * np.tanh(2 / 20) + 0.5, 2 + 0.2 * np.tanh(12 / 20)]
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    # Current phase 0 keeps on the queue tie; masked out, phase 1 is chosen.
    assert teacher.act({"C": obs}, {"C": np.array([1, 1])}).actions["C"] == 0
    assert teacher.act({"C": obs}, {"C": np.array([0, 1])}).actions["C"] == 1
    # A whole vehicle of queue pressure outweighs any count difference and the
    # current phase's half vehicle.
    obs = observation(spec, 1, 20, in_queue=[2, 1, 1, 1], out_queue=[0, 0, 0, 0])
    obs[sl["in_count_veh"]] = [2, 1, 60, 60]
    out = teacher.act({"C": obs}, {"C": np.array([1, 1])})
    assert out.actions["C"] == 0


def test_fixed_time_replays_the_programmed_split():
    spec = make_spec()
    teacher = FixedTime({"C": spec}, delta_time=10)
    mask = {"C": np.array([1, 1])}
    queue = [0, 0, 0, 0]
    # Phase 0 is programmed for 30 s: keep at 17 s, switch at 27 s.
    keep = observation(spec, 0, 17, queue, queue)
    switch = observation(spec, 0, 27, queue, queue)
    assert teacher.act({"C": keep}, mask).actions["C"] == 0
    assert teacher.act({"C": switch}, mask).actions["C"] == 1
    # Phase 1 is programmed for 20 s and wraps round to phase 0.
    assert (
        teacher.act({"C": observation(spec, 1, 17, queue, queue)}, mask).actions["C"]
        == 0
    )
