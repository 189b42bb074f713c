"""The parts of an evaluation, each writing its numbers and figures into a
:class:`~bbb_lightning.evaluation.report.Report`: the test predictive (classification or
regression), out-of-distribution detection, posterior statistics, pruning by signal-to-noise,
adversarial robustness and input gradients, and the exported networks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ..bayes import posterior_scales, signal_to_noise
from ..cli.errors import user_errors
from ..data.mnist import NORMALIZATIONS
from ..storage.runs import sample_outputs
from ..training.callbacks import add_histogram
from ..training.module import BayesByBackprop
from ..training.objectives import GaussianLikelihood
from . import figures, ood
from .export import export_posterior
from .metrics import (
    classification_metrics,
    expected_entropy,
    nll_from_samples,
    ood_scores,
    predictive_entropy,
    regression_metrics,
    reliability_bins,
)
from .pruning import prune_by_snr
from .report import Report
from .robustness import SETTINGS, adversarial_accuracy, input_gradients

log = logging.getLogger(__name__)

__all__ = [
    "classification",
    "export_networks",
    "out_of_distribution",
    "plain_outputs",
    "posterior_statistics",
    "pruning",
    "regression",
    "robustness",
    "sample_counts",
    "test_tensors",
]


def test_tensors(datamodule: Any, limit: int | None) -> tuple[Tensor, Tensor]:
    dataset = datamodule.test_set
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    xs, ys = zip(*DataLoader(dataset, batch_size=1024, shuffle=False), strict=True)
    return torch.cat(xs), torch.cat(ys)


# -- predictions ------------------------------------------------------------------------------
@torch.no_grad()
def plain_outputs(net: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    device = next(net.parameters()).device
    net.eval()
    return torch.cat(
        [net(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    )


# -- the parts of an evaluation ---------------------------------------------------------------
def sample_counts(cfg: DictConfig) -> list[int]:
    return sorted({int(count) for count in cfg.sample_counts})


@torch.no_grad()
def classification(
    report: Report, model: BayesByBackprop, outputs: Tensor, y: Tensor, cfg: DictConfig
) -> dict[str, Tensor]:
    """Test metrics, reliability diagram and the metric-vs-samples curve; returns the scores."""
    main = outputs[: cfg.eval_samples]
    sample_probs = F.softmax(main, dim=-1)
    probs = sample_probs.mean(0)
    nll = nll_from_samples(model.likelihood.log_prob(main, y))
    aleatoric = expected_entropy(sample_probs)
    for name, value in classification_metrics(
        probs, y, nll, aleatoric, cfg.calibration_bins
    ).items():
        report.scalar(f"test/{name}", value)
    if report.figures_enabled:
        confidence, accuracy, count = reliability_bins(probs, y, cfg.calibration_bins)
        report.figure(
            "reliability",
            figures.reliability_diagram(confidence, accuracy, count, report.metrics["test/ece"]),
        )
    curves: dict[str, list[float]] = {"accuracy": [], "nll": []}
    for count in sample_counts(cfg):
        head = outputs[:count]
        values = {
            "accuracy": (F.softmax(head, -1).mean(0).argmax(-1) == y).float().mean().item(),
            "nll": nll_from_samples(model.likelihood.log_prob(head, y)).mean().item(),
        }
        for name, value in values.items():
            report.curve(f"samples/{name}", count, f"samples/{name}/S={count}", value)
            curves[name].append(value)
    if report.figures_enabled and sample_counts(cfg):  # sample_counts=[] skips the curve
        report.figure("metric_vs_samples", figures.metric_vs_samples(sample_counts(cfg), curves))
    total = predictive_entropy(probs)
    return {"entropy": total, "mutual information": (total - aleatoric).clamp_min(0)}


@torch.no_grad()
def regression(
    report: Report,
    model: BayesByBackprop,
    outputs: Tensor,
    x: Tensor,
    y: Tensor,
    datamodule: Any,
    cfg: DictConfig,
) -> None:
    likelihood = model.likelihood
    assert isinstance(likelihood, GaussianLikelihood)
    main = outputs[: cfg.eval_samples]
    mean, epistemic, aleatoric = likelihood.predictive_moments(main)
    nll = nll_from_samples(likelihood.log_prob(main, y))
    metrics = regression_metrics(mean, epistemic, aleatoric, y, nll, list(cfg.interval_levels))
    for name, value in metrics.items():
        report.scalar(f"test/{name}", value)
    curves: dict[str, list[float]] = {"rmse": [], "nll": []}
    for count in sample_counts(cfg):
        head = outputs[:count]
        values = {
            "rmse": (likelihood.predictive_moments(head)[0] - y).square().mean().sqrt().item(),
            "nll": nll_from_samples(likelihood.log_prob(head, y)).mean().item(),
        }
        for name, value in values.items():
            report.curve(f"samples/{name}", count, f"samples/{name}/S={count}", value)
            curves[name].append(value)
    if not report.figures_enabled:
        return
    if sample_counts(cfg):  # sample_counts=[] skips the curve
        report.figure("metric_vs_samples", figures.metric_vs_samples(sample_counts(cfg), curves))
    report.figure("predictive", _regression_figure(model, x, y, datamodule, cfg))


@torch.no_grad()
def _regression_figure(
    model: BayesByBackprop, x: Tensor, y: Tensor, datamodule: Any, cfg: DictConfig
) -> Any:
    """The predictive band over the dataset's plot grid (or the sorted 1-D test inputs)."""
    if hasattr(datamodule, "plot_grid"):
        grid = datamodule.plot_grid(200)
    elif x.ndim == 2 and x.shape[1] == 1:
        grid = x
    else:  # no 1-D axis to plot along: predictive mean against the target instead
        grid = None
    inputs = x if grid is None else grid
    outputs = sample_outputs(model, inputs, cfg.eval_samples, cfg.batch_size)
    mean, epistemic, aleatoric = model.likelihood.predictive_moments(outputs)
    data = {"test": (x[:, 0], y[:, 0])} if grid is not None else None
    if grid is not None and hasattr(datamodule, "train_x"):
        data = {"train": (datamodule.train_x[:, 0], datamodule.train_y[:, 0]), **(data or {})}
    axis = inputs[:, 0] if grid is not None else y[:, 0]
    figure = figures.regression_band(
        axis, mean[:, 0], epistemic[:, 0].sqrt(), (epistemic + aleatoric)[:, 0].sqrt(), data
    )
    if grid is None:
        figure.axes[0].set(xlabel="target y", ylabel="predictive mean")
    return figure


