"""Train a Bayesian neural network: ``python -m bbb_lightning.train [overrides]``.

``train(cfg)`` is a plain function of the composed Hydra config (tests call it directly); the
``@hydra.main`` wrapper below is a few lines and returns the optimized metric for sweepers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from .config_checks import UserError, check_config, user_errors
from .module import BayesByBackprop

log = logging.getLogger(__name__)

__all__ = ["main", "train"]


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _fill_sizes(cfg: DictConfig, datamodule: pl.LightningDataModule) -> tuple[dict, dict]:
    """Likelihood and net configs with sizes left null filled from the dataset."""
    likelihood = _container(cfg.likelihood)
    for key in ("num_classes", "target_dim"):
        if key in likelihood and likelihood[key] is None:
            likelihood[key] = getattr(datamodule, key)
    num_outputs = instantiate(likelihood).num_outputs
    net = _container(cfg.model.net)
    sizes = {"input_shape": list(datamodule.input_shape), "num_outputs": num_outputs}
    for key, value in sizes.items():
        if key in net and net[key] is None:
            net[key] = value
    return likelihood, net


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Instantiate each entry of a callbacks/logger group; entries set to null are skipped."""
    return [instantiate(node) for node in (group or {}).values() if node is not None]


def build_model(cfg: DictConfig, datamodule: pl.LightningDataModule) -> BayesByBackprop:
    """The LightningModule described by ``cfg``, sized for ``datamodule``."""
    likelihood, net = _fill_sizes(cfg, datamodule)
    return BayesByBackprop(
        net=net,
        likelihood=likelihood,
        prior=_container(cfg.prior),
        posterior=_container(cfg.posterior),
        kl=_container(cfg.kl),
        optimizer=_container(cfg.optimizer),
        num_samples=cfg.num_samples,
        eval_samples=cfg.eval_samples,
        include=_container(cfg.model.get("include")),
        exclude=_container(cfg.model.get("exclude")),
    )


def _flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's choices as flat ``group/key`` -> scalar, for TensorBoard's HParams tab."""
    keep = ("dataset", "model", "prior", "posterior", "kl", "optimizer", "likelihood")
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key not in ("_partial_",):
                    visit(f"{prefix}/{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node if isinstance(node, int | float | str | bool) else str(node)

    visit("", {key: _container(cfg[key]) for key in keep if key in cfg})
    for key in ("seed", "num_samples", "eval_samples"):
        flat[key] = cfg[key]
    flat["trainer/max_epochs"] = cfg.trainer.get("max_epochs")
    return flat


@rank_zero_only
def _report(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            hp_metrics = {
                f"hp/{name.replace('/', '_')}": value
                for name, value in metrics.items()
                if name.startswith(("val/", "test/"))
            }
            logger.log_hyperparams(_flat_hparams(cfg), metrics=hp_metrics)
            logger.finalize("success")
    width = max(map(len, metrics))
    lines = [f"  {name:<{width}}  {value:.6g}" for name, value in sorted(metrics.items())]
    log.info("Metrics (also in %s):\n%s", output_dir / "metrics.json", "\n".join(lines))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write ``metrics.json``; return the metrics."""
    check_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    with user_errors():
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = build_model(cfg, datamodule)
        callbacks = _instantiate_all(cfg.get("callbacks"))
        loggers = _instantiate_all(cfg.get("logger"))
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    (test_results,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
    metrics |= {name: float(value) for name, value in test_results.items()}
    metrics |= {"fit_seconds": fit_seconds, "epochs": float(trainer.current_epoch)}
    if best:
        metrics[f"best/{cfg.optimized_metric}"] = float(checkpoint.best_model_score)
    _report(cfg, trainer, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    try:
        metrics = train(cfg)
    except (UserError, FloatingPointError) as error:
        log.error("%s", UserError.describe(error))
        sys.exit(1)
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
