"""Checkpoints whose ``last.ckpt`` is the run's latest state.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.6) rewrites ``last.ckpt`` only when it also
saves a top-k checkpoint, and at the end of training only if it never saved one: with the
default top-1 by ``val/nll``, ``last.ckpt`` stays at the best epoch, so a resume from it silently
repeats every later epoch and "the final model" is the best one. :class:`ModelCheckpoint` keeps
Lightning's top-k files and writes ``last.ckpt`` at every point where Lightning checks whether
to checkpoint (each validation, or each training epoch's end) and when training ends. A
``fast_dev_run`` writes no checkpoint at all, as Lightning documents (its ``on_train_end``
wrote ``last.ckpt`` anyway).

A run resumed into another directory than the one it was saved in starts Lightning's top-k
bookkeeping afresh (its files belong to the earlier directory, and deleting a displaced one there
would damage that run): the best checkpoint of the resumed run was then the best of the epochs
after the resume, and a run whose best epoch came before tested a worse one. :meth:`best` also
weighs the earlier directory's best, carried from checkpoint to checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` with ``last.ckpt`` always the latest state.

    Example:
        >>> checkpoint = ModelCheckpoint(monitor="val/nll", save_last=True)
        >>> checkpoint.save_last
        True
    """

    earlier_best: tuple[str, torch.Tensor] | None = None

    def best(self) -> tuple[str, torch.Tensor | None]:
        """The run's best checkpoint and its score: this directory's best, or the best of the
        directory this run was resumed from, where that one is better and still on disk."""
        return _better((self.best_model_path, self.best_model_score), self.earlier_best, self.mode)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "earlier_best": self.earlier_best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.earlier_best = state_dict.get("earlier_best")
        if state_dict.get("dirpath", self.dirpath) != self.dirpath:  # resumed elsewhere
            saved = (state_dict.get("best_model_path", ""), state_dict.get("best_model_score"))
            path, score = _better(saved, self.earlier_best, self.mode)
            self.earlier_best = (path, score) if path and score is not None else None
            self.best_model_path, self.best_model_score = "", None  # this directory's: none yet

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_if_behind(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.fast_dev_run:  # Lightning's on_train_end writes last.ckpt even then (2.6)
            return
        super().on_train_end(trainer, pl_module)
        self._save_last_if_behind(trainer)  # e.g. max_steps ended the run mid-epoch

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        """Write ``last.ckpt`` unless this step was saved already (or saving is off here:
        sanity checking, a fast dev run, or ``save_last`` false)."""
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def _better(
    current: tuple[str, torch.Tensor | None],
    earlier: tuple[str, torch.Tensor] | None,
    mode: str,
) -> tuple[str, torch.Tensor | None]:
    """``earlier`` where it is on disk and scores better than ``current`` (or current has no
    score), else ``current``."""
    if earlier is None or not Path(earlier[0]).is_file():
        return current
    better = torch.lt if mode == "min" else torch.gt
    if current[1] is None or bool(better(earlier[1], current[1])):
        return earlier
    return current
