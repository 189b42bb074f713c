"""Matplotlib figures of an evaluation (Agg backend: no display needed).

Each builder takes plain tensors or numbers and returns a ``Figure``; the caller writes it to
TensorBoard (``SummaryWriter.add_figure``) and/or a PNG file (:func:`save_figure`) and closes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # set before pyplot is imported

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import Tensor

__all__ = [
    "attack_curves",
    "close",
    "input_gradient_images",
    "metric_vs_samples",
    "posterior_histograms",
    "pruning_curve",
    "regression_band",
    "reliability_diagram",
    "save_figure",
    "uncertain_examples",
    "uncertainty_histograms",
]


def _numpy(values: Tensor) -> Any:
    """A detached CPU numpy copy of ``values``."""
    return values.detach().cpu().numpy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG (parent folders created); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def reliability_diagram(
    confidence: Tensor, accuracy: Tensor, count: Tensor, ece: float | None = None
) -> Figure:
    """Accuracy against confidence per bin
    (:func:`bbb_lightning.evaluation.metrics.reliability_bins`).

    Bars: each bin's accuracy at its mean confidence; the diagonal is perfect calibration; the
    lower panel shows how many examples fall in each bin.
    """
    num_bins = len(count)
    centres = (torch.arange(num_bins) + 0.5) / num_bins
    width = 1.0 / num_bins
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    confidence, accuracy, count = _numpy(confidence), _numpy(accuracy), _numpy(count)
    centres = _numpy(centres)
    filled = count > 0
    top.bar(centres[filled], accuracy[filled], width=width, edgecolor="k", label="accuracy")
    top.bar(
        centres[filled],
        (confidence - accuracy)[filled],
        bottom=accuracy[filled],
        width=width,
        color="C3",
        alpha=0.3,
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    title = "reliability diagram" + (f" (ECE {100 * ece:.2f} %)" if ece is not None else "")
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title)
    top.legend(loc="upper left")
    bottom.bar(centres, count, width=width, edgecolor="k")
    bottom.set(xlabel="confidence (max predictive probability)", ylabel="examples", yscale="log")
    figure.tight_layout()
    return figure


def uncertainty_histograms(
    in_values: Mapping[str, Tensor], out_values: Mapping[str, Tensor], out_name: str = "OOD"
) -> Figure:
    """One panel per score (e.g. entropy, mutual information): in vs out of distribution."""
    figure, axes = plt.subplots(1, len(in_values), figsize=(5 * len(in_values), 4), squeeze=False)
    for axis, (name, inside) in zip(axes[0], in_values.items(), strict=True):
        outside = out_values[name]
        high = max(float(inside.max()), float(outside.max()), 1e-12)
        bins = torch.linspace(0, high, 41).numpy()
        axis.hist(_numpy(inside), bins=bins, alpha=0.6, density=True, label="in distribution")
        axis.hist(_numpy(outside), bins=bins, alpha=0.6, density=True, label=out_name)
        axis.set(xlabel=f"{name} (nats)", ylabel="density", yscale="log")
        axis.legend()
    figure.tight_layout()
    return figure


def regression_band(
    x: Tensor,
    mean: Tensor,
    epistemic_std: Tensor,
    total_std: Tensor,
    data: Mapping[str, tuple[Tensor, Tensor]] | None = None,
) -> Figure:
    """Predictive mean with ±2σ bands (total, and epistemic only) over sorted 1-D inputs.

    ``data``: labelled point sets to scatter, e.g. ``{"train": (x, y), "test": (x, y)}``.
    """
    order = torch.argsort(x)
    x, mean = _numpy(x[order]), _numpy(mean[order])
    epistemic, total = 2 * _numpy(epistemic_std[order]), 2 * _numpy(total_std[order])
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, (label, (px, py)) in enumerate((data or {}).items()):
        axis.scatter(_numpy(px), _numpy(py), s=5, c=f"C{index + 2}", alpha=0.6, label=label)
    axis.plot(x, mean, c="C0", label="predictive mean")
    axis.fill_between(x, mean - total, mean + total, color="C0", alpha=0.2, label="±2σ total")
    axis.fill_between(
        x, mean - epistemic, mean + epistemic, color="C1", alpha=0.3, label="±2σ epistemic"
    )
    axis.set(xlabel="x", ylabel="y", title="predictive distribution")
    axis.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    return figure


def posterior_histograms(sigmas: Mapping[str, Tensor], snrs: Mapping[str, Tensor]) -> Figure:
    """Per tensor (row): histograms of log10 σ and of log10 SNR = log10(|μ| / σ).

    Non-finite values are left out (a diverged run's σ = 0 gives SNR = inf), as in the
    TensorBoard histograms; σ or SNR below 1e-30 count as 1e-30."""
    rows = max(len(sigmas), 1)
    figure, axes = plt.subplots(rows, 2, figsize=(9, 2.2 * rows), squeeze=False)
    for row, name in enumerate(sigmas):
        for axis, values, label in (
            (axes[row, 0], sigmas[name], "log10 σ"),
            (axes[row, 1], snrs[name], "log10 SNR"),
        ):
            logs = values.detach().double().clamp_min(1e-30).log10().flatten()
            logs = logs[logs.isfinite()]
            axis.hist(_numpy(logs), bins=50, color="C0")
            axis.set_title(name, fontsize="small")
            axis.set_xlabel(label, fontsize="small")
    figure.tight_layout()
    return figure


def metric_vs_samples(counts: Sequence[int], values: Mapping[str, Sequence[float]]) -> Figure:
    """One panel per metric against the number S of Monte Carlo samples (log x axis)."""
    figure, axes = plt.subplots(1, len(values), figsize=(4.5 * len(values), 3.5), squeeze=False)
    for axis, (name, ys) in zip(axes[0], values.items(), strict=True):
        axis.plot(list(counts), list(ys), "o-")
        axis.set(xscale="log", xlabel="posterior samples S", ylabel=name)
        axis.grid(alpha=0.3)
    figure.suptitle("predictive vs number of samples")
    figure.tight_layout()
    return figure


def attack_curves(
    epsilons: Sequence[float], curves: Mapping[str, Sequence[float]], xlabel: str = "ε"
) -> Figure:
    """Adversarial accuracy against ε, one line per ``"<attack> / <setting>"``."""
    figure, axis = plt.subplots(figsize=(6, 4))
    for index, (label, accuracies) in enumerate(curves.items()):
        style = "--" if label.startswith("fgsm") else "-"
        axis.plot(
            list(epsilons), list(accuracies), style, marker="o", c=f"C{index % 3}", label=label
        )
    axis.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1), title="adversarial accuracy")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    figure.tight_layout()
    return figure


def pruning_curve(fractions: Sequence[float], values: Sequence[float], ylabel: str) -> Figure:
    """A metric of the pruned posterior-mean network against the pruned fraction."""
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot([100 * f for f in fractions], list(values), "o-")
    axis.set(xlabel="weights pruned by SNR (%)", ylabel=ylabel, title="SNR pruning")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def input_gradient_images(inputs: Tensor, draw: Tensor, expected: Tensor) -> Figure:
    """Rows: input image, one draw's input gradient, the expectation over draws (columns:
    examples). Images are (N, C, H, W) or (N, H, W); the first channel is shown."""
    num = inputs.shape[0]
    figure, axes = plt.subplots(3, num, figsize=(1.6 * num, 5), squeeze=False)
    rows = (
        ("input", inputs, "gray"),
        ("one draw", draw, "RdBu"),
        ("expectation", expected, "RdBu"),
    )
    for row, (label, images, cmap) in enumerate(rows):
        for column in range(num):
            image = images[column]
            image = image[0] if image.ndim == 3 else image
            limit = float(image.abs().max()) or 1.0
            bounds = {} if cmap == "gray" else {"vmin": -limit, "vmax": limit}
            axes[row, column].imshow(_numpy(image), cmap=cmap, **bounds)
            axes[row, column].axis("off")
        axes[row, 0].set_title(label, fontsize="small", loc="left")
    figure.suptitle("input gradient d loss / d x")
    figure.tight_layout()
    return figure


def uncertain_examples(
    images: Tensor, entropy: Tensor, labels: Tensor, predicted: Tensor, columns: int = 4
) -> Figure:
    """A gallery of examples (N, C, H, W) or (N, H, W), each titled with its predictive entropy
    H (nats), its label y and the predicted class (red: misclassified). One channel is shown in
    gray, three as RGB, each image rescaled to [0, 1] by its own range (normalised pixels).
    The images are tiled into one picture (one axes: a tenth of the time of a grid of axes)."""
    images = images.detach().float().cpu()
    images = images.unsqueeze(1) if images.ndim == 3 else images
    num, channels, height, width = images.shape
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    images = (images - low) / (high - low).clamp_min(1e-12)
    rows, pad = max(1, -(-num // columns)), max(2, height // 14)
    cell_h, cell_w = height + 3 * pad, width + pad  # room above each image for its title
    mosaic = torch.ones(channels, rows * cell_h, columns * cell_w)
    figure, axis = plt.subplots(figsize=(1.5 * columns, 1.9 * rows))
    for index in range(num):
        top, left = (index // columns) * cell_h + 3 * pad, (index % columns) * cell_w
        mosaic[:, top : top + height, left : left + width] = images[index]
        wrong = int(labels[index]) != int(predicted[index])
        axis.text(
            left + width / 2,
            top - pad / 2,
            f"H {float(entropy[index]):.2f}\ny {int(labels[index])} → {int(predicted[index])}",
            ha="center",
            va="bottom",
            fontsize="small",
            color="C3" if wrong else "k",
        )
    shown = mosaic.permute(1, 2, 0) if channels == 3 else mosaic[0]
    axis.imshow(_numpy(shown), cmap=None if channels == 3 else "gray", vmin=0, vmax=1)
    axis.axis("off")
    axis.set_title("most uncertain validation examples (red: misclassified)", fontsize="medium")
    figure.tight_layout()
    return figure


def close(figure: Figure) -> None:
    """Release a figure's memory."""
    plt.close(figure)
