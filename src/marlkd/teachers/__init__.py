"""Teachers: rule-based experts and trained networks behind one interface."""

from marlkd.teachers.base import Teacher, TeacherOutput, masked_argmax
from marlkd.teachers.registry import CONTROLLERS, make_controller

__all__ = [
    "CONTROLLERS",
    "Teacher",
    "TeacherOutput",
    "make_controller",
    "masked_argmax",
]
