"""Students on hand-made layouts: shapes, masks, mixed agents, checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marlkd.distill.losses import ce_loss
from marlkd.envs.traffic.env import _agent_spec
from marlkd.envs.traffic.signals import plan_from_program
from marlkd.errors import UserError
from marlkd.students import (
    AgentEntry,
    AgentLayout,
    MLPStudent,
    PhaseStudent,
    check_layout,
    load_student,
    make_student,
    save_student,
    student_state,
)
from marlkd.teachers.max_pressure import MaxPressure

OBS_SIZES = (6, 9, 12)
NUM_ACTIONS = (2, 3, 4)
K = 3


def hand_layout(features: bool = True, seed: int = 0) -> AgentLayout:
    """Three agents, obs sizes 6/9/12 and 2/3/4 actions.

    Agent i's action a reads obs entries a, a + A, a + 2A, ... (a "lane" per
    action), with weights 1 for feature 0, 0.5 for feature 1, and a random
    weight for feature 2.
    """
    rng = np.random.default_rng(seed)
    agents = []
    for i, (d, a) in enumerate(zip(OBS_SIZES, NUM_ACTIONS, strict=True)):
        m = None
        if features:
            m = np.zeros((d, a, K), dtype=np.float32)
            for entry in range(d):
                m[entry, entry % a, 0] = 1.0
                m[entry, entry % a, 1] = 0.5
            m[:, :, 2] = rng.normal(size=(d, a))
        scale = np.arange(1, d + 1, dtype=np.float32)
        agents.append(AgentEntry(f"tls{i}", d, a, scale, m))
    return AgentLayout(tuple(agents))


def mixed_batch(layout: AgentLayout, agents, seed: int = 0):
    """Padded obs, agent and mask for ``agents``; the first action is masked
    wherever an agent has more than two."""
    rng = np.random.default_rng(seed)
    b = len(agents)
    obs = np.zeros((b, layout.max_obs_size), dtype=np.float32)
    mask = np.zeros((b, layout.max_actions), dtype=bool)
    for row, i in enumerate(agents):
        entry = layout.agents[i]
        obs[row, : entry.obs_size] = rng.uniform(0, 10, entry.obs_size)
        mask[row, : entry.num_actions] = True
        if entry.num_actions > 2:
            mask[row, 0] = False
    return (
        torch.from_numpy(obs),
        torch.tensor(agents, dtype=torch.int64),
        torch.from_numpy(mask),
    )


STUDENT_CASES = [
    ("mlp", {}),
    ("mlp", {"shared": False}),
    ("mlp", {"agent_embedding": 0, "hidden": (16,)}),
    ("phase", {}),
    ("phase", {"agent_embedding": 4, "hidden": (8, 8, 8)}),
]


def build(kind, kwargs, layout=None):
    torch.manual_seed(0)
    return make_student(kind, layout or hand_layout(), **kwargs)


@pytest.mark.parametrize(("kind", "kwargs"), STUDENT_CASES)
def test_mixed_batch_shapes_and_masks(kind, kwargs):
    student = build(kind, kwargs)
    agents = [0, 1, 2, 2, 1, 0, 2]
    obs, agent, mask = mixed_batch(student.layout, agents)

    out = student(obs, agent, mask)
    hidden = kwargs.get("hidden", (64, 64))
    assert out.logits.shape == (len(agents), 4)
    assert out.features.shape == (len(agents), hidden[-1])
    assert student.feature_dim == hidden[-1]
    assert torch.isfinite(out.logits).all()
    # Masked and padded actions sit far below every allowed one.
    allowed_min = out.logits[mask].min()
    assert (out.logits[~mask] < allowed_min - 1e30).all()
    assert mask.gather(1, student.act(obs, agent, mask)[:, None]).all()
    assert student.num_parameters() > 0


@pytest.mark.parametrize(("kind", "kwargs"), STUDENT_CASES)
def test_rows_do_not_depend_on_the_rest_of_the_batch(kind, kwargs):
    student = build(kind, kwargs)
    obs, agent, mask = mixed_batch(student.layout, [0, 1, 2, 2, 1, 0])
    batch = student(obs, agent, mask)
    for row in range(len(agent)):
        alone = student(obs[row : row + 1], agent[row : row + 1], mask[row : row + 1])
        torch.testing.assert_close(alone.logits[0], batch.logits[row])
        torch.testing.assert_close(alone.features[0], batch.features[row])


@pytest.mark.parametrize(("kind", "kwargs"), STUDENT_CASES)
def test_padding_entries_are_ignored(kind, kwargs):
    student = build(kind, kwargs)
    obs, agent, mask = mixed_batch(student.layout, [0, 1, 2])
    garbage = obs.clone()
    garbage[0, 6:] = 123.0  # agent 0 has 6 entries
    garbage[1, 9:] = -7.0  # agent 1 has 9
    torch.testing.assert_close(
        student(garbage, agent, mask).logits, student(obs, agent, mask).logits
    )


def test_act_never_picks_a_masked_action():
    student = build("mlp", {})
    rng = np.random.default_rng(1)
    agents = rng.integers(0, 3, size=200).tolist()
    obs, agent, _ = mixed_batch(student.layout, agents, seed=1)
    exists = torch.from_numpy(student.layout.action_exists())[agent]
    mask = exists & torch.from_numpy(rng.random((200, 4)) < 0.5)
    # At least one allowed action per row: the last one each agent has.
    last = torch.tensor([NUM_ACTIONS[i] - 1 for i in agents])
    mask[torch.arange(200), last] = True
    # Make masked actions the most attractive ones for an unmasked network.
    with torch.no_grad():
        student.head.bias.copy_(torch.tensor([50.0, 40.0, 30.0, 20.0]))
    actions = student.act(obs, agent, mask)
    assert mask.gather(1, actions[:, None]).all()


def test_mask_none_allows_each_agents_own_actions():
    student = build("phase", {})
    obs, agent, _ = mixed_batch(student.layout, [0, 1, 2])
    logits = student(obs, agent).logits
    exists = torch.from_numpy(student.layout.action_exists())[agent]
    assert (logits[~exists] < -1e30).all()
    assert (logits[exists] > -1e30).all()


def test_unshared_mlp_agents_have_their_own_weights():
    student = build("mlp", {"shared": False})
    obs, agent, mask = mixed_batch(student.layout, [0, 1, 2, 0, 1, 2])
    before = student(obs, agent, mask).logits.detach().clone()
    with torch.no_grad():
        for p in [*student.bodies[1].parameters(), *student.heads[1].parameters()]:
            p.add_(torch.randn_like(p))
    after = student(obs, agent, mask).logits.detach()

    others = agent != 1
    torch.testing.assert_close(after[others], before[others])
    assert not torch.allclose(after[~others], before[~others])
    # Each agent's network is sized to the agent: 6 -> 64 -> 64 -> 2 for agent 0.
    assert student.bodies[0][0].in_features == 6
    assert student.heads[2].out_features == 4


def test_phase_student_features_are_the_layouts_linear_map():
    layout = hand_layout()
    student = build("phase", {}, layout)
    obs, agent, _ = mixed_batch(layout, [0, 1, 2])
    got = student.action_features(obs, agent)
    for row, i in enumerate(agent.tolist()):
        entry = layout.agents[i]
        want = entry.features(obs[row, : entry.obs_size].numpy())
        np.testing.assert_allclose(
            got[row, : entry.num_actions].numpy(), want, rtol=1e-5, atol=1e-6
        )
        assert (got[row, entry.num_actions :] == 0).all()


@settings(max_examples=40, deadline=None)
@given(
    perm=st.permutations(range(4)),
    allowed=st.lists(st.booleans(), min_size=4, max_size=4).filter(any),
    seed=st.integers(0, 2**16),
)
def test_phase_student_is_equivariant_to_permuting_actions(perm, allowed, seed):
    layout = hand_layout()
    student = build("phase", {"agent_embedding": 3}, layout)
    # The same weights on a layout whose agent 2 lists its actions in perm order.
    entries = list(layout.agents)
    a2 = entries[2]
    entries[2] = AgentEntry(
        a2.name, a2.obs_size, a2.num_actions, a2.obs_scale, a2.action_features[:, perm]
    )
    permuted = PhaseStudent(AgentLayout(tuple(entries)), agent_embedding=3)
    permuted.load_state_dict(student.state_dict())

    obs, agent, _ = mixed_batch(layout, [2, 2, 2], seed=seed)
    mask = torch.tensor([allowed] * 3)
    logits = student(obs, agent, mask).logits
    permuted_logits = permuted(obs, agent, mask[:, perm]).logits
    torch.testing.assert_close(permuted_logits, logits[:, perm], rtol=1e-5, atol=1e-5)


def test_phase_student_learns_a_linear_rule():
    # Label: the allowed action of largest w . f_a, f_a its K = 3 features.
    layout = hand_layout()
    rng = np.random.default_rng(0)
    agents = rng.integers(0, 3, size=600).tolist()
    obs, agent, _ = mixed_batch(layout, agents, seed=2)
    # Each existing action is disallowed with probability 0.3, keeping one.
    exists = layout.action_exists()[agents]
    allowed = exists & (rng.random(exists.shape) > 0.3)
    last = [NUM_ACTIONS[i] - 1 for i in agents]
    allowed[np.arange(600), last] |= ~allowed.any(axis=1)
    mask = torch.from_numpy(allowed)
    w = np.array([1.0, -2.0, 0.7])
    labels = []
    for row, i in enumerate(agents):
        entry = layout.agents[i]
        scores = entry.features(obs[row, : entry.obs_size].numpy()) @ w
        scores = np.where(mask[row, : entry.num_actions].numpy(), scores, -np.inf)
        labels.append(int(np.argmax(scores)))
    labels = torch.tensor(labels)

    torch.manual_seed(0)
    student = PhaseStudent(layout, hidden=(32, 32))
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    for _ in range(200):
        loss = ce_loss(student(obs, agent, mask).logits, labels, mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    accuracy = (student.act(obs, agent, mask) == labels).float().mean()
    assert accuracy > 0.95


# ------------------------------------------------------------------- layout
def test_layout_round_trips_through_json():
    layout = hand_layout()
    data = json.loads(json.dumps(layout.to_dict()))
    back = AgentLayout.from_dict(data)
    assert back.names == layout.names
    for a, b in zip(layout.agents, back.agents, strict=True):
        assert (a.obs_size, a.num_actions) == (b.obs_size, b.num_actions)
        np.testing.assert_array_equal(a.obs_scale, b.obs_scale)
        np.testing.assert_array_equal(a.action_features, b.action_features)


def test_from_sizes_has_no_action_features():
    layout = AgentLayout.from_sizes({"a": 5, "b": 7}, {"a": 2, "b": 3})
    assert layout.names == ["a", "b"]
    assert (layout.max_obs_size, layout.max_actions) == (7, 3)
    assert not layout.has_action_features
    np.testing.assert_array_equal(layout.inverse_scales()[0], [1, 1, 1, 1, 1, 0, 0])
    with pytest.raises(UserError, match="mlp"):
        PhaseStudent(layout)
    assert AgentLayout.from_dict(layout.to_dict()).names == ["a", "b"]


# Two-phase cross as in the MaxPressure tests: N-S on phase 0, E-W on phase 1,
# lanes of 75 m, i.e. a capacity of 10 vehicles each.
LINKS = [
    [("N_in", "S_out", "")],
    [("S_in", "N_out", "")],
    [("E_in", "W_out", "")],
    [("W_in", "E_out", "")],
]
PROGRAM = [("GGrr", 30.0), ("yyrr", 3.0), ("rrGG", 20.0), ("rryy", 3.0)]
LANES = ("N_in", "S_in", "E_in", "W_in", "S_out", "N_out", "W_out", "E_out")


def test_traffic_layout_features_match_the_observation():
    spec = _agent_spec(plan_from_program("C", PROGRAM, LINKS), dict.fromkeys(LANES, 75))
    layout = AgentLayout.from_traffic_specs({"C": spec}, max_green=60.0)
    sl = spec.obs_slices()
    obs = np.zeros(spec.obs_size, dtype=np.float32)
    obs[sl["phase"]] = [0, 1]
    obs[sl["may_switch"]] = 1
    obs[sl["green_time_s"]] = 30
    # in lanes N, S, E, W; out lanes S, N, W, E (order of the links).
    obs[sl["in_count_veh"]] = [6, 4, 5, 2]
    obs[sl["in_queue_veh"]] = [4, 3, 5, 2]
    obs[sl["out_count_veh"]] = [1, 2, 4, 0]
    obs[sl["out_queue_veh"]] = [0, 1, 4, 0]

    f = layout.agents[0].features(obs)
    # Capacity 75 / 7.5 = 10 vehicles per lane.
    # phase 0 (N->S, S->N): in count (6 + 4) / 10, in queue (4 + 3) / 10,
    # out count (1 + 2) / 10, out queue (0 + 1) / 10, pressure (7 - 1) / 10.
    # phase 1 (E->W, W->E): 0.7, 0.7, 0.4, 0.4, (7 - 4) / 10.
    # Then is-current, may switch, green 30 / 60.
    want = [
        [1.0, 0.7, 0.3, 0.1, 0.6, 0.0, 1.0, 0.5],
        [0.7, 0.7, 0.4, 0.4, 0.3, 1.0, 1.0, 0.5],
    ]
    np.testing.assert_allclose(f, want, rtol=1e-6, atol=1e-6)
    pressures = MaxPressure({"C": spec}).pressures("C", obs)
    np.testing.assert_allclose(f[:, 4] * 10, pressures, rtol=1e-6)


# --------------------------------------------------------------- checkpoint
@pytest.mark.parametrize(("kind", "kwargs"), STUDENT_CASES)
def test_checkpoint_round_trip_gives_identical_logits(kind, kwargs, tmp_path):
    student = build(kind, kwargs).eval()
    obs, agent, mask = mixed_batch(student.layout, [0, 1, 2, 1])
    path = tmp_path / "ckpt" / "student.pt"
    save_student(student, path)
    assert [p.name for p in path.parent.iterdir()] == ["student.pt"]

    for source in (path, student_state(student)):
        loaded = load_student(source, layout=hand_layout())
        assert type(loaded) is type(student)
        assert loaded.config == student.config
        out, want = loaded(obs, agent, mask), student(obs, agent, mask)
        assert torch.equal(out.logits, want.logits)
        assert torch.equal(out.features, want.features)


def test_checkpoint_is_plain_data(tmp_path):
    path = tmp_path / "student.pt"
    save_student(build("phase", {}), path)
    state = torch.load(path, weights_only=True)
    assert state["kind"] == "phase"
    json.dumps({k: v for k, v in state.items() if k != "state_dict"})


def test_check_layout_names_what_differs():
    layout = hand_layout()
    other = AgentLayout.from_sizes({"tls0": 6, "tls1": 10, "tls2": 12}, [2, 3, 5])
    with pytest.raises(UserError) as info:
        check_layout(layout, other)
    message = str(info.value)
    assert "'tls1' has obs size 9 in the student, 10 here" in message
    assert "'tls2' has 4 actions in the student, 5 here" in message
    assert "distil a student for this scenario" in message
    assert "\n" not in message
    with pytest.raises(UserError, match="3 agents in the student, 2"):
        check_layout(layout, AgentLayout.from_sizes({"tls0": 6, "tls1": 9}, [2, 3]))
    check_layout(layout, hand_layout(seed=5))


def test_load_student_rejects_a_mismatched_layout(tmp_path):
    path = tmp_path / "student.pt"
    save_student(build("mlp", {}), path)
    other = AgentLayout.from_sizes([6, 9], [2, 3])
    with pytest.raises(UserError, match="distil a student for this scenario"):
        load_student(path, layout=other)


def test_load_student_reports_bad_files(tmp_path):
    with pytest.raises(UserError, match="no student checkpoint"):
        load_student(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="could not be read"):
        load_student(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(UserError, match="not a marlkd student checkpoint"):
        load_student(other)


def test_factory_builds_by_kind_and_names_the_choices():
    assert isinstance(make_student("mlp", hand_layout()), MLPStudent)
    assert isinstance(make_student("phase", hand_layout(), hidden=[8]), PhaseStudent)
    with pytest.raises(UserError, match="choose one of mlp, phase"):
        make_student("gnn", hand_layout())
    with pytest.raises(NotImplementedError, match="PhaseStudent has no shared=False"):
        make_student("phase", hand_layout(), shared=False)
    with pytest.raises(UserError, match="hidden"):
        make_student("mlp", hand_layout(), hidden=())
