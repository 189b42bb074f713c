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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .cli.command_line import checked
from .cli.config_checks import integer_at_least, is_finite_number, list_of, require_value
from .cli.errors import UserError, exit_on_user_error
from .cli.printing import format_metrics
from .data.pickle_batches import CIFAR_SETS
from .evaluation import ood
from .evaluation.analyses import (
    classification,
    export_networks,
    out_of_distribution,
    posterior_statistics,
    pruning,
    regression,
    robustness,
    sample_counts,
    test_tensors,
)
from .evaluation.progress import phase_progress
from .evaluation.report import Report
from .evaluation.robustness import ATTACKS
from .storage.runs import load_run, resolve_device, sample_outputs

log = logging.getLogger(__name__)

__all__ = ["evaluate", "main"]


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
    x, y = test_tensors(datamodule, cfg.limit_test)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log.info("Evaluating %s on %d test examples with S=%d", checkpoint, len(x), cfg.eval_samples)

    report = Report(output_dir, figures_enabled=cfg.figures)
    num_samples = max([cfg.eval_samples, *sample_counts(cfg)])
    report.scalar("test/num_examples", len(x))
    report.scalar("test/eval_samples", cfg.eval_samples)
    results: dict[str, Any] = {"exported": {}}

    def predictive() -> None:
        results["outputs"] = sample_outputs(model, x, num_samples, cfg.batch_size)
        if model.is_classifier:
            results["scores"] = classification(report, model, results["outputs"], y, cfg)
        else:
            regression(report, model, results["outputs"], x, y, datamodule, cfg)

    phases: list[tuple[str, Callable[[], Any]]] = [
        (f"the test predictive, S={num_samples}", predictive)
    ]
    if cfg.ood.kind != "none" and model.is_classifier:
        phases.append(
            (
                f"out of distribution: {ood.set_name(cfg.ood)}",
                lambda: out_of_distribution(report, model, x, results["scores"], datamodule, cfg),
            )
        )
    elif cfg.ood.kind != "none":
        log.info("No out-of-distribution evaluation for regression (ood=%s)", cfg.ood.kind)
    phases.append(("posterior sigma and SNR", lambda: posterior_statistics(report, model)))
    if cfg.pruning_fractions:
        phases.append(("SNR pruning", lambda: pruning(report, model, x, y, cfg)))
    if model.is_classifier and cfg.attack.enabled:
        phases.append(
            (
                f"attacks ({', '.join(cfg.attack.methods)}) and input gradients",
                lambda: robustness(report, model, x, y, cfg),
            )
        )
    if cfg.export.enabled:

        def export() -> None:
            results["exported"] = export_networks(model, x, datamodule, output_dir, cfg)

        phases.append(("exported networks", export))
    with phase_progress(len(phases)) as start_phase:
        for description, run in phases:
            start_phase(description)
            run()
    report.close()

    metrics = report.metrics
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    info = {
        "checkpoint": str(checkpoint),
        "dataset": train_cfg.dataset.get("_target_"),
        "task": model.likelihood.task,
        "ood": ood.set_name(cfg.ood) if model.is_classifier else "none",
        "figures": report.figure_files,
        "export": results["exported"],
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
