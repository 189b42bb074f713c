"""TensorBoard callbacks: posterior histograms and the regression predictive figure.

Both write only from global rank 0 and only through a ``TensorBoardLogger``; with another
logger (or none) they do nothing.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display needed; set before pyplot is imported

import matplotlib.pyplot as plt
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from torch import Tensor

from ..bayes import posterior_scales, signal_to_noise
from .objectives import GaussianLikelihood

__all__ = [
    "PosteriorHistograms",
    "RegressionFigure",
    "add_histogram",
    "histogram_values",
    "tensorboard_writer",
]

# TensorBoard's default histogram buckets end at +-9.92e19; values beyond fall outside them all.
_BUCKET_LIMIT = 9e19


def add_histogram(writer: Any, tag: str, values: Tensor, step: int) -> None:
    """``writer.add_histogram`` of :func:`histogram_values`; nothing if none is left."""
    kept = histogram_values(values)
    if kept is not None:
        writer.add_histogram(tag, kept, step)


def histogram_values(values: Tensor) -> Tensor | None:
    """``values`` ready for ``SummaryWriter.add_histogram``: float32 on the CPU, the
    non-finite ones dropped and the rest clipped into TensorBoard's buckets (+-9e19), which a
    diverging run's signal-to-noise ratios exceed ("the histogram is empty"); None if none is
    left."""
    values = values.detach().float().cpu().flatten()
    values = values[values.isfinite()].clamp(-_BUCKET_LIMIT, _BUCKET_LIMIT)
    return values if values.numel() else None


def tensorboard_writer(trainer: Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger, if any."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def _positive_int(name: str, value: object) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class PosteriorHistograms(Callback):
    """Each ``every_n_epochs`` epochs: histograms of sigma and of |mu| / sigma per tensor.

    Tags: ``sigma/<tensor>`` and ``snr/<tensor>`` (e.g. ``sigma/net.0.weight``).
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or trainer.current_epoch % self.every_n_epochs:
            return
        step = trainer.global_step
        for kind, tensors in (
            ("sigma", posterior_scales(pl_module)),
            ("snr", signal_to_noise(pl_module)),
        ):
            for name, tensor in tensors.items():
                add_histogram(writer, f"{kind}/{name}", tensor, step)


class RegressionFigure(Callback):
    """Each ``every_n_epochs`` epochs and at the end of training: data, predictive mean,
    +-2 sigma.

    Needs a datamodule with ``plot_grid()`` and ``train_x`` / ``train_y`` (the toy regression)
    and a :class:`~bbb_lightning.training.objectives.GaussianLikelihood`. The band is the total
    predictive standard deviation (epistemic + aleatoric) over ``num_samples`` draws.
    """

    def __init__(self, every_n_epochs: int = 25, num_points: int = 200, num_samples: int = 100):
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        self.num_points = _positive_int("num_points", num_points)
        self.num_samples = _positive_int("num_samples", num_samples)
        self._drawn_at_step: int | None = None

    @staticmethod
    def applies(trainer: Trainer, pl_module: LightningModule) -> bool:
        datamodule = getattr(trainer, "datamodule", None)
        return hasattr(datamodule, "plot_grid") and isinstance(
            getattr(pl_module, "likelihood", None), GaussianLikelihood
        )

    @rank_zero_only
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self._draw(trainer, pl_module)

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """The final network's figure, however training stopped (max_epochs, max_steps, early
        stopping), unless the last epoch's is already drawn."""
        if self._drawn_at_step != trainer.global_step:
            self._draw(trainer, pl_module)

    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not self.applies(trainer, pl_module):
            return
        figure = self.figure(trainer, pl_module)
        writer.add_figure("figures/predictive", figure, trainer.global_step)
        plt.close(figure)
        self._drawn_at_step = trainer.global_step

    def figure(self, trainer: Trainer, pl_module: LightningModule) -> Figure:
        datamodule = trainer.datamodule
        dtype = next(pl_module.parameters()).dtype  # trainer.precision=64-true / bf16-true
        grid = datamodule.plot_grid(self.num_points).to(pl_module.device, dtype)
        with torch.inference_mode():
            outputs = pl_module(grid, self.num_samples)
            mean, epistemic, aleatoric = pl_module.likelihood.predictive_moments(outputs)
        x = grid[:, 0].float().cpu()  # matplotlib reads float32/64 only
        mean = mean[:, 0].float().cpu()
        std = (epistemic + aleatoric)[:, 0].sqrt().float().cpu()
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.scatter(datamodule.train_x[:, 0], datamodule.train_y[:, 0], s=6, c="k", label="train")
        axes.plot(x, mean, c="C0", label="predictive mean")
        axes.fill_between(x, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.25, label="±2σ")
        axes.set(xlabel="x", ylabel="y", title=f"epoch {trainer.current_epoch + 1}")
        axes.legend(loc="upper left")
        figure.tight_layout()
        return figure
