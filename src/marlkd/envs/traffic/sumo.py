"""Locating SUMO from the installed PyPI packages and choosing its Python API.

marlkd never asks the user to set ``SUMO_HOME``: it is taken from the
``eclipse-sumo`` package, which ships the binaries, tools and data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

from marlkd.errors import UserError

_INSTALL_FIX = "install it with `pip install eclipse-sumo libsumo sumolib`"


def sumo_home() -> Path:
    """Return SUMO's home folder and make sure ``SUMO_HOME`` points at it."""
    try:
        import sumo
    except ImportError as exc:
        raise UserError(f"SUMO is not installed: {_INSTALL_FIX}") from exc
    home = Path(sumo.SUMO_HOME)
    os.environ.setdefault("SUMO_HOME", str(home))
    tools = str(home / "tools")
    if tools not in sys.path:
        sys.path.append(tools)
    return home


def binary(name: str) -> str:
    """Path of a SUMO executable such as ``sumo``, ``netgenerate``, ``duarouter``."""
    path = sumo_home() / "bin" / name
    if not path.exists():
        raise UserError(f"SUMO's `{name}` was not found at {path}: {_INSTALL_FIX}")
    return str(path)


def tool(relative: str) -> str:
    """Path of a script under SUMO's ``tools`` folder, e.g. ``randomTrips.py``."""
    path = sumo_home() / "tools" / relative
    if not path.exists():
        raise UserError(
            f"SUMO's tool {relative} was not found at {path}: {_INSTALL_FIX}"
        )
    return str(path)


def api(gui: bool = False) -> ModuleType:
    """The module that drives a simulation: libsumo, or TraCI when a GUI is wanted.

    libsumo runs SUMO inside this process and allows one simulation per process;
    TraCI talks to a ``sumo-gui`` process over a socket.
    """
    sumo_home()
    name = "traci" if gui else "libsumo"
    try:
        if gui:
            import traci as module
        else:
            import libsumo as module
    except ImportError as exc:
        raise UserError(
            f"SUMO's Python API `{name}` cannot be imported: {_INSTALL_FIX}"
        ) from exc
    return module
