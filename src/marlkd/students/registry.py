"""Build a student by kind."""

from __future__ import annotations

from marlkd.errors import UserError
from marlkd.students.base import Student
from marlkd.students.layout import AgentLayout
from marlkd.students.mlp import MLPStudent
from marlkd.students.phase import PhaseStudent
from marlkd.students.routing import RoutingStudent

STUDENTS: dict[str, type[Student]] = {
    "mlp": MLPStudent,
    "phase": PhaseStudent,
    "routing": RoutingStudent,
}


def make_student(kind: str, layout: AgentLayout, **kwargs) -> Student:
    """The student of ``kind`` for the agents of ``layout``.

    Args:
        kind: "mlp", "phase" or "routing" (clients' students, one per agent).
        layout: the agents the student acts for.
        **kwargs: the student's constructor arguments (hidden, shared,
            agent_embedding; for routing: client_kind, client_kwargs,
            assignment).
    """
    if kind not in STUDENTS:
        raise UserError(
            f"unknown student '{kind}': choose one of {', '.join(STUDENTS)}"
        )
    if "hidden" in kwargs:
        kwargs["hidden"] = tuple(kwargs["hidden"])
    return STUDENTS[kind](layout, **kwargs)
