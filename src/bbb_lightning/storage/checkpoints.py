"""Checkpoints whose ``last.ckpt`` is the run's latest state.

Lightning's ``ModelCheckpoint(save_last=True)`` (2.6) rewrites ``last.ckpt`` only when it also
saves a top-k checkpoint, and at the end of training only if it never saved one: with the
default top-1 by ``val/nll``, ``last.ckpt`` stays at the best epoch, so a resume from it silently
repeats every later epoch and "the final model" is the best one. :class:`ModelCheckpoint` keeps
Lightning's top-k files and writes ``last.ckpt`` at every point where Lightning checks whether
to checkpoint (each validation, or each training epoch's end) and when training ends. A
``fast_dev_run`` writes no checkpoint at all, as Lightning documents (its ``on_train_end``
wrote ``last.ckpt`` anyway).
"""

from __future__ import annotations

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
