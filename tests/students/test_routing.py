"""The routing student: each agent's logits are those of its own client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marlkd.errors import UserError
from marlkd.export import export_student
from marlkd.runtime import Runtime
from marlkd.students import (
    AgentLayout,
    RoutingStudent,
    load_student,
    make_student,
    save_student,
)

LAYOUT = AgentLayout.from_sizes([5, 4, 5, 3], [3, 2, 3, 3])
ASSIGNMENT = [1, 0, 1, 2]


def clients(shared: bool = True) -> list:
    torch.manual_seed(0)
    return [
        make_student("mlp", LAYOUT, hidden=(8, 8), shared=shared, agent_embedding=4)
        for _ in range(3)
    ]


def batch(rows: int = 40):
    generator = torch.Generator().manual_seed(1)
    agent = torch.randint(0, LAYOUT.num_agents, (rows,), generator=generator)
    obs = torch.rand(rows, LAYOUT.max_obs_size, generator=generator) * 10
    mask = torch.from_numpy(LAYOUT.action_exists())[agent]
    mask[::3, 0] = False
    return obs, agent, mask


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
def test_each_agent_gets_its_clients_logits(shared):
    own = clients(shared)
    routing = RoutingStudent.of_clients(own, ASSIGNMENT)
    obs, agent, mask = batch()
    with torch.no_grad():
        out = routing(obs, agent, mask)
        for i, k in enumerate(ASSIGNMENT):
            rows = agent == i
            expected = own[k](obs[rows], agent[rows], mask[rows])
            torch.testing.assert_close(out.logits[rows], expected.logits)
            torch.testing.assert_close(out.features[rows], expected.features)
        # and not another client's
        rows = agent == 0
        other = own[0](obs[rows], agent[rows], mask[rows]).logits
        assert not torch.allclose(out.logits[rows], other)


def test_save_and_load_round_trip(tmp_path):
    routing = RoutingStudent.of_clients(clients(), ASSIGNMENT)
    save_student(routing, tmp_path / "student.pt")
    # plain data: loads with weights_only=True
    state = torch.load(tmp_path / "student.pt", weights_only=True)
    assert state["kind"] == "routing" and state["kwargs"]["assignment"] == ASSIGNMENT
    loaded = load_student(tmp_path / "student.pt", LAYOUT)
    assert isinstance(loaded, RoutingStudent)
    obs, agent, mask = batch()
    with torch.no_grad():
        assert torch.equal(
            loaded(obs, agent, mask).logits, routing(obs, agent, mask).logits
        )


@pytest.mark.parametrize(
    ("assignment", "needle"),
    [([0, 1, 0], "3 assignments for 4 agents"),
     ([0, 2, 0, 2], "leaves a client without agents")],
)  # fmt: skip
def test_bad_assignments_are_refused(assignment, needle):
    with pytest.raises(UserError, match=needle):
        RoutingStudent(LAYOUT, "mlp", {"hidden": [8]}, assignment)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-agent"])
@pytest.mark.parametrize("backend", ["onnxruntime", "numpy"])
def test_export_equals_pytorch(tmp_path, shared, backend):
    routing = RoutingStudent.of_clients(clients(shared), ASSIGNMENT)
    export_student(routing, tmp_path)
    obs, agent, mask = batch()
    logits, actions = Runtime.load(tmp_path, backend=backend).run(
        obs.numpy(), agent.numpy(), mask.numpy()
    )
    with torch.no_grad():
        expected = routing(obs, agent, mask).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(actions, expected.argmax(axis=1))
