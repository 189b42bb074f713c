"""Early, one-line checks of a composed config: each names the key, the value and what is allowed.

Constructors validate their own arguments too (priors, posteriors, likelihoods, datamodules);
:meth:`UserError.describe` turns those errors, raised through ``hydra.utils.instantiate``, into
the same one-line form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..bayes.arguments import is_real
from ..bayes.kl import KL_REDUCTIONS
from ..bayes.layers import ESTIMATORS
from ..training.guard import NONFINITE_MODES
from ..training.module import compile_backends
from ..training.objectives import KL_WEIGHTINGS
from .errors import UserError
from .run_dir_checks import check_checkpoint

# The profilers Lightning's Trainer(profiler=...) takes by name.
PROFILERS = ("simple", "advanced", "pytorch", "xla")


def require_value(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    """A UserError ``key=value is not allowed: allowed`` unless ``ok(value)``; an absent key is
    None, a mandatory value left unset (``???``) is left to :func:`check_no_missing_values`."""
    value = cfg
    for part in key.split("."):
        if isinstance(value, DictConfig) and part in value and OmegaConf.is_missing(value, part):
            return
        value = value.get(part) if isinstance(value, DictConfig) else None
    if not ok(value):
        raise UserError(f"{key}={value!r} is not allowed: {allowed}")


def integer_at_least(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def is_positive(v: Any) -> bool:
    return is_real(v) and v > 0


def is_finite_number(v: Any) -> bool:
    return is_real(v) and math.isfinite(v)


def is_tag_list(v: Any) -> bool:
    """A list of non-empty names (strings or numbers, as ``tags=[v2,2024]`` parses); absent or
    null: no tags."""
    return v is None or list_of(
        lambda tag: isinstance(tag, str | int | float) and not isinstance(tag, bool) and str(tag)
    )(v)


def list_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """A list whose every item passes ``ok``; ``[]`` passes (it skips that part of a job)."""
    return lambda v: isinstance(v, ListConfig) and all(ok(item) for item in v)


def check_config(cfg: DictConfig) -> None:
    """Validate the top-level knobs of a training config before anything is built: one
    UserError naming every problem found (one line each)."""
    problems = config_problems(cfg)
    if problems:
        raise UserError(*problems)


def config_problems(cfg: DictConfig) -> list[str]:
    """One line per problem of the training config's keys and values (nothing is built)."""
    problems: list[str] = []

    def require(key: str, ok: Callable[[Any], bool], allowed: str) -> None:
        try:
            require_value(cfg, key, ok, allowed)
        except UserError as error:
            problems.append(str(error))

    for check in (check_no_missing_values, check_finite_numbers, _check_min_epochs_within_max):
        try:
            check(cfg)
        except UserError as error:
            problems.extend(error.problems)
    require("seed", integer_at_least(0), "an integer >= 0")
    require("num_samples", integer_at_least(1), "an integer >= 1")
    require("eval_samples", integer_at_least(1), "an integer >= 1")
    require("kl.weighting", lambda v: v in KL_WEIGHTINGS, f"one of {list(KL_WEIGHTINGS)}")
    require("kl.reduction", lambda v: v in KL_REDUCTIONS, f"one of {list(KL_REDUCTIONS)}")
    require("kl.scale", lambda v: is_positive(v) or v == 0, "a number >= 0")
    require("kl.warmup_steps", integer_at_least(0), "an integer >= 0")
    require("kl.monte_carlo", lambda v: v is None or isinstance(v, bool), "true or false")
    require("posterior.estimator", lambda v: v in ESTIMATORS, f"one of {list(ESTIMATORS)}")
    require(
        "compile",
        lambda v: isinstance(v, bool) or v in compile_backends(),
        f"true, false or a torch.compile backend ({', '.join(compile_backends())})",
    )
    require("dataset.batch_size", lambda v: v is None or integer_at_least(1)(v), "an integer >= 1")
    require("optimizer.lr", is_positive, "a number > 0")
    require("optimizer.fused", lambda v: v is None or isinstance(v, bool), "true or false")
    require(
        "trainer.max_epochs",
        lambda v: v is None or v == -1 or integer_at_least(1)(v),
        "an integer >= 1 (or -1: no limit)",
    )
    require(
        "trainer.limit_train_batches",
        lambda v: v is None or is_positive(v),
        "null (all batches), an integer >= 1 or a fraction in (0, 1]: 0 would train nothing",
    )
    require(
        "trainer.limit_val_batches",
        lambda v: v is None or (is_real(v) and v >= 0),
        "null (all batches), an integer >= 0 or a fraction in [0, 1] (0: no validation)",
    )
    require(
        "trainer.limit_test_batches",
        lambda v: v is None or is_positive(v),
        "null (all batches), an integer >= 1 or a fraction in (0, 1]: 0 would test nothing",
    )
    require(
        "trainer.gradient_clip_val",
        lambda v: v is None or (is_positive(v) and math.isfinite(v)),
        "null (no clipping) or a finite number > 0 (Lightning skips clipping at <= 0)",
    )
    require(
        "trainer.min_epochs",
        lambda v: v is None or integer_at_least(0)(v),
        "null or an integer >= 0",
    )
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch", "log_every_n_steps"):
        require(f"trainer.{key}", lambda v: v is None or integer_at_least(1)(v), "an integer >= 1")
    for key in ("enable_model_summary", "enable_progress_bar", "enable_checkpointing"):
        require(f"trainer.{key}", lambda v: v is None or isinstance(v, bool), "true or false")
    require("trainer.detect_anomaly", lambda v: v is None or isinstance(v, bool), "true or false")
    require(
        "trainer.fast_dev_run",
        lambda v: v is None or isinstance(v, bool) or integer_at_least(0)(v),
        "true, false or an integer >= 1 (that many batches of each stage)",
    )
    require(
        "trainer.overfit_batches",
        lambda v: v is None or integer_at_least(0)(v) or (isinstance(v, float) and 0 <= v <= 1),
        "0 (off), an integer >= 1 (that many batches) or a fraction in (0, 1]",
    )
    require(
        "trainer.profiler",
        lambda v: v is None or v in PROFILERS or isinstance(v, DictConfig),
        f"null, one of {list(PROFILERS)} or a profiler's _target_ node",
    )
    require("tags", is_tag_list, "a list of names, e.g. tags=[baseline,mnist]")
    require("extras.print_config", lambda v: v is None or isinstance(v, bool), "true or false")
    require(
        "trainer.deterministic",
        lambda v: v is None or isinstance(v, bool) or v == "warn",
        "true, false or 'warn'",
    )
    require(
        "trainer.val_check_interval",
        lambda v: v is None or integer_at_least(1)(v) or (isinstance(v, float) and 0 < v <= 1),
        "null (once per epoch), an integer >= 1 (every that many batches) or a fraction in "
        "(0, 1] of an epoch",
    )
    accelerator = cfg.get("trainer", {}).get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        problems.append(
            f"trainer.accelerator={accelerator!r} is not allowed: no CUDA GPU on this machine; "
            "use trainer=cpu (or trainer=ddp_cpu)"
        )
    require("on_nonfinite", lambda v: v in NONFINITE_MODES, f"one of {list(NONFINITE_MODES)}")
    require("retain_freed_memory", lambda v: isinstance(v, bool), "true or false")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None:
        try:
            check_checkpoint(Path(ckpt_path))
        except UserError as error:
            problems.extend(error.problems)
    return problems


