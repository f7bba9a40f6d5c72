"""Collected transitions, teacher-labelled for distillation, and their format.

A dataset folder holds one file per collection round and a description:

    dataset/
      meta.json          {"format": 1, "agents": [...], "obs_size": D,
                          "num_actions": A, "teacher": "...", "scenario": "..."}
      round_000.npz      arrays of the samples gathered in round 0
      round_001.npz      ...

Each ``round_*.npz`` holds, for N samples (one per agent per decision):

    obs             float32 [N, D]  the agent's observation, zero-padded to D
    agent           int64   [N]     index into ``agents``
    mask            bool    [N, A]  actions allowed at that moment
    teacher_scores  float32 [N, A]  the teacher's scores (0 where not allowed)
    teacher_action  int64   [N]     the teacher's chosen action
    round           int32   [N]     the collection round
    teacher_features float32 [N, F] optional, for feature matching

A collection for reinforcement learning (``LocalCollector.collect`` with
``rl=True``) records, on the same rows, what the behaviour did and what
followed; the teacher's labels are then optional (kickstarting wants them,
plain RL does not):

    action          int64   [N]     the action the behaviour policy took
    reward          float32 [N]     the agent's reward for it
    next_obs        float32 [N, D]  the agent's next observation, zero-padded
    next_mask       bool    [N, A]  actions allowed after it
    episode         int64   [N]     the episode's seed
    step            int32   [N]     the decision's index within its episode

and, for a centralized critic (``state=True``), the global state around it:

    state           float32 [N, S]  ``env.state()`` when the agent acted
    next_state      float32 [N, S]  ``env.state()`` after the decision

Rows come episode after episode, decision after decision, agent after agent.
Files are written atomically, so a run interrupted mid-write keeps every round
it completed. The arrays load with ``numpy.load`` and nothing else.
"""

from __future__ import annotations

import io
import json
import zipfile
import zlib
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from marlkd.errors import UserError
from marlkd.utils import atomic_write_bytes, atomic_write_text

FORMAT = 1

LABELLED = ("obs", "agent", "mask", "teacher_scores", "teacher_action", "round")
"""The arrays every dataset file holds; the others are optional."""


@dataclass
class Transitions:
    """A batch of samples; see the module docstring for the fields.

    ``teacher_scores`` and ``teacher_action`` are None in a collection no
    teacher labelled; every field after ``teacher_features`` is None unless
    the collection recorded it for reinforcement learning.
    """

    obs: np.ndarray
    agent: np.ndarray
    mask: np.ndarray
    teacher_scores: np.ndarray | None
    teacher_action: np.ndarray | None
    round: np.ndarray
    teacher_features: np.ndarray | None = None
    action: np.ndarray | None = None
    reward: np.ndarray | None = None
    next_obs: np.ndarray | None = None
    next_mask: np.ndarray | None = None
    episode: np.ndarray | None = None
    step: np.ndarray | None = None
    state: np.ndarray | None = None
    next_state: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.agent)

    @classmethod
    def concat(cls, parts: list[Transitions]) -> Transitions:
        parts = [p for p in parts if len(p)]
        if not parts:
            raise UserError(
                "the dataset is empty: collect at least one episode "
                "(collect.iterations and collect.episodes_per_iteration >= 1)"
            )
        # an optional array is kept when every part has it
        arrays = {}
        for f in fields(cls):
            values = [getattr(p, f.name) for p in parts]
            if any(v is None for v in values):
                arrays[f.name] = None
            else:
                arrays[f.name] = np.concatenate(values)
        return cls(**arrays)

    def subset(self, index: np.ndarray) -> Transitions:
        return Transitions(
            **{
                f.name: None
                if getattr(self, f.name) is None
                else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    def save(self, path: Path) -> None:
        arrays = {f.name: getattr(self, f.name) for f in fields(self)}
        arrays = {k: v for k, v in arrays.items() if v is not None}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Transitions:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise UserError(
                f"{path} is not a readable marlkd dataset file ({exc}): delete it "
                "to collect that round again"
            ) from exc
        missing = set(LABELLED) - set(arrays)
        if missing:
            raise UserError(
                f"{path} lacks {', '.join(sorted(missing))}: it was not written by"
                " marlkd; delete it to collect that round again"
            )
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in arrays.items() if k in known})


class DatasetFolder:
    """The rounds of one run's dataset on disk."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def round_path(self, k: int) -> Path:
        return self.root / f"round_{k:03d}.npz"

    def write_meta(self, meta: dict) -> None:
        atomic_write_text(
            self.root / "meta.json", json.dumps({"format": FORMAT, **meta}, indent=2)
        )

    def read_meta(self) -> dict:
        path = self.root / "meta.json"
        if not path.exists():
            raise UserError(f"{self.root} has no meta.json: it is not a marlkd dataset")
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise UserError(
                f"{path} has format {meta.get('format')}, this marlkd reads {FORMAT}"
            )
        return meta

    def has_round(self, k: int) -> bool:
        return self.round_path(k).exists()

    def save_round(self, k: int, data: Transitions) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data.save(self.round_path(k))

    def load_round(self, k: int) -> Transitions:
        return Transitions.load(self.round_path(k))

    def rounds(self) -> list[int]:
        return sorted(int(p.stem.split("_")[1]) for p in self.root.glob("round_*.npz"))

    def load_all(self) -> Transitions:
        return Transitions.concat([self.load_round(k) for k in self.rounds()])
