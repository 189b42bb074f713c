"""Train a Bayesian neural network: ``python -m bbb_lightning.train [overrides]``.

``train(cfg)`` is a plain function of the composed Hydra config (tests call it directly); the
``@hydra.main`` wrapper below is a few lines and returns the optimized metric for sweepers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from torch import nn

from .bayes import native
from .cli.command_line import checked
from .cli.component_checks import AUTO, component_problems, missing_files, unaccepted_arguments
from .cli.config_checks import (
    check_epoch_length,
    check_input_fits,
    check_optimized_metric,
    config_problems,
)
from .cli.config_tree import config_tree, print_config_tree, save_config_tree
from .cli.errors import UserError, exit_on_user_error, user_errors
from .cli.preset_checks import (
    callbacks_without_their_input,
    check_monitors,
    missing_logger_packages,
)
from .cli.printing import format_metrics
from .cli.resume_in_place import resumed_in_place
from .cli.run_dir_checks import check_fresh_output_dir, check_resumable
from .storage.atomic_files import AtomicCheckpointIO, write_text_atomically
from .storage.checkpoints import ModelCheckpoint
from .storage.resume import latest_state_of_same_run, nothing_left_to_train
from .storage.run_lock import is_launching_process, run_lock
from .summary import tags_text
from .training.allocator import retain_freed_memory
from .training.callbacks import tensorboard_writer
from .training.faults import check_writable
from .training.guard import LIKELY_CAUSES, NonFiniteError
from .training.hparams import flat_hparams, trial_of_this_job
from .training.lost_process import ProcessWatch, is_lost_peer_error
from .training.model_summary import with_variational_summary
from .training.module import BayesByBackprop
from .training.preemption import (
    Preemption,
    install_signal_connector,
    preempted_fault,
    run_config_text,
    slurm_environment,
    stopped_by_sigterm,
)
from .training.tensorboard_logger import write_results

log = logging.getLogger(__name__)

__all__ = ["main", "train"]


def _container(node: Any) -> Any:
    """A config node as plain dicts and lists: the module's hyperparameters are saved in its
    checkpoints, which ``torch.load(weights_only=True)`` cannot read with omegaconf objects."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _fill_sizes(cfg: DictConfig, datamodule: pl.LightningDataModule) -> tuple[dict, dict]:
    """Likelihood and net configs with sizes left null filled from the dataset."""
    likelihood = _container(cfg.likelihood)
    if likelihood.get("_target_") == AUTO:
        likelihood = _likelihood_of_task(likelihood, datamodule)
    for key, task, other in (
        ("num_classes", "classification", "gaussian"),
        ("target_dim", "regression", "categorical"),
    ):
        if key in likelihood and likelihood[key] is None:
            likelihood[key] = getattr(datamodule, key, None)
            if likelihood[key] is None:
                raise UserError(
                    f"likelihood {likelihood['_target_'].rsplit('.', 1)[-1]} needs a {task} "
                    f"dataset and {type(datamodule).__name__} gives none: add likelihood={other}"
                )
    num_outputs = instantiate(likelihood).num_outputs
    net = _container(cfg.model.net)
    sizes = {"input_shape": list(datamodule.input_shape), "num_outputs": num_outputs}
    # what a dataset's protocol prescribes for its network (UCI: the hidden units)
    sizes |= getattr(datamodule, "net_defaults", {})
    for key, value in sizes.items():
        if key in net and net[key] is None:
            net[key] = value
    return likelihood, net


def _likelihood_of_task(settings: dict[str, Any], datamodule: Any) -> dict[str, Any]:
    """``likelihood=auto`` made concrete by the dataset's task: categorical for
    classification, gaussian (with the config's noise settings) for regression."""
    task = getattr(datamodule, "task", None)
    if task == "classification":
        likelihood = {"_target_": "bbb_lightning.training.objectives.CategoricalLikelihood"}
        likelihood["num_classes"] = None
    elif task == "regression":
        likelihood = {
            "_target_": "bbb_lightning.training.objectives.GaussianLikelihood",
            "target_dim": None,
        }
        likelihood |= {key: value for key, value in settings.items() if key != "_target_"}
    else:
        raise UserError(
            f"likelihood=auto needs a dataset whose task is classification or regression, "
            f"{type(datamodule).__name__} has task={task!r}: choose likelihood=categorical or "
            "likelihood=gaussian"
        )
    name = "categorical" if task == "classification" else "gaussian"
    log.info("likelihood=auto: %s, for the dataset's task (%s)", name, task)
    return likelihood


