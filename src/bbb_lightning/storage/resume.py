"""Where a run resumes from, and whether anything is left to train.

An unfinished run (no ``metrics.json``: stopped by SIGTERM, requeued by SLURM, killed) that is
started again with the same command in the same directory resumes from its latest state by
itself (:func:`latest_state_of_same_run`): a requeued SLURM job runs its command line again.

A finished run resumed in place (the same ``hydra.run.dir`` and its own ``last.ckpt``, with
the same ``trainer.max_epochs``) has nothing left to train: Lightning's fit returned at once,
without a validation, and the run rewrote ``metrics.json`` without its ``val/*`` metrics.
:func:`nothing_left_to_train` tells such a resume apart, so that ``train`` keeps the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import checkpoint_problem

__all__ = ["RUN_CONFIG_KEY", "latest_state_of_same_run", "nothing_left_to_train"]

# the key under which every checkpoint records the config of the run that wrote it
RUN_CONFIG_KEY = "bbb_run_config"


def latest_state_of_same_run(output_dir: Path, run_config: str) -> tuple[Path, int] | None:
    """The newest saved state of the unfinished run in ``output_dir`` whose checkpoints record
    ``run_config`` (this very command), and its step; None if there is none, or the run has
    finished (``metrics.json``), or it was started with another config.

    Looked at: ``checkpoints/last.ckpt`` (saved at every validation, at SIGTERM and at the end
    of training) and Lightning's ``hpc_ckpt_<n>.ckpt`` (saved at SLURM's requeue signal); the one
    with the most training steps, ``last.ckpt`` on a tie (it is saved at a step boundary).
    """
    output_dir = Path(output_dir)
    if (output_dir / "metrics.json").exists():
        return None
    candidates = [
        output_dir / "checkpoints" / "last.ckpt",
        *sorted(output_dir.glob("hpc_ckpt_*.ckpt")),
    ]
    found: list[tuple[int, int, Path]] = []
    for rank, path in enumerate(candidates):
        if not path.is_file() or checkpoint_problem(path) is not None:
            continue
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if state.get(RUN_CONFIG_KEY) == run_config:
            found.append((int(state.get("global_step", 0)), -rank, path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


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
