"""A trained network as teacher: a student checkpoint loaded for any run."""

from __future__ import annotations

from pathlib import Path

from marlkd.errors import UserError
from marlkd.rollout.batching import AgentBatcher
from marlkd.students.checkpoint import check_layout, load_student
from marlkd.students.policy import StudentPolicy


class NetworkTeacher(StudentPolicy):
    """A checkpointed policy network; its logits are its scores."""

    name = "network"

    @classmethod
    def from_checkpoint(cls, path: Path, env) -> NetworkTeacher:
        from marlkd.students import AgentLayout

        path = Path(path)
        if not path.exists():
            raise UserError(
                f"teacher checkpoint {path} not found: pass the student.pt of a run"
            )
        student = load_student(path)
        expected = AgentLayout.from_traffic_specs(env.specs, env.config.max_green)
        check_layout(student.layout, expected)
        batcher = AgentBatcher(
            env.possible_agents, expected.max_obs_size, expected.max_actions
        )
        return cls(student, batcher)
