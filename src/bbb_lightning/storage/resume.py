"""Where a run resumes from, and whether anything is left to train.

A finished run resumed in place (the same ``hydra.run.dir`` and its own ``last.ckpt``, with
the same ``trainer.max_epochs``) has nothing left to train: Lightning's fit returned at once,
without a validation, and the run rewrote ``metrics.json`` without its ``val/*`` metrics.
:func:`nothing_left_to_train` tells such a resume apart, so that ``train`` keeps the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["nothing_left_to_train"]


def nothing_left_to_train(ckpt_path: str | Path, max_epochs: int | None, max_steps: int) -> str:
    """Why the checkpoint is at the end of training under these limits, or ``''``.

    As Lightning's fit loop decides (``FitLoop.done``): training is over when the epochs whose
    training ran (``epoch_progress.current.processed``) reach ``max_epochs`` (unless -1 or
    None: no limit), or the optimizer steps (``global_step``) reach ``max_steps`` (> 0).
    """
    state: dict[str, Any] = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    epochs = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    epochs = epochs.get("current", {}).get("processed")
    steps = state.get("global_step", 0)
    if max_epochs not in (None, -1) and epochs is not None and epochs >= max_epochs:
        return f"it has trained {epochs} epochs, trainer.max_epochs={max_epochs}"
    if max_steps > 0 and steps >= max_steps:
        return f"it has trained {steps} steps, trainer.max_steps={max_steps}"
    return ""