def _check_min_epochs_within_max(cfg: DictConfig) -> None:
    """Lightning stops at ``max_epochs`` even when ``min_epochs`` asks for more, silently."""
    trainer = cfg.get("trainer") or {}
    low, high = trainer.get("min_epochs"), trainer.get("max_epochs")
    valid = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (low, high))
    if valid and low > high:  # an invalid one of them is named by its own check
        raise UserError(
            f"trainer.min_epochs={low!r} is not allowed: at most trainer.max_epochs={high!r}"
        )


def check_no_missing_values(cfg: DictConfig) -> None:
    """A UserError with one line per mandatory value (``???``) left unset, e.g.
    ``dataset.target`` of ``dataset=csv``."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise UserError(
            *(
                f"{key} is required and has no default: set {key}=... on the command line"
                for key in missing
            )
        )


def check_finite_numbers(cfg: DictConfig) -> None:
    """A UserError with one line per NaN or infinite number in the config (``lr=inf``,
    ``prior.loc=nan``): no setting of ours takes one, and each would only surface as a
    non-finite loss blamed on the learning rate."""
    bad: list[str] = []

    def visit(prefix: str, node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(node, dict):
                name = f"{prefix}.{key}" if prefix else str(key)
            else:
                name = f"{prefix}[{key}]"
            if isinstance(value, dict | list):
                visit(name, value)
            elif isinstance(value, float) and not math.isfinite(value):
                bad.append(f"{name}={value} is not allowed: a finite number")

    visit("", OmegaConf.to_container(cfg, resolve=False))
    if bad:
        raise UserError(*bad)


def check_optimized_metric(name: str, metrics: Iterable[str]) -> None:
    """``optimized_metric`` (what the best checkpoint optimises: minimises, or maximises for
    accuracy) is ``val/nll`` or one of the validation metrics of the model's likelihood."""
    allowed = ["val/nll", *(f"val/{metric}" for metric in metrics)]
    if name not in allowed:
        raise UserError(f"optimized_metric={name!r} is not allowed: one of {allowed}")


