"""Training states of RL runs: read one back, and refuse one that does not fit.

DQN and PPO write their whole training state (networks, optimiser, random
generators, counters) after every iteration and resume from it; both read it
through :func:`read_training_state` and :func:`check_fits`, so a state of
another algorithm or of other network sizes gets one line naming the problem
and the fix instead of a traceback from ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from marlkd.errors import UserError


def read_training_state(path: Path, algorithm: str) -> Mapping:
    """The training state at ``path``, which ``algorithm`` ("dqn", "ppo") wrote.

    DQN's states carry no ``algorithm`` key; they are told by their target
    network.

    Raises:
        UserError: the file cannot be read, or another algorithm wrote it.
    """
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises several types for a bad file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"the training state {path} could not be read ({first}): delete it "
            "to train from the start"
        ) from exc
    found = None
    if isinstance(state, Mapping):
        found = state.get("algorithm", "dqn" if "target" in state else None)
    if found != algorithm:
        written = f"a {found.upper()} run" if isinstance(found, str) else "no RL run"
        raise UserError(
            f"the training state {path} is from {written}, this run trains with "
            f"{algorithm.upper()}: resume with the algorithm it was written by, "
            "or delete it to train from the start"
        )
    return state


def check_fits(path: Path, state: Mapping, modules: Mapping[str, nn.Module]) -> None:
    """Refuse a training state whose saved networks differ from ``modules``.

    Args:
        path: the state's file, named in the message.
        state: the loaded training state.
        modules: the networks of this run, by their key in ``state``.

    Raises:
        UserError: one line naming the first tensor that differs, and the fix.
    """
    for key, module in modules.items():
        saved = state.get(key)
        if not isinstance(saved, Mapping):
            raise UserError(
                f"the training state {path} holds no {key}: delete it to train "
                "from the start"
            )
        own = module.state_dict()
        for name in [*own, *(n for n in saved if n not in own)]:
            here = tuple(own[name].shape) if name in own else "absent"
            there = tuple(saved[name].shape) if name in saved else "absent"
            if here != there:
                raise UserError(
                    f"the training state {path} does not fit this run: {key} "
                    f"{name} is {there} there and {here} here; resume with the "
                    "scenario and network it was written for, or delete it to "
                    "train from the start"
                )
