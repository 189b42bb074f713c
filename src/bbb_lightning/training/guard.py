"""Non-finite losses and gradients: caught at the step they happen, never trained on.

``stop`` (default): keep a checkpoint of the last good state (the weights before this step) and
end the run with a one-line error naming the step, the term and the likely cause. "Good" means
finite weights: they are the ones whose loss was not finite (a huge update can leave finite
weights with an infinite KL), so resuming from them with a smaller step may fail again at once;
the last regular checkpoint is then the one to resume from.
``skip``: drop the step (no optimizer update) and count it in ``train/skipped_steps``.
Under data parallelism the decision is taken jointly, so every process stops or skips together.

Under float16 mixed precision (``trainer.precision=16-mixed``) a gradient scaler multiplies the
loss by a scale s before the backward pass; an infinite gradient there is usually the scaled
gradient overflowing float16, which the scaler handles itself: it skips that step and halves s.
Such gradients are left to it while s >= 1 (:func:`scaler_handles_nonfinite_gradients`). Once
s < 1 the scaled gradients are smaller than the true ones, so the true gradients are
non-finite too and the mode applies.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = [
    "NONFINITE_MODES",
    "NonFiniteError",
    "first_nonfinite",
    "keep_last_good_state",
    "scaler_handles_nonfinite_gradients",
    "stop_message",
]

NONFINITE_MODES = ("stop", "skip")

LIKELY_CAUSES = (
    "likely causes: a learning rate too high, badly scaled inputs or targets, or too small a "
    "likelihood noise floor"
)


class NonFiniteError(FloatingPointError):
    """A loss or gradient became NaN or infinite."""


def first_nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, if any (one device sync if none).

    A sum is finite when every term is, so one reduction per tensor screens them all; only
    when a sum is not finite (a NaN or infinity, or finite values whose sum overflows) does an
    elementwise check name the tensor. The screen costs about a tenth of ``isfinite`` on every
    element (docs/performance.md, "Constants set by measurement").
    """
    present = [(name, tensor) for name, tensor in named if tensor is not None]
    if not present:
        return None
    device = present[0][1].device
    sums = torch.stack([tensor.sum().to(device) for _, tensor in present])
    if bool(sums.isfinite().all()):
        return None
    for name, tensor in present:
        if not bool(torch.isfinite(tensor).all()):
            return name
    return None


def scaler_handles_nonfinite_gradients(trainer: pl.Trainer) -> bool:
    """Whether the trainer's gradient scaler (float16 mixed precision) is on with a scale >= 1:
    it then skips a step with non-finite gradients and lowers its scale, so they are no error."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and scaler.is_enabled() and scaler.get_scale() >= 1.0


def keep_last_good_state(trainer: pl.Trainer, module: pl.LightningModule) -> Path | None:
    """Save the current (still finite) state as ``nonfinite-step<N>-last-good.ckpt``.

    The weights are checked first: if an earlier update already made them non-finite there is
    no good state to keep, and the last regular checkpoint is the one to resume from.
    """
    if first_nonfinite(module.named_parameters()) is not None:
        return None
    callback = trainer.checkpoint_callback
    directory = Path(getattr(callback, "dirpath", None) or trainer.default_root_dir)
    path = directory / f"nonfinite-step{trainer.global_step}-last-good.ckpt"
    trainer.save_checkpoint(path)
    return path


def stop_message(what: str, step: int, saved: Path | None) -> str:
    """The one-line error of ``on_nonfinite=stop``: the non-finite term (``what``), the
    optimizer step, the likely causes and where the last good state is (``saved``, or None
    when there was none to keep).

    Example:
        >>> stop_message("NLL (nll=nan, kl=1)", 7, None)[:40]
        'non-finite NLL (nll=nan, kl=1) at step 7'
    """
    kept = f"last good state saved to {saved}" if saved else "earlier checkpoints are kept"
    return f"non-finite {what} at step {step}; {LIKELY_CAUSES}; {kept}"
