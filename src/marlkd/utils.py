"""Small helpers shared across marlkd."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (umask applied)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader never sees a partial file.

    The bytes go to a temporary file in the same folder, are flushed to disk and
    then renamed over ``path``; an interruption leaves the old file in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _MODE)  # mkstemp makes files private; results are shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def run_checkpoint(run_dir: Path) -> Path:
    """The student checkpoint of a ``marlkd distill`` run folder.

    Raises:
        UserError: the folder is not a run, or no round has finished yet.
    """
    from marlkd.errors import UserError

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(
            f"{run_dir} is not a marlkd run folder (no config.yaml): pass the --out "
            "folder of `marlkd distill`"
        )
    checkpoint = run_dir / "checkpoints" / "student.pt"
    if not checkpoint.is_file():
        raise UserError(
            f"{checkpoint} not found: the run has not finished a round; resume it "
            "with `marlkd distill --resume --out RUN_DIR`"
        )
    return checkpoint
