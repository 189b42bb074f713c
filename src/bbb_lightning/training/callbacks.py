"""TensorBoard callbacks: what a run shows beyond its curves while it trains.

- :class:`PosteriorHistograms`: sigma and SNR per tensor, each epoch;
- :class:`LayerKL`: KL(q || p) per layer, each validation epoch (``weights/kl/<layer>``);
- :class:`ClassificationFigures`: a reliability diagram and the most uncertain validation
  examples, each validation epoch;
- :class:`RegressionFigure`: the toy regression's predictive with its epistemic and total bands.

Each writes only from global rank 0 and only through a ``TensorBoardLogger``; with another
logger (or none) it does nothing. The validation ones skip Lightning's sanity check, look at a
few hundred examples at most, and leave the global random state as they found it.
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

from ..bayes import named_posteriors, posterior_kl, posterior_scales, signal_to_noise
from ..evaluation import figures
from ..evaluation.metrics import calibration_errors, predictive_entropy, reliability_bins
from .objectives import CategoricalLikelihood, GaussianLikelihood
from .seeding import derive_seed

__all__ = [
    "ClassificationFigures",
    "LayerKL",
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


def _validation_epoch_due(trainer: Trainer, every_n_epochs: int) -> bool:
    """A real validation epoch (not the sanity check) whose number is a multiple of n."""
    return not trainer.sanity_checking and (trainer.current_epoch + 1) % every_n_epochs == 0


def first_examples(loader: Any, limit: int) -> tuple[Tensor, Tensor]:
    """The first ``limit`` examples ``(x, y)`` of a loader of ``(x, y)`` batches."""
    xs, ys, count = [], [], 0
    for x, y in loader:
        xs.append(x[: limit - count])
        ys.append(y[: limit - count])
        count += len(xs[-1])
        if count >= limit:
            break
    return torch.cat(xs), torch.cat(ys)


def _evaluation_outputs(trainer: Trainer, pl_module: LightningModule, x: Tensor) -> Tensor:
    """The module's outputs (S, B, ...) for ``x`` in evaluation mode, S = ``eval_samples``,
    under the trainer's precision, drawn from a seed of (seed, epoch) in a forked random
    state: the run's own randomness is left as it was."""
    precision = trainer.precision_plugin
    seed = derive_seed(getattr(pl_module, "seed", None) or 0, "figures", trainer.current_epoch)
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(seed)
            with precision.forward_context():
                return pl_module(precision.convert_input(x.to(pl_module.device)))
    finally:
        pl_module.train(was_training)


class LayerKL(Callback):
    """Each ``every_n_epochs`` validation epochs: KL(q || p) of each layer in nats, summed over
    its variational tensors, as ``weights/kl/<layer>`` (e.g. ``weights/kl/net.layers.1``).

    The closed form where one exists, else a Monte Carlo estimate from one fresh draw (the
    scale-mixture prior). The layers' sum is the ELBO's KL (``kl.reduction=sum``).
    """

    def __init__(self, every_n_epochs: int = 1) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not _validation_epoch_due(trainer, self.every_n_epochs):
            return
        per_layer: dict[str, float] = {}
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for name, posterior in named_posteriors(pl_module):
                layer = name.rpartition(".")[0] or name
                per_layer[layer] = per_layer.get(layer, 0.0) + float(posterior_kl(posterior))
        for layer, kl in per_layer.items():
            writer.add_scalar(f"weights/kl/{layer}", kl, trainer.global_step)