def _check_optimizer(model: BayesByBackprop) -> None:
    """Build the optimizer once before training, so that an argument it rejects
    (``optimizer=sgd optimizer.momentum=-1``) is one line, not a traceback from fit."""
    try:
        model.configure_optimizers()
    except (ValueError, TypeError) as error:
        raise UserError(f"optimizer: {UserError.describe(error)}") from None


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
        scheduler=_container(cfg.get("scheduler")),
        num_samples=cfg.num_samples,
        eval_samples=cfg.eval_samples,
        include=_container(cfg.model.get("include")),
        exclude=_excluded(cfg.model, net),
        seed=cfg.seed,
        on_nonfinite=cfg.on_nonfinite,
        target_std=_target_std(datamodule, likelihood),
        compile=cfg.compile,
    )


def _excluded(model_cfg: DictConfig, net: dict[str, Any]) -> list[str] | None:
    """``model.exclude``, plus the parameters of every batch norm of the net when
    ``model.bayesian_batchnorm`` is false (absent: nothing added)."""
    exclude = _container(model_cfg.get("exclude"))
    switch = model_cfg.get("bayesian_batchnorm", True)
    if not isinstance(switch, bool):
        raise UserError(f"model.bayesian_batchnorm={switch!r} is not allowed: true or false")
    if switch:
        return exclude
    built = instantiate(net)  # a throwaway copy, only to name its batch norms' parameters
    names = [
        f"{prefix}.{name}" if prefix else name
        for prefix, module in built.named_modules()
        if isinstance(module, nn.modules.batchnorm._NormBase)
        for name, _ in module.named_parameters(recurse=False)
    ]
    return [*(exclude or []), *names] or None


def _target_std(datamodule: pl.LightningDataModule, likelihood: dict) -> list[float] | None:
    """The scales a datamodule divided its regression targets by (CSV, UCI), else None."""
    target_std = getattr(datamodule, "target_std", None)
    if target_std is None or "target_dim" not in likelihood:
        return None
    return [float(value) for value in torch.as_tensor(target_std).reshape(-1)]


def _write_results(writer: Any, cfg: DictConfig, trainer: pl.Trainer, metrics: dict) -> None:
    """The final metrics and hyperparameters in TensorBoard (HParams tab): the net's and the
    likelihood's sizes as filled from the dataset, named and ordered by this job's trial; the
    run's ``tags`` (``tags=[baseline,mnist]``) as the column ``tags``."""
    trial = trial_of_this_job()
    model = trainer.lightning_module
    filled = {"likelihood": model.hparams.get("likelihood")}
    if isinstance(model.hparams.get("net"), dict):
        filled["model"] = {**_container(cfg.model), "net": model.hparams["net"]}
    choices = dict(HydraConfig.get().runtime.choices) if trial is not None else {}
    overrides = trial.overrides if trial is not None else ()  # also the keys of no group
    hparams = flat_hparams(cfg, filled, choices, overrides)
    name, varied = (trial.name(hparams), trial.varied_keys) if trial is not None else ("", ())
    hparams["tags"] = tags_text(cfg.get("tags"))  # labels, not settings: not in the name's digest
    write_results(writer, hparams, metrics, name, varied, trainer.global_step)