def out_of_distribution(
    report: Report,
    model: BayesByBackprop,
    x: Tensor,
    scores_in: dict[str, Tensor],
    datamodule: Any,
    cfg: DictConfig,
) -> None:
    input_shape = (model.hparams.get("net") or {}).get("input_shape") or x.shape[1:]
    with user_errors():
        x_out = ood.ood_inputs(cfg.ood, x, datamodule, input_shape, cfg.seed)
    set_name = ood.set_name(cfg.ood)
    sample_probs = F.softmax(sample_outputs(model, x_out, cfg.eval_samples, cfg.batch_size), -1)
    total = predictive_entropy(sample_probs.mean(0))
    scores_out = {
        "entropy": total,
        "mutual information": (total - expected_entropy(sample_probs)).clamp_min(0),
    }
    for name, short in (("entropy", "entropy"), ("mutual information", "mi")):
        for metric, value in ood_scores(scores_in[name], scores_out[name]).items():
            report.scalar(f"ood/{set_name}/{short}_{metric}", value)
    report.scalar(f"ood/{set_name}/entropy", total.mean().item())
    information = scores_out["mutual information"].mean().item()
    report.scalar(f"ood/{set_name}/mutual_information", information)
    if report.figures_enabled:
        report.figure(
            "uncertainty_in_vs_out",
            figures.uncertainty_histograms(scores_in, scores_out, f"OOD ({set_name})"),
        )


