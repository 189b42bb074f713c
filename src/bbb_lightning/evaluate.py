"""Evaluate a trained run: ``python -m bbb_lightning.evaluate ckpt_path=<run dir or .ckpt>``.

``evaluate(cfg)`` is a plain function of the composed config (``conf/evaluate.yaml``); the
``@hydra.main`` wrapper below only turns user errors into one line and a non-zero exit. It
rebuilds the model from the checkpoint and the datamodule from the run's saved
``.hydra/config.yaml``, draws S = ``eval_samples`` posterior samples of the predictive on the
test set, and writes into its own run dir:

- ``metrics.json`` (every number below) and ``evaluation.json`` (what was evaluated, files);
- ``tensorboard/``: the numbers as scalars (curves indexed by S, % pruned, ε · 1000) and every
  figure, also saved as ``figures/<name>.png``;
- ``export/``: the posterior-mean network, one draw and a pruned mean, as state dicts and
  TorchScript (:mod:`bbb_lightning.evaluation.export`).

Keys of ``metrics.json``:

- classification ``test/``: accuracy, nll, ece, mce, brier, entropy, expected_entropy,
  mutual_information (:mod:`bbb_lightning.evaluation.metrics`); ``ood/<set>/`` (the set's name, e.g.
  ``ood/fashion_mnist/entropy_auroc``): entropy_auroc, entropy_aupr, mi_auroc, mi_aupr (OOD =
  positive), entropy and mutual_information of the OOD set;
  ``attack/<fgsm|pgd>/<mean|draw|predictive>/eps=<ε>`` (:mod:`bbb_lightning.evaluation.robustness`);
  ``gradient/``: expected_l2, draw_l2, coherence (= expected_l2 / draw_l2);
- regression ``test/``: rmse, nll (the predictive mixture's), gaussian_nll, coverage_50/90/95,
  epistemic_var, aleatoric_var;
- both: ``samples/<metric>/S=<S>``, ``pruning/<accuracy|rmse>/p=<%>``, ``posterior/``
  mean_sigma and median_snr.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from torch.utils.tensorboard import SummaryWriter

from .bayes import posterior_scales, signal_to_noise
from .cli.command_line import checked
from .cli.config_checks import integer_at_least, is_finite_number, list_of, require_value
from .cli.errors import UserError, exit_on_user_error, user_errors
from .cli.printing import format_metrics
from .data.mnist import NORMALIZATIONS
from .data.pickle_batches import CIFAR_SETS
from .evaluation import figures, ood
from .evaluation.export import export_posterior
from .evaluation.metrics import (
    classification_metrics,
    expected_entropy,
    nll_from_samples,
    ood_scores,
    predictive_entropy,
    regression_metrics,
    reliability_bins,
)
from .evaluation.pruning import prune_by_snr
from .evaluation.robustness import ATTACKS, SETTINGS, adversarial_accuracy, input_gradients
from .storage.runs import load_run, resolve_device, sample_outputs
from .training.callbacks import add_histogram
from .training.module import BayesByBackprop
from .training.objectives import GaussianLikelihood

log = logging.getLogger(__name__)

__all__ = ["evaluate", "main"]


def _test_tensors(datamodule: Any, limit: int | None) -> tuple[Tensor, Tensor]:
    dataset = datamodule.test_set
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))
    xs, ys = zip(*DataLoader(dataset, batch_size=1024, shuffle=False), strict=True)
    return torch.cat(xs), torch.cat(ys)


# -- predictions ------------------------------------------------------------------------------
@torch.no_grad()
def _plain_outputs(net: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    device = next(net.parameters()).device
    net.eval()
    return torch.cat(
        [net(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    )


# -- the report -------------------------------------------------------------------------------
class Report:
    """Collects ``metrics.json`` and writes scalars and figures to TensorBoard and PNG files."""

    def __init__(self, output_dir: Path, figures_enabled: bool = True) -> None:
        self.output_dir = output_dir
        self.metrics: dict[str, float] = {}
        self.figure_files: list[str] = []
        self.figures_enabled = figures_enabled
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def scalar(self, key: str, value: float) -> None:
        """A single number: ``metrics.json`` and a TensorBoard scalar at step 0."""
        self.metrics[key] = float(value)
        self.writer.add_scalar(key, float(value), 0)

    def curve(self, tag: str, step: int, key: str, value: float) -> None:
        """A point of a curve: ``metrics.json[key]`` and TensorBoard ``tag`` at ``step``."""
        self.metrics[key] = float(value)
        self.writer.add_scalar(tag, float(value), step)

    def figure(self, name: str, figure: Any) -> None:
        """``figures/<name>.png`` and the TensorBoard image ``figures/<name>``."""
        path = figures.save_figure(figure, self.output_dir / "figures" / f"{name}.png")
        self.figure_files.append(str(path))
        self.writer.add_figure(f"figures/{name}", figure, 0, close=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


# -- the parts of an evaluation ---------------------------------------------------------------
def _sample_counts(cfg: DictConfig) -> list[int]:
    return sorted({int(count) for count in cfg.sample_counts})


@torch.no_grad()
def _classification(
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
    for count in _sample_counts(cfg):
        head = outputs[:count]
        values = {
            "accuracy": (F.softmax(head, -1).mean(0).argmax(-1) == y).float().mean().item(),
            "nll": nll_from_samples(model.likelihood.log_prob(head, y)).mean().item(),
        }
        for name, value in values.items():
            report.curve(f"samples/{name}", count, f"samples/{name}/S={count}", value)
            curves[name].append(value)
    if report.figures_enabled and _sample_counts(cfg):  # sample_counts=[] skips the curve
        report.figure("metric_vs_samples", figures.metric_vs_samples(_sample_counts(cfg), curves))
    total = predictive_entropy(probs)
    return {"entropy": total, "mutual information": (total - aleatoric).clamp_min(0)}


@torch.no_grad()
def _regression(
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
    for count in _sample_counts(cfg):
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
    if _sample_counts(cfg):  # sample_counts=[] skips the curve
        report.figure("metric_vs_samples", figures.metric_vs_samples(_sample_counts(cfg), curves))
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


def _out_of_distribution(
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


def _posterior(report: Report, model: BayesByBackprop) -> None:
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


def _pruning(report: Report, model: BayesByBackprop, x: Tensor, y: Tensor, cfg: DictConfig) -> None:
    fractions = [float(p) for p in cfg.pruning_fractions]
    if not fractions or not signal_to_noise(model.net):
        return
    name = "accuracy" if model.is_classifier else "rmse"
    values = []
    for fraction in fractions:
        outputs = _plain_outputs(prune_by_snr(model.net, fraction), x, cfg.batch_size)
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


def _robustness(report: Report, model: BayesByBackprop, x: Tensor, y: Tensor, cfg: DictConfig):
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


def _export(
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


# -- the entry points -------------------------------------------------------------------------
def _check(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.ckpt_path is None:
        raise UserError("ckpt_path is required: a training run directory or a .ckpt file")
    for key in ("eval_samples", "batch_size", "calibration_bins"):
        require_value(cfg, key, integer_at_least(1), "an integer >= 1")
    require_value(cfg, "limit_test", lambda v: v is None or integer_at_least(1)(v), "null or >= 1")
    require_value(
        cfg,
        "sample_counts",
        list_of(integer_at_least(1)),
        "a list of integers >= 1, e.g. [1,10,100]",
    )
    require_value(
        cfg,
        "pruning_fractions",
        list_of(lambda v: is_finite_number(v) and 0 <= v <= 1),
        "a list of numbers in [0, 1]",
    )
    require_value(
        cfg,
        "interval_levels",
        list_of(lambda v: is_finite_number(v) and 0 < v < 1),
        "a list of numbers in (0, 1)",
    )
    require_value(cfg, "ood.kind", lambda v: v in ood.OOD_KINDS, f"one of {list(ood.OOD_KINDS)}")
    require_value(cfg, "attack.methods", list_of(lambda m: m in ATTACKS), f"in {ATTACKS}")
    require_value(
        cfg,
        "attack.epsilons",
        list_of(lambda e: is_finite_number(e) and e >= 0),
        "a list of finite numbers >= 0",
    )
    for key in ("limit", "num_samples", "num_draws", "gradient_draws", "pgd_steps"):
        require_value(cfg, f"attack.{key}", integer_at_least(1), "an integer >= 1")
    require_value(
        cfg,
        "attack.pgd_step_size",
        lambda v: is_finite_number(v) and v > 0,
        "a finite number > 0",
    )
    for key in ("figures", "attack.enabled", "attack.relative_to_range", "export.enabled"):
        require_value(cfg, key, lambda v: isinstance(v, bool), "true or false")
    require_value(
        cfg,
        "export.pruned_fraction",
        lambda v: v is None or (is_finite_number(v) and 0 <= v <= 1),
        "in [0, 1], or null (no pruned network)",
    )
    require_value(cfg, "device", lambda v: v in ("cpu", "cuda", "auto"), "cpu, cuda or auto")
    require_value(
        cfg,
        "ood.num_examples",
        lambda v: v is None or integer_at_least(1)(v),
        "an integer >= 1, or null (as many as the test examples)",
    )
    if cfg.ood.kind == "rotated":
        require_value(cfg, "ood.angle", is_finite_number, "a finite number (degrees)")
    if cfg.ood.kind != "none":
        require_value(
            cfg,
            "ood.name",
            lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[\w.-]+", v)),
            "a name for the keys ood/<name>/... (letters, digits, _ . -), or null (the kind)",
        )
    if cfg.ood.kind in ("idx", "cifar"):
        require_value(
            cfg, "ood.path", lambda v: isinstance(v, str) and v != "", "a folder (a path)"
        )
        require_value(cfg, "ood.download", lambda v: isinstance(v, bool), "true or false")
    if cfg.ood.kind == "cifar":
        require_value(cfg, "ood.name", lambda v: v in CIFAR_SETS, f"one of {', '.join(CIFAR_SETS)}")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate the run named by ``cfg.ckpt_path``; write the report; return the metrics."""
    _check(cfg)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model, datamodule, train_cfg, checkpoint = load_run(cfg)
    model = model.to(device).eval()
    model.likelihood.cpu()  # no part of the forward: it scores the outputs, gathered on the CPU
    x, y = _test_tensors(datamodule, cfg.limit_test)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("Evaluating %s on %d test examples with S=%d", checkpoint, len(x), cfg.eval_samples)

    report = Report(output_dir, figures_enabled=cfg.figures)
    num_samples = max([cfg.eval_samples, *_sample_counts(cfg)])
    outputs = sample_outputs(model, x, num_samples, cfg.batch_size)
    report.scalar("test/num_examples", len(x))
    report.scalar("test/eval_samples", cfg.eval_samples)
    if model.is_classifier:
        scores_in = _classification(report, model, outputs, y, cfg)
        if cfg.ood.kind != "none":
            _out_of_distribution(report, model, x, scores_in, datamodule, cfg)
    else:
        _regression(report, model, outputs, x, y, datamodule, cfg)
        if cfg.ood.kind != "none":
            log.info("No out-of-distribution evaluation for regression (ood=%s)", cfg.ood.kind)
    _posterior(report, model)
    _pruning(report, model, x, y, cfg)
    if model.is_classifier and cfg.attack.enabled:
        _robustness(report, model, x, y, cfg)
    exported = _export(model, x, datamodule, output_dir, cfg) if cfg.export.enabled else {}
    report.close()

    metrics = report.metrics
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    info = {
        "checkpoint": str(checkpoint),
        "dataset": train_cfg.dataset.get("_target_"),
        "task": model.likelihood.task,
        "ood": ood.set_name(cfg.ood) if model.is_classifier else "none",
        "figures": report.figure_files,
        "export": exported,
    }
    (output_dir / "evaluation.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info("Metrics (also in %s):\n%s", output_dir / "metrics.json", format_metrics(metrics))
    return metrics


@checked("evaluate")
@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is one line on the log and exit status 1."""
    exit_on_user_error(evaluate, cfg)


if __name__ == "__main__":
    main()
