"""Fitting a student to teacher-labelled data.

Minibatch AdamW on the weighted distillation loss, a held-out validation split
with early stopping on its loss, and a checkpoint after every epoch written
atomically, so an interrupted round resumes at the epoch it had reached.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from marlkd.config import TrainConfig
from marlkd.distill.dataset import Transitions
from marlkd.distill.losses import DistillationLoss
from marlkd.tracking import MetricWriter
from marlkd.utils import atomic_write_bytes

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    epochs: int
    best_val_loss: float
    val_agreement: float


def agreement(
    logits: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Share of samples where the student's choice is one of the teacher's best.

    A student action that ties with the teacher's best allowed score agrees.
    """
    neg = torch.finfo(scores.dtype).min
    chosen = torch.where(mask, logits, torch.full_like(logits, neg)).argmax(dim=1)
    teacher = torch.where(mask, scores, torch.full_like(scores, neg))
    best = teacher.max(dim=1).values
    picked = teacher.gather(1, chosen[:, None]).squeeze(1)
    return (picked >= best - 1e-6 * best.abs().clamp(min=1.0)).float()


class Trainer:
    """Trains a student on aggregated rounds of data.

    Args:
        student: the network to train.
        loss: the weighted distillation loss.
        config: optimisation settings.
        checkpoint: where the epoch checkpoint of the current round lives.
        writer: metrics sink.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        loss: DistillationLoss,
        config: TrainConfig,
        checkpoint: Path,
        writer: MetricWriter | None = None,
    ):
        self.student = student
        self.loss = loss
        self.config = config
        self.checkpoint = Path(checkpoint)
        self.writer = writer
        self.global_epoch = 0

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = list(self.student.parameters()) + list(self.loss.parameters())
        return torch.optim.AdamW(
            params, lr=self.config.lr, weight_decay=self.config.weight_decay
        )

    # ------------------------------------------------------------------ fit
    def fit(
        self, data: Transitions, round_index: int, progress: bool = True
    ) -> FitResult:
        cfg = self.config
        generator = torch.Generator().manual_seed(cfg.seed + round_index)
        train_idx, val_idx = _split(len(data), cfg.val_fraction, cfg.seed + round_index)
        train = _tensors(data.subset(train_idx))
        val = _tensors(data.subset(val_idx))

        # Each round starts a fresh optimiser from the previous round's student,
        # so a resumed run takes the same path as an uninterrupted one.
        self.optimizer = self._new_optimizer()
        start_epoch, best, stale, best_state = 0, float("inf"), 0, None
        resumed = self._load_checkpoint(round_index)
        if resumed is not None:
            start_epoch, best, stale, best_state = resumed
            logger.info("round %d: resuming at epoch %d", round_index, start_epoch)
            # Draw the minibatch orders of the epochs already done, so the
            # remaining epochs see the orders an uninterrupted round would.
            for _ in range(start_epoch):
                torch.randperm(len(train["agent"]), generator=generator)

        epoch = start_epoch
        bar = tqdm(
            range(start_epoch, cfg.epochs),
            desc=f"train round {round_index}",
            leave=False,
            disable=None if progress else True,
        )
        for epoch in bar:
            train_loss = self._train_epoch(train, generator)
            val_loss, val_agree = self.evaluate(val)
            self.global_epoch += 1
            if val_loss < best - 1e-6:
                best, stale = val_loss, 0
                best_state = {
                    k: v.clone() for k, v in self.student.state_dict().items()
                }
            else:
                stale += 1
            if self.writer is not None:
                self.writer.log(
                    self.global_epoch,
                    {
                        "distill/train_loss": train_loss,
                        "distill/val_loss": val_loss,
                        "distill/val_agreement": val_agree,
                        "distill/round": round_index,
                    },
                )
            bar.set_postfix(val_loss=f"{val_loss:.4f}", agree=f"{val_agree:.3f}")
            self._save_checkpoint(round_index, epoch + 1, best, stale, best_state)
            if stale >= cfg.patience:
                logger.info(
                    "round %d: early stop after epoch %d", round_index, epoch + 1
                )
                break
        bar.close()

        if best_state is not None:
            self.student.load_state_dict(best_state)
        _, val_agree = self.evaluate(val)
        return FitResult(epochs=epoch + 1, best_val_loss=best, val_agreement=val_agree)

    def _train_epoch(self, train: dict, generator: torch.Generator) -> float:
        self.student.train()
        n = len(train["agent"])
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            batch = {k: v[idx] for k, v in train.items()}
            loss, _ = self._loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        return total / max(count, 1)

    def _loss(self, batch: dict):
        out = self.student(batch["obs"], batch["agent"], batch["mask"])
        return self.loss(
            out,
            teacher_scores=batch["teacher_scores"],
            teacher_action=batch["teacher_action"],
            mask=batch["mask"],
            teacher_features=batch.get("teacher_features"),
        )

    @torch.no_grad()
    def evaluate(self, val: dict) -> tuple[float, float]:
        """Validation loss and agreement with the teacher."""
        self.student.eval()
        n = len(val["agent"])
        if n == 0:
            return float("nan"), float("nan")
        losses, agree = 0.0, 0.0
        for start in range(0, n, 4096):
            batch = {k: v[start : start + 4096] for k, v in val.items()}
            loss, _ = self._loss(batch)
            out = self.student(batch["obs"], batch["agent"], batch["mask"])
            losses += float(loss) * len(batch["agent"])
            agree += float(
                agreement(out.logits, batch["teacher_scores"], batch["mask"]).sum()
            )
        return losses / n, agree / n

    # ----------------------------------------------------------- checkpoint
    def _save_checkpoint(self, round_index, epoch, best, stale, best_state) -> None:
        state = {
            "round": round_index,
            "epoch": epoch,
            "global_epoch": self.global_epoch,
            "best_val_loss": best,
            "stale": stale,
            "student": self.student.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_student": best_state,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint, buffer.getvalue())

    def _load_checkpoint(self, round_index: int):
        if not self.checkpoint.exists():
            return None
        state = torch.load(self.checkpoint, weights_only=True, map_location="cpu")
        if int(state["round"]) < round_index:
            # Left by a finished round: its student is in student.pt, but the
            # loss's own parameters (the feature projection) live only here.
            self.loss.load_state_dict(state["loss"])
            return None
        if int(state["round"]) != round_index:
            return None
        self.global_epoch = int(state["global_epoch"])
        self.student.load_state_dict(state["student"])
        self.loss.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        return (
            int(state["epoch"]),
            float(state["best_val_loss"]),
            int(state["stale"]),
            state["best_student"],
        )


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction))) if n > 1 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _tensors(data: Transitions) -> dict[str, torch.Tensor]:
    out = {
        "obs": torch.from_numpy(data.obs.astype(np.float32)),
        "agent": torch.from_numpy(data.agent.astype(np.int64)),
        "mask": torch.from_numpy(data.mask.astype(bool)),
        "teacher_scores": torch.from_numpy(data.teacher_scores.astype(np.float32)),
        "teacher_action": torch.from_numpy(data.teacher_action.astype(np.int64)),
    }
    if data.teacher_features is not None:
        out["teacher_features"] = torch.from_numpy(data.teacher_features)
    return out
