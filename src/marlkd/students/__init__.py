"""Student networks that act per agent from a padded batch of observations."""

from marlkd.students.base import Student, StudentOutput
from marlkd.students.checkpoint import (
    check_layout,
    load_student,
    save_student,
    student_state,
)
from marlkd.students.layout import AgentEntry, AgentLayout
from marlkd.students.mlp import MLPStudent
from marlkd.students.phase import PhaseStudent
from marlkd.students.registry import STUDENTS, make_student
from marlkd.students.routing import RoutingStudent

__all__ = [
    "STUDENTS",
    "AgentEntry",
    "AgentLayout",
    "MLPStudent",
    "PhaseStudent",
    "RoutingStudent",
    "Student",
    "StudentOutput",
    "check_layout",
    "load_student",
    "make_student",
    "save_student",
    "student_state",
]