class ClassificationFigures(Callback):
    """Each ``every_n_epochs`` validation epochs, from the first ``num_examples`` validation
    examples (the same ones each time) and ``eval_samples`` draws: ``val/reliability``,
    the reliability diagram with its ECE over ``num_bins`` bins, and, for image inputs,
    ``val/most_uncertain``, the ``num_shown`` of them with the highest predictive entropy
    H[p̄] = -sum_c p̄_c log p̄_c. A classifier's run only."""

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_examples: int = 256,
        num_shown: int = 16,
        num_bins: int = 10,
    ) -> None:
        self.every_n_epochs = _positive_int("every_n_epochs", every_n_epochs)
        self.num_examples = _positive_int("num_examples", num_examples)
        self.num_shown = _positive_int("num_shown", num_shown)
        self.num_bins = _positive_int("num_bins", num_bins)

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard_writer(trainer)
        likelihood = getattr(pl_module, "likelihood", None)
        if writer is None or not isinstance(likelihood, CategoricalLikelihood):
            return
        if not _validation_epoch_due(trainer, self.every_n_epochs):
            return
        x, y = first_examples(trainer.val_dataloaders, self.num_examples)
        probs = CategoricalLikelihood.predictive_probs(_evaluation_outputs(trainer, pl_module, x))
        probs, y, step = probs.float().cpu(), y.cpu(), trainer.global_step
        confidence, accuracy, count = reliability_bins(probs, y, self.num_bins)
        ece = float(calibration_errors(probs, y, self.num_bins)["ece"])
        diagram = figures.reliability_diagram(confidence, accuracy, count, ece)
        writer.add_figure("val/reliability", diagram, step, close=True)
        if x.ndim >= 3:  # images (N, H, W) or (N, C, H, W)
            entropy = predictive_entropy(probs)
            shown = entropy.argsort(descending=True)[: self.num_shown]
            gallery = figures.uncertain_examples(
                x[shown], entropy[shown], y[shown], probs[shown].argmax(-1)
            )
            writer.add_figure("val/most_uncertain", gallery, step, close=True)


class PosteriorHistograms(Callback):
    """Each ``every_n_epochs`` epochs: histograms of sigma and of |mu| / sigma per tensor.

    Tags: ``weights/sigma/<tensor>`` and ``weights/snr/<tensor>`` (``weights/sigma/net.0.weight``).
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
                add_histogram(writer, f"weights/{kind}/{name}", tensor, step)


class RegressionFigure(Callback):
    """Each ``every_n_epochs`` epochs and at the end of training: the predictive mean with its
    ±2σ bands, total (epistemic + aleatoric) and epistemic only, over ``num_samples`` draws,
    with the training and test points (:func:`bbb_lightning.evaluation.figures.regression_band`, the
    figure ``evaluate`` saves as ``predictive.png``), as ``val/predictive``.

    Needs a datamodule with ``plot_grid()`` and ``train_x`` / ``train_y`` (the toy regression;
    its ``test_set`` if it has one) and a
    :class:`~bbb_lightning.training.objectives.GaussianLikelihood`.
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
        writer.add_figure("val/predictive", figure, trainer.global_step)
        plt.close(figure)
        self._drawn_at_step = trainer.global_step

    def figure(self, trainer: Trainer, pl_module: LightningModule) -> Figure:
        datamodule = trainer.datamodule
        dtype = next(pl_module.parameters()).dtype  # trainer.precision=64-true / bf16-true
        grid = datamodule.plot_grid(self.num_points).to(pl_module.device, dtype)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.inference_mode():
                outputs = pl_module(grid, self.num_samples)
                mean, epistemic, aleatoric = pl_module.likelihood.predictive_moments(outputs)
        finally:
            pl_module.train(was_training)
        data = {"train": (datamodule.train_x[:, 0], datamodule.train_y[:, 0])}
        test_set = getattr(datamodule, "test_set", None)
        if test_set is not None:
            test_x, test_y = test_set.tensors
            data["test"] = (test_x[:, 0], test_y[:, 0])
        figure = figures.regression_band(
            grid[:, 0].float(),  # matplotlib reads float32/64 only
            mean[:, 0].float(),
            epistemic[:, 0].sqrt().float(),
            (epistemic + aleatoric)[:, 0].sqrt().float(),
            data,
        )
        figure.axes[0].set_title(f"predictive distribution after {trainer.global_step} steps")
        return figure