def posterior_statistics(report: Report, model: BayesByBackprop) -> None:
    sigmas, snrs = posterior_scales(model.net), signal_to_noise(model.net)
    if not sigmas:
        return
    report.scalar("posterior/mean_sigma", torch.cat([s.flatten() for s in sigmas.values()]).mean())
    report.scalar("posterior/median_snr", torch.cat([s.flatten() for s in snrs.values()]).median())
    for name in sigmas:
        add_histogram(report.writer, f"sigma/{name}", sigmas[name], 0)
        add_histogram(report.writer, f"snr/{name}", snrs[name], 0)
    if report.figures_enabled:
        sigmas = {name: value.cpu() for name, value in sigmas.items()}
        snrs = {name: value.cpu() for name, value in snrs.items()}
        report.figure("posterior_sigma_snr", figures.posterior_histograms(sigmas, snrs))


def pruning(report: Report, model: BayesByBackprop, x: Tensor, y: Tensor, cfg: DictConfig) -> None:
    fractions = [float(p) for p in cfg.pruning_fractions]
    if not fractions or not signal_to_noise(model.net):
        return
    name = "accuracy" if model.is_classifier else "rmse"
    values = []
    for fraction in fractions:
        outputs = plain_outputs(prune_by_snr(model.net, fraction), x, cfg.batch_size)
        if model.is_classifier:
            value = (outputs.argmax(-1) == y).float().mean().item()
        else:
            mean, _ = model.likelihood.mean_and_std(outputs)
            value = (mean - y).square().mean().sqrt().item()
        percent = round(100 * fraction)
        report.curve(f"pruning/{name}", percent, f"pruning/{name}/p={percent}", value)
        values.append(value)
    if report.figures_enabled:
        report.figure("pruning", figures.pruning_curve(fractions, values, name))


def robustness(report: Report, model: BayesByBackprop, x: Tensor, y: Tensor, cfg: DictConfig):
    attack = cfg.attack
    device = next(model.parameters()).device
    xa, ya = x[: attack.limit].to(device), y[: attack.limit].to(device)
    low, high = float(x.min()), float(x.max())
    scale = (high - low) if attack.relative_to_range else 1.0
    epsilons = [float(eps) for eps in attack.epsilons]
    curves: dict[str, list[float]] = {}
    for method in attack.methods:
        for setting in SETTINGS:
            accuracies = adversarial_accuracy(
                model.net,
                xa,
                ya,
                [eps * scale for eps in epsilons],
                method=method,
                setting=setting,
                bounds=(low, high),
                num_samples=attack.num_samples,
                num_draws=attack.num_draws,
                steps=attack.pgd_steps,
                step_size=attack.pgd_step_size,
            )
            for eps, accuracy in zip(epsilons, accuracies, strict=True):
                report.curve(
                    f"attack/{method}/{setting}",
                    round(1000 * eps),
                    f"attack/{method}/{setting}/eps={eps:g}",
                    accuracy,
                )
            curves[f"{method} / {setting}"] = accuracies
    gradients = input_gradients(model.net, xa, ya, num_draws=attack.gradient_draws).cpu()
    expected = gradients.mean(0)
    expected_l2 = expected.flatten(1).norm(dim=1).mean().item()
    draw_l2 = gradients.flatten(2).norm(dim=2).mean().item()
    report.scalar("gradient/expected_l2", expected_l2)
    report.scalar("gradient/draw_l2", draw_l2)
    report.scalar("gradient/coherence", expected_l2 / draw_l2 if draw_l2 > 0 else 0.0)
    if not report.figures_enabled:
        return
    unit = "ε (fraction of the input range)" if attack.relative_to_range else "ε"
    report.figure("attacks", figures.attack_curves(epsilons, curves, xlabel=unit))
    if x.ndim >= 3:
        shown = min(8, len(xa))
        report.figure(
            "input_gradients",
            figures.input_gradient_images(xa[:shown].cpu(), gradients[0, :shown], expected[:shown]),
        )


