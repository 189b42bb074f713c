"""Checks of the logger and callback presets before any slow work, one line per problem.

- :func:`missing_logger_packages`: a logger whose package is an optional extra of ours
  (``logger=wandb``, ``logger=mlflow``) and is not installed, named with its ``pip install``.
- :func:`callbacks_without_their_input`: a callback that writes to a logger
  (``callbacks.lr_monitor``) in a run with none, or one that monitors a validation metric
  (``callbacks.early_stopping``) in a run without validation.
- :func:`check_monitors`: a validation metric a callback monitors is one the model logs
  (checked once the model is built; Lightning would stop at the end of the first epoch).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

from hydra.utils import get_object
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
from lightning.pytorch.loggers import MLFlowLogger, WandbLogger
from lightning_utilities.core.imports import RequirementCache
from omegaconf import DictConfig, OmegaConf

from .errors import UserError

__all__ = [
    "OPTIONAL_LOGGERS",
    "Extra",
    "callbacks_without_their_input",
    "check_monitors",
    "missing_logger_packages",
]


@dataclass(frozen=True)
class Extra:
    """An optional extra of ``bbb-lightning`` (``[project.optional-dependencies]``).

    Attributes:
        title: what the user knows it as ("Weights & Biases").
        name: the extra's name, ``pip install "bbb-lightning[<name>]"``.
        requirement: the package and version it installs (as in pyproject.toml and as
            Lightning's logger requires it).
        module: the module that is imported.
    """

    title: str
    name: str
    requirement: str
    module: str

    def installed(self) -> bool:
        return bool(RequirementCache(self.requirement, self.module))


# Lightning's loggers whose package is an optional extra of ours.
OPTIONAL_LOGGERS: dict[type, Extra] = {
    WandbLogger: Extra("Weights & Biases", "wandb", "wandb>=0.12.10", "wandb"),
    MLFlowLogger: Extra("MLflow", "mlflow", "mlflow>=1.0.0", "mlflow"),
}


def _nodes(cfg: DictConfig, group: str) -> Iterator[tuple[str, type | None]]:
    """``(key, target class or None)`` for each entry of the ``callbacks`` or ``logger`` group
    that has a ``_target_`` (a target that cannot be imported: None, named elsewhere)."""
    entries = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False).get(group)
    for name, node in (entries or {}).items():
        if isinstance(node, dict) and isinstance(node.get("_target_"), str):
            try:
                target = get_object(node["_target_"])
            except Exception:
                target = None
            yield f"{group}.{name}", target if isinstance(target, type) else None


def missing_logger_packages(cfg: DictConfig) -> list[str]:
    """One line per chosen logger whose optional package is missing, with the extra that
    installs it."""
    problems = []
    for key, target in _nodes(cfg, "logger"):
        for logger_class, extra in OPTIONAL_LOGGERS.items():
            if target is not None and issubclass(target, logger_class) and not extra.installed():
                problems.append(
                    f"{key}: the {extra.title} logger needs {extra.requirement}, which is not "
                    f'installed: pip install "bbb-lightning[{extra.name}]" (or drop it: '
                    f"logger=tensorboard)"
                )
    return problems


def callbacks_without_their_input(cfg: DictConfig) -> list[str]:
    """One line per callback that would fail in this run for want of a logger or validation."""
    problems = []
    has_logger = any(True for _ in _nodes(cfg, "logger"))
    trainer = cfg.get("trainer") or {}
    validates = trainer.get("limit_val_batches") != 0 and (
        trainer.get("check_val_every_n_epoch", 1) is not None
    )
    for key, target in _nodes(cfg, "callbacks"):
        if target is None:
            continue
        if issubclass(target, LearningRateMonitor) and not has_logger:
            problems.append(
                f"{key} writes the learning rate to a logger and this run has none: choose one "
                f"(logger=tensorboard) or drop it with {key}=null"
            )
        if issubclass(target, EarlyStopping) and not validates:
            monitor = OmegaConf.select(cfg, f"{key}.monitor", throw_on_resolution_failure=False)
            problems.append(
                f"{key} monitors {monitor}, and this run does not validate "
                f"(trainer.limit_val_batches=0): validate, or drop it with {key}=null"
            )
    return problems


def check_monitors(cfg: DictConfig, allowed: Collection[str]) -> None:
    """A UserError naming each callback whose ``monitor`` is a validation metric (``val/...``)
    not among ``allowed``, those the model logs; other monitors (a training metric, null) are
    left to Lightning."""
    problems = []
    callbacks = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False).get("callbacks")
    for name, node in (callbacks or {}).items():
        monitor = node.get("monitor") if isinstance(node, dict) else None
        if isinstance(monitor, str) and monitor.startswith("val/") and monitor not in allowed:
            problems.append(
                f"callbacks.{name}.monitor={monitor!r} is not allowed: one of {sorted(allowed)} "
                "(the validation metrics of this model)"
            )
    if problems:
        raise UserError(*problems)
