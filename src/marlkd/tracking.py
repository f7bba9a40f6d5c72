"""Metrics to CSV and TensorBoard under namespaced keys.

Keys look like ``distill/loss``, ``collect/samples`` or ``eval/student_avg_delay_s``.
``metrics.csv`` is long-form (``step,key,value``), so a new key needs no new
column and an interrupted run appends where it stopped.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class MetricWriter:
    """Writes scalars to ``metrics.csv`` and TensorBoard event files in a run."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._file = self.path.open("a", newline="")
        self._csv = csv.writer(self._file)
        if new:
            self._csv.writerow(["step", "key", "value"])
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                logger.warning("tensorboard is not installed: metrics go to CSV only")

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._csv.writerow([step, key, f"{float(value):.6g}"])
            if self._tb is not None:
                self._tb.add_scalar(key, float(value), step)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` as key -> [(step, value), ...]."""
    series: dict[str, list[tuple[int, float]]] = {}
    with (Path(run_dir) / "metrics.csv").open() as handle:
        for row in csv.DictReader(handle):
            series.setdefault(row["key"], []).append(
                (int(row["step"]), float(row["value"]))
            )
    return series
