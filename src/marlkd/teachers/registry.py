"""Build a controller by name for a traffic environment."""

from __future__ import annotations

from marlkd.errors import UserError
from marlkd.teachers.base import Teacher

CONTROLLERS = ("fixed", "max-pressure", "random")


def make_controller(name: str, env, seed: int | None = None) -> Teacher:
    """The rule-based controller ``name`` for the agents of ``env``."""
    from marlkd.teachers.fixed_time import FixedTime
    from marlkd.teachers.max_pressure import MaxPressure
    from marlkd.teachers.random_policy import RandomController

    if name == "fixed":
        return FixedTime(env.specs, env.config.delta_time)
    if name == "max-pressure":
        return MaxPressure(env.specs)
    if name == "random":
        return RandomController(env.specs, seed)
    raise UserError(
        f"unknown controller '{name}': choose one of {', '.join(CONTROLLERS)}"
    )


def make_teacher(spec: str, env, seed: int | None = None) -> Teacher:
    """A rule-based controller by name, or a trained network from a checkpoint.

    A path ending in ``.pt`` (or any existing file) is loaded as a student
    checkpoint, or as a central teacher when ``CentralTeacher.save`` wrote it;
    its agents and sizes must fit the environment's.
    """
    from pathlib import Path

    if spec in CONTROLLERS:
        return make_controller(spec, env, seed)
    path = Path(spec)
    if path.suffix == ".pt" or path.exists():
        from marlkd.teachers.central import CentralTeacher, is_central_checkpoint
        from marlkd.teachers.network import NetworkTeacher

        if is_central_checkpoint(path):
            return CentralTeacher.from_checkpoint(path, env)
        return NetworkTeacher.from_checkpoint(path, env)
    raise UserError(
        f"unknown teacher '{spec}': choose one of {', '.join(CONTROLLERS)} or pass "
        "a student checkpoint (.pt)"
    )