def _floats(values: Tensor) -> list[float]:
    return values.detach().cpu().flatten().tolist()


def _units(datamodule: Any, model: BayesByBackprop) -> dict[str, Any]:
    """The manifest's ``input``, ``target`` and ``classes``: how raw data become the exported
    network's inputs, and what its outputs mean, for the datamodules of this package."""
    units: dict[str, Any] = {}
    normalization = getattr(datamodule, "normalization", None)
    if getattr(datamodule, "feature_mean", None) is not None:  # a CSV table
        units["input"] = {
            "features": list(datamodule.features),
            "mean": _floats(datamodule.feature_mean),
            "std": _floats(datamodule.feature_std),
            "transform": "x = (raw - mean) / std, per column, the raw CSV columns taken in the "
            "order of `features`; float32 of shape (N, len(features))",
        }
    elif normalization in NORMALIZATIONS:  # MNIST-like images
        offset, scale = NORMALIZATIONS[normalization]
        units["input"] = {
            "normalization": normalization,
            "offset": offset,
            "scale": scale,
            "transform": "x = (pixels - offset) / scale, pixels the raw values 0..255 as "
            "float32, reshaped to (N, *input_shape)",
        }
    elif type(datamodule).__name__ == "ToyRegressionDataModule":
        units["input"] = {"transform": "none: the raw inputs x as they are"}
    else:
        units["input"] = {
            "transform": f"unknown: the inputs as {type(datamodule).__name__} gives them"
        }
    target_mean = getattr(datamodule, "target_mean", None)
    if not model.is_classifier and target_mean is not None:
        units["target"] = {
            "name": getattr(datamodule, "target", None),
            "mean": _floats(target_mean),
            "std": _floats(datamodule.target_std),
            "transform": "the outputs (and noise_std) are standardised: y = output * std + "
            "mean, a standard deviation in the target's units = noise_std * std",
        }
    classes = getattr(datamodule, "classes", None)
    if classes is None and model.is_classifier and normalization in NORMALIZATIONS:
        classes = list(range(int(getattr(datamodule, "num_classes", 10))))  # the digits
    if model.is_classifier and classes is not None:
        units["classes"] = list(classes)
    return units


def export_networks(
    model: BayesByBackprop, x: Tensor, datamodule: Any, output_dir: Path, cfg: DictConfig
) -> dict:
    fraction = cfg.export.get("pruned_fraction")
    if fraction is not None and not signal_to_noise(model.net):
        fraction = None
    device = next(model.parameters()).device
    files = export_posterior(model.net, output_dir / "export", x[:2].to(device), fraction)
    manifest: dict[str, Any] = {
        "task": model.likelihood.task,
        "net": dict(model.hparams.get("net") or {}),
        "input_shape": list(x.shape[1:]),
        "outputs": "class logits" if model.is_classifier else "regression output",
        "files": {
            name: {kind: Path(path).name for kind, path in paths.items()}
            for name, paths in files.items()
        },
        "load": "torch.jit.load('<name>.torchscript.pt') needs only torch; or build `net` and "
        "net.load_state_dict(torch.load('<name>.pt'))",
        **_units(datamodule, model),
    }
    likelihood = model.likelihood
    if isinstance(likelihood, GaussianLikelihood):
        manifest["noise"] = likelihood.noise
        if likelihood.noise != "heteroscedastic":
            std = F.softplus(likelihood.raw_std) + likelihood.min_std
            manifest["noise_std"] = std.detach().cpu().tolist()
        else:
            manifest["outputs"] = "mean and raw scale; std = softplus(raw) + min_std"
            manifest["min_std"] = likelihood.min_std
        if "target" in manifest:
            manifest["outputs"] += " (standardised units: see target)"
    (output_dir / "export" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return files