@rank_zero_only
def _report(cfg: DictConfig, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(
        output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n"
    )
    writer = tensorboard_writer(trainer)
    if writer is not None:
        _write_results(writer, cfg, trainer, metrics)
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.finalize("success")
    log.info("Metrics (also in %s):\n%s", output_dir / "metrics.json", format_metrics(metrics))


@contextmanager
def _relaunch_as_this_job() -> Iterator[None]:
    """Make data-parallel processes started during a multirun job join that job.

    Lightning re-runs ``sys.argv`` for ranks > 0 with ``hydra.run.dir`` set to the run
    directory. In a multirun, ``sys.argv`` is the whole sweep (``-m a=1,2``) and the run
    directory is not the job's: each rank would start its own sweep. Within this block the
    command line is this job's overrides with ``hydra.mode=RUN`` (a config that sets the
    mode, ``hparams_search=optuna``, would otherwise make each rank > 0 a sweep of its own)
    and the run directory is this job's directory; after it, the environment variables
    Lightning set for the launch (``LOCAL_RANK``, ``MASTER_PORT``, ...) are removed, so that
    the next job launches its own processes.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hydra_config = HydraConfig.get()
    # unresolved: resolving ${run_dir:...} would create a directory under outputs/
    run_dir = OmegaConf.to_container(hydra_config.run, resolve=False)["dir"]
    argv, environment = sys.argv, dict(os.environ)
    sys.argv = [argv[0], *hydra_config.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_config):
        hydra_config.run.dir = hydra_config.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environment)
        with read_write(hydra_config):
            hydra_config.run.dir = run_dir


def check_before_building(cfg: DictConfig) -> None:
    """Every check that needs no data, model or kernels, all problems in one UserError: keys
    and values (:func:`config_problems`), the targets' arguments, the dataset's file, the
    loggers' optional packages and what the callbacks need, and the cheap components built once
    on their own (those with a problem already named are not)."""
    problems = config_problems(cfg) + unaccepted_arguments(cfg) + missing_files(cfg)
    problems += missing_logger_packages(cfg) + callbacks_without_their_input(cfg)

    def reported(key: str) -> bool:
        return any(problem.startswith((f"{key}.", f"{key}=", f"{key}:")) for problem in problems)

    problems += component_problems(cfg, skip=reported)
    if problems:
        raise UserError(*problems)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, test the best checkpoint, write ``metrics.json``; return the metrics.

    The output directory is locked for the run (:mod:`bbb_lightning.storage.run_lock`): a second run
    into it stops at once. A finished run resumed in place keeps its ``metrics.json`` and
    returns its metrics: there is nothing left to train. An unfinished run started again with
    the same config in the same directory (a requeued SLURM job) resumes from its latest state.
    At SIGTERM the run saves the state of the step it reached and stops with
    :class:`~bbb_lightning.faults.RunFault` (exit status 143; :mod:`bbb_lightning.preemption`).
    """
    with user_errors():
        native.check_setting()  # a bad BBB_LIGHTNING_NATIVE fails here, before any work
    check_before_building(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir, "paths.output_dir")
    run_config = run_config_text(cfg)
    with run_lock(output_dir, "paths.output_dir"):
        _resume_same_run(cfg, output_dir, run_config)
        return _train(cfg, output_dir, run_config)


def _resume_same_run(cfg: DictConfig, output_dir: Path, run_config: str) -> None:
    """Point ``cfg.ckpt_path`` at the latest state of this same run when ``output_dir`` holds
    it unfinished (:func:`~bbb_lightning.resume.latest_state_of_same_run`)."""
    latest = latest_state_of_same_run(output_dir, run_config)
    if latest is None or (cfg.get("ckpt_path") and Path(cfg.ckpt_path) == latest[0]):
        return
    path, step = latest
    log_once = log.info if is_launching_process() else log.debug  # ranks > 0 resume it too
    log_once(
        "Resuming the unfinished run in %s from %s (step %d): it was started with this same config",
        output_dir,
        path,
        step,
    )
    with read_write(cfg), open_dict(cfg):
        cfg.ckpt_path = str(path)


def _train(cfg: DictConfig, output_dir: Path, run_config: str) -> dict[str, float]:
    ckpt_path = cfg.get("ckpt_path")
    check_fresh_output_dir(output_dir, ckpt_path)
    tree = config_tree(cfg) if (cfg.get("extras") or {}).get("print_config") else None
    if tree is not None:
        print_config_tree(tree)
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.retain_freed_memory:
        retain_freed_memory()
    with user_errors(cfg):
        datamodule = instantiate(cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("fit")
        model = build_model(cfg, datamodule)
        check_optimized_metric(cfg.optimized_metric, model.metrics["val_"].keys())
        check_monitors(cfg, _validation_metrics(model))
        check_resumable(model, ckpt_path)
        _check_optimizer(model)
        callbacks = _instantiate_all(cfg.get("callbacks"))
        checkpoint_dir = _checkpoint_dir(callbacks, output_dir)
        callbacks += [Preemption(checkpoint_dir, run_config), ProcessWatch(checkpoint_dir)]
        loggers = _instantiate_all(cfg.get("logger"))
        trainer: pl.Trainer = instantiate(
            cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=_plugins(cfg)
        )
        trainer.callbacks = with_variational_summary(trainer.callbacks)
        check_epoch_length(trainer, datamodule)
    install_signal_connector(trainer)
    finished = _finished_in_place(output_dir, ckpt_path, trainer)
    if finished is not None:
        return finished
    with user_errors():
        # Everything is validated: only now the one slow step a first run has (the kernels'
        # build, 30 to 100 s once), then one forward pass that checks the data fits the net.
        native.kernels()
        check_input_fits(model, next(iter(datamodule.train_dataloader())))
    if tree is not None:
        save_config_tree(tree, output_dir)

    with _relaunch_as_this_job():
        metrics = _fit_and_test(cfg, trainer, model, datamodule, output_dir)
    _report(cfg, trainer, metrics)
    if trainer.fast_dev_run:
        log.info(
            "fast_dev_run: a check of %d training, validation and test batch(es); Lightning "
            "writes no checkpoint and no logger output in this mode, and metrics.json holds "
            "those batches' metrics",
            int(trainer.fast_dev_run),
        )
    _check_finite(metrics, model.skipped_steps)
    return metrics


def _validation_metrics(model: BayesByBackprop) -> list[str]:
    """The names the model logs at validation (``val/nll``, ``val/accuracy``, ...)."""
    names = ["val/nll", *(f"val/{metric}" for metric in model.metrics["val_"])]
    if model.target_std is not None and not model.is_classifier:
        names.append("val/raw_ll")
    return names


def _finished_in_place(
    output_dir: Path, ckpt_path: str | None, trainer: pl.Trainer
) -> dict[str, float] | None:
    """The metrics of a finished run resumed in its own directory, which are kept as they are
    (None: there is training left, or no ``metrics.json`` to keep, or another directory)."""
    metrics_file = output_dir / "metrics.json"
    if ckpt_path is None or not metrics_file.is_file():
        return None
    if output_dir.resolve() not in Path(ckpt_path).resolve().parents:
        return None
    why = nothing_left_to_train(ckpt_path, trainer.max_epochs, trainer.max_steps)
    if not why:
        return None
    log.info(
        "Nothing left to train: %s is at the end of training (%s); %s is kept as it was (raise "
        "trainer.max_epochs to train on)",
        ckpt_path,
        why,
        metrics_file,
    )
    return json.loads(metrics_file.read_text())


def _plugins(cfg: DictConfig) -> list[Any]:
    """The trainer's plugins: those of ``trainer.plugins``, and checkpoints written whole or
    not at all (:class:`~bbb_lightning.storage.atomic_files.AtomicCheckpointIO`) unless it names a
    checkpoint IO of its own."""
    configured = cfg.trainer.get("plugins") or []
    plugins = [instantiate(p) if OmegaConf.is_config(p) else p for p in configured]
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    if not any(isinstance(plugin, ClusterEnvironment) for plugin in plugins):
        launcher = HydraConfig.get().launcher if HydraConfig.initialized() else None
        environment = slurm_environment(launcher)
        if environment is not None:
            plugins.append(environment)
    return plugins


def _checkpoint_dir(callbacks: list[Any], output_dir: Path) -> Path:
    """Where the run's ``last.ckpt`` goes: its checkpoint callback's folder, else
    ``<output_dir>/checkpoints``."""
    for callback in callbacks:
        if isinstance(callback, LightningModelCheckpoint) and callback.dirpath is not None:
            return Path(callback.dirpath)
    return output_dir / "checkpoints"


def _check_finite(metrics: dict[str, float], skipped_steps: int) -> None:
    """A run whose final metrics are NaN or infinite fails (after ``metrics.json`` is written):
    with ``on_nonfinite=skip`` every step may have been skipped and nothing learned."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise NonFiniteError(
            f"non-finite {bad[0]}={metrics[bad[0]]} at the end of the run ({skipped_steps} "
            f"training steps were skipped as non-finite); {LIKELY_CAUSES}; every metric is in "
            "metrics.json"
        )


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    model: BayesByBackprop,
    datamodule: pl.LightningDataModule,
    output_dir: Path,
) -> dict[str, float]:
    started = time.perf_counter()
    preemption = next(c for c in trainer.callbacks if isinstance(c, Preemption))
    watch = next(c for c in trainer.callbacks if isinstance(c, ProcessWatch))
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except BaseException as error:
        if stopped_by_sigterm(error):
            raise preempted_fault(preemption.saved, output_dir, "training") from None
        if is_lost_peer_error(error):
            raise watch.fault(error) from None
        raise
    fit_seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}

    checkpoint = trainer.checkpoint_callback
    best, best_score = checkpoint.best() if isinstance(checkpoint, ModelCheckpoint) else ("", None)
    skipped_steps = model.skipped_steps  # the run's; loading the best checkpoint restores its own
    try:
        (test_results,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
    except BaseException as error:
        if stopped_by_sigterm(error):
            raise preempted_fault(None, output_dir, "testing") from None
        if is_lost_peer_error(error):
            raise watch.fault(error) from None
        raise
    watch.finish()
    model.skipped_steps = skipped_steps
    metrics |= {name: float(value) for name, value in test_results.items()}
    metrics |= {"fit_seconds": fit_seconds, "epochs": float(trainer.current_epoch)}
    if best and best_score is not None:  # None: a checkpoint monitoring nothing
        metrics[f"best/{cfg.optimized_metric}"] = float(best_score)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # The next job of a multirun starts new processes: it needs a new process group.
        torch.distributed.destroy_process_group()
    return metrics


@checked("config", rewrite=resumed_in_place)
@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the best value of ``cfg.optimized_metric`` over the run's
    validations (that of the checkpoint it tested; the last one without a checkpoint) for
    sweepers."""
    metrics = exit_on_user_error(train, cfg)
    return metrics.get(f"best/{cfg.optimized_metric}", metrics.get(cfg.optimized_metric))


if __name__ == "__main__":
    main()