def check_epoch_length(trainer: Any, datamodule: Any) -> None:
    """Batch limits that leave an epoch without a training batch, or a validation or test pass
    without a batch, and a validation interval longer than the epoch, as one-line errors before
    training (Lightning raises them from inside ``fit``, or from ``test`` after training)."""
    num_train, batch_size = (getattr(datamodule, key, None) for key in ("num_train", "batch_size"))
    if not (isinstance(num_train, int) and isinstance(batch_size, int)):
        return  # a datamodule of the user's own: Lightning checks at fit
    batches = math.ceil(math.ceil(num_train / trainer.world_size) / batch_size)
    limit = trainer.limit_train_batches
    limited = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
    if limited == 0:
        raise UserError(
            f"trainer.limit_train_batches={limit!r} is not allowed: it keeps less than one of the "
            f"{batches} training batches of an epoch; use at least {1 / batches:.3g} or an integer"
        )
    for split, name, allowed in (
        ("val", "validation", ", an integer or 0 (no validation)"),
        ("test", "test", " or an integer"),
    ):
        limit = getattr(trainer, f"limit_{split}_batches")
        batches = _fewest_batches(getattr(datamodule, f"{split}_set", None), batch_size, trainer)
        if isinstance(limit, float) and limit > 0 and batches and int(batches * limit) == 0:
            raise UserError(
                f"trainer.limit_{split}_batches={limit!r} is not allowed: it keeps less than one "
                f"of the {batches} {name} batches; use at least {1 / batches:.3g}{allowed}"
            )
    interval = trainer.val_check_interval
    if (
        isinstance(interval, int)
        and interval > limited
        and trainer.check_val_every_n_epoch is not None
        and trainer.limit_val_batches
    ):
        raise UserError(
            f"trainer.val_check_interval={interval} is not allowed: an epoch has {limited} "
            f"training batches; use at most {limited} or a fraction in (0, 1] of an epoch"
        )


def _fewest_batches(dataset: Any, batch_size: int, trainer: Any) -> int:
    """The batches of the smallest non-empty share of a validation or test ``dataset`` (rank r
    of R takes every R-th example from the r-th): Lightning applies a fractional
    ``limit_*_batches`` to each process's share. 0 for no dataset."""
    if dataset is None:
        return 0
    world_size = trainer.world_size
    shares = [len(range(rank, len(dataset), world_size)) for rank in range(world_size)]
    return min((math.ceil(share / batch_size) for share in shares if share), default=0)


def check_input_fits(model: torch.nn.Module, batch: Any) -> None:
    """One forward pass on two examples of ``batch``: a shape error, or an output that is not
    one tensor of shape (B, the likelihood's ``num_outputs``), becomes a UserError."""
    x = batch[0][:2]
    try:
        with torch.no_grad():
            outputs = model(x, 1)
    except RuntimeError as error:
        reason = str(error).splitlines()[0]
        raise UserError(
            f"an input of shape {tuple(x.shape[1:])} does not fit the network ({reason}); check "
            "model.net (e.g. its input_shape) against the dataset"
        ) from None
    num_outputs = getattr(getattr(model, "likelihood", None), "num_outputs", None)
    expected = (len(x), num_outputs)
    shape = tuple(outputs.shape[1:]) if isinstance(outputs, torch.Tensor) else None
    if num_outputs is not None and shape != expected:
        got = f"shape {shape}" if shape is not None else f"a {type(outputs).__name__}"
        raise UserError(
            f"model.net returns {got} for a batch of {len(x)}; the likelihood needs one tensor "
            f"of shape {expected} (num_outputs={num_outputs})"
        )
