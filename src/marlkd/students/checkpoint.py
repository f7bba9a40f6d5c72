"""Save and load students as plain data that ``torch.load(weights_only=True)`` reads.

A checkpoint is a dict of strings, numbers, lists and tensors only:

    format      "marlkd.student"
    version     CHECKPOINT_VERSION
    kind        the student's kind ("mlp", "phase")
    kwargs      its constructor arguments besides the layout
    layout      ``AgentLayout.to_dict()``
    state_dict  its parameters
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path

import torch

from marlkd.errors import UserError
from marlkd.students.base import Student
from marlkd.students.layout import AgentLayout
from marlkd.students.registry import STUDENTS, make_student
from marlkd.utils import atomic_write_bytes

FORMAT = "marlkd.student"
CHECKPOINT_VERSION = 1
_MAX_LISTED = 3  # differences named in a layout mismatch message


def student_state(student: Student) -> dict:
    """Everything needed to rebuild ``student``, as plain data and tensors."""
    return {
        "format": FORMAT,
        "version": CHECKPOINT_VERSION,
        "kind": student.kind,
        "kwargs": dict(student.config),
        "layout": student.layout.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
    }


def save_student(student: Student, path: str | Path) -> None:
    """Write ``student_state(student)`` to ``path`` atomically."""
    buffer = io.BytesIO()
    torch.save(student_state(student), buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_student(
    source: str | Path | Mapping, layout: AgentLayout | None = None
) -> Student:
    """Rebuild a student from a checkpoint file or a ``student_state`` dict.

    Args:
        source: the checkpoint's path, or the dict itself.
        layout: the layout of the environment the student will act in; when
            given, ``check_layout`` must accept the student's own layout.

    Returns:
        The student on the CPU, in evaluation mode.

    Raises:
        UserError: the file is missing or is no student checkpoint, or its
            layout does not fit ``layout``.
    """
    name = "the checkpoint"
    if not isinstance(source, Mapping):
        name = str(source)
        state = read_checkpoint(Path(source))
    else:
        state = source

    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise UserError(
            f"{name} is not a marlkd student checkpoint: pass a file written "
            "by marlkd's distillation"
        )
    if state.get("version") != CHECKPOINT_VERSION:
        raise UserError(
            f"{name} has student checkpoint version {state.get('version')}; this "
            f"marlkd reads version {CHECKPOINT_VERSION}: distil the student again"
        )
    if state.get("kind") not in STUDENTS:
        raise UserError(
            f"{name} holds a student of unknown kind {state.get('kind')!r}: "
            f"this marlkd knows {', '.join(STUDENTS)}"
        )

    student_layout = AgentLayout.from_dict(state["layout"])
    if layout is not None:
        check_layout(student_layout, layout)
    student = make_student(state["kind"], student_layout, **state["kwargs"])
    try:
        student.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"the weights in {name} do not fit its {state['kind']} student "
            f"({first}): the file is damaged; distil the student again"
        ) from exc
    return student.eval()


def read_checkpoint(path: Path) -> object:
    """A checkpoint's contents, loaded with ``weights_only=True``.

    Raises:
        UserError: the file is missing or is not a checkpoint PyTorch can load
            without unpickling code.
    """
    if not path.is_file():
        raise UserError(
            f"no student checkpoint at {path}: check the path, or distil a "
            "student first"
        )
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"{path} could not be read as a student checkpoint ({first}): pass a "
            "file written by marlkd's distillation"
        ) from exc


def check_layout(student_layout: AgentLayout, env_layout: AgentLayout) -> None:
    """Check that a student fits the agents of an environment.

    Agents must agree in number, order, name, observation size and number of
    actions, and in the number of action features when both have them.

    Raises:
        UserError: one line naming the first differences and the fix.
    """
    problems = []
    if student_layout.num_agents != env_layout.num_agents:
        problems.append(
            f"{student_layout.num_agents} agents in the student, "
            f"{env_layout.num_agents} in the environment"
        )
    for i, (s, e) in enumerate(
        zip(student_layout.agents, env_layout.agents, strict=False)
    ):
        if s.name != e.name:
            problems.append(f"agent {i} is '{s.name}' in the student, '{e.name}' here")
        if s.obs_size != e.obs_size:
            problems.append(
                f"agent '{e.name}' has obs size {s.obs_size} in the student, "
                f"{e.obs_size} here"
            )
        if s.num_actions != e.num_actions:
            problems.append(
                f"agent '{e.name}' has {s.num_actions} actions in the student, "
                f"{e.num_actions} here"
            )
    ks, ke = student_layout.num_action_features, env_layout.num_action_features
    if ks and ke and ks != ke:
        problems.append(f"{ks} action features in the student, {ke} here")

    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "; ".join(problems[:_MAX_LISTED]) + (
            f"; and {more} more" if more > 0 else ""
        )
        raise UserError(
            f"the student does not fit this environment's agents ({listed}): "
            "distil a student for this scenario, or pass the scenario it was "
            "trained on"
        )
