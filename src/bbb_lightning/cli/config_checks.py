"""Early, one-line checks of a composed config: each names the key, the value and what is allowed.

Constructors validate their own arguments too (priors, posteriors, likelihoods, datamodules);
:meth:`UserError.describe` turns those errors, raised through ``hydra.utils.instantiate``, into
the same one-line form.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..bayes._arguments import is_real
from ..bayes.kl import KL_REDUCTIONS
from ..bayes.layers import ESTIMATORS
from ..storage.checkpoint_files import checkpoint_problem, describe_intact_alternative
from ..storage.run_lock import acquire_run_lock, release_run_lock
from ..summary import metric_mode
from ..training.faults import RunFault, check_writable
from ..training.guard import NONFINITE_MODES, NonFiniteError
from ..training.module import compile_backends
from ..training.objectives import KL_WEIGHTINGS
from .config_terms import in_config_terms

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "RefuseEarlierRunDirectory",
    "UserError",
    "check_checkpoint",
    "check_config",
    "check_finite_numbers",
    "check_fresh_output_dir",
    "check_fresh_sweep_dir",
    "check_input_fits",
    "check_no_missing_values",
    "check_optimized_metric",
    "check_resumable",
    "check_same_model_and_data",
    "exit_on_user_error",
    "format_metrics",
    "user_errors",
]


class UserError(Exception):
    """Mistakes in the user's config or data, reported as one line each without a traceback.

    ``UserError(*problems)``: one or more independent problems, each one line; ``str`` of the
    error is the lines joined by newlines.
    """

    def __init__(self, *problems: str) -> None:
        self.problems = [line for problem in problems for line in str(problem).splitlines()]
        super().__init__("\n".join(self.problems))

    @staticmethod
    def describe(error: BaseException) -> str:
        """One line for ``error`` (one per problem of a UserError); for an instantiation error,
        the root cause and its key."""
        if isinstance(error, UserError):
            return str(error)
        if isinstance(error, InstantiationException):
            cause = error.__cause__ or error
            key = getattr(error, "full_key", None)
            where = f" (config key {key!r})" if key else ""
            # Hydra's own messages span lines ("Error loading 'x':" then the reason): join them
            text = " ".join(line.strip() for line in str(cause).splitlines() if line.strip())
            called = re.match(r"Error in call to target '([^']+)'", str(error))
            if called and cause is not error:  # which component: its class, e.g. nets.MLP
                text = f"{called.group(1)}: {text}"
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", text)
            if unexpected and key:
                where += f"; drop it with '~{key}.{unexpected.group(1)}'"
            return f"{text}{where}"
        return str(error).splitlines()[0] if str(error) else type(error).__name__


def config_group_lines(*left_out: str) -> str:
    """``group: option, option`` for every config group of the package's ``conf/`` folder
    but ``hydra`` and ``left_out`` (``${config_groups:ood}`` in train's ``--help``: Hydra's
    own ``$APP_CONFIG_GROUPS`` would list evaluate's ``ood`` there too)."""
    conf = Path(__file__).parents[1] / "conf"
    folders = sorted(
        folder
        for folder in conf.iterdir()
        if folder.is_dir() and folder.name not in ("hydra", "__pycache__", *left_out)
    )
    return "\n".join(
        f"{folder.name}: {', '.join(sorted(p.stem for p in folder.glob('*.yaml')))}"
        for folder in folders
    )


OmegaConf.register_new_resolver("config_groups", config_group_lines, replace=True)
# ${metric_mode:val/accuracy} -> max (the checkpoint callback's mode), and Optuna's direction.
OmegaConf.register_new_resolver("metric_mode", metric_mode, replace=True)
OmegaConf.register_new_resolver(
    "optuna_direction",
    lambda name: "maximize" if metric_mode(name) == "max" else "minimize",
    replace=True,
)


def exit_on_user_error(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point's task; a user error, a non-finite loss or a fault of the machine
    (:class:`~bbb_lightning.training.faults.RunFault`) becomes one log line.

    In a single run the process then exits with status 1 (a fault: its ``exit_status``), no
    traceback. In a multirun the
    error is re-raised, so that Hydra records the job as failed and runs the others. A
    :class:`NonFiniteError` is decided by every process of a data-parallel run together and
    raised by each with the same message: rank 0 alone logs it.
    """
    try:
        return task(cfg)
    except (UserError, FloatingPointError, RunFault) as error:
        if not (isinstance(error, NonFiniteError) and rank_zero_only.rank > 0):
            for line in UserError.describe(error).splitlines():
                log.error("%s", line)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(getattr(error, "exit_status", 1))


def format_metrics(metrics: dict[str, float]) -> str:
    """One aligned ``name  value`` line per metric, sorted by name."""
    width = max(map(len, metrics), default=0)
    return "\n".join(f"  {name:<{width}}  {value:.6g}" for name, value in sorted(metrics.items()))


@contextmanager
def user_errors(cfg: DictConfig | None = None) -> Iterator[None]:
    """Turn the ValueError / TypeError / FileNotFoundError of user-facing setup into UserError;
    given the config, told in its terms (the key and value, :func:`in_config_terms`)."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, InstantiationException) as error:
        lines = UserError.describe(error).splitlines()
        if cfg is not None:
            lines = [in_config_terms(line, cfg) for line in lines]
        raise UserError(*lines) from error


def _require(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    """A UserError ``key=value is not allowed: allowed`` unless ``ok(value)``; an absent key is
    None, a mandatory value left unset (``???``) is left to :func:`check_no_missing_values`."""
    value = cfg
    for part in key.split("."):
        if isinstance(value, DictConfig) and part in value and OmegaConf.is_missing(value, part):
            return
        value = value.get(part) if isinstance(value, DictConfig) else None
    if not ok(value):
        raise UserError(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_positive(v: Any) -> bool:
    return is_real(v) and v > 0


def _is_finite_number(v: Any) -> bool:
    return is_real(v) and math.isfinite(v)


def _is_list_of(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
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
            _require(cfg, key, ok, allowed)
        except UserError as error:
            problems.append(str(error))

    for check in (check_no_missing_values, check_finite_numbers, _check_min_epochs_within_max):
        try:
            check(cfg)
        except UserError as error:
            problems.extend(error.problems)
    require("seed", _is_int(0), "an integer >= 0")
    require("num_samples", _is_int(1), "an integer >= 1")
    require("eval_samples", _is_int(1), "an integer >= 1")
    require("kl.weighting", lambda v: v in KL_WEIGHTINGS, f"one of {list(KL_WEIGHTINGS)}")
    require("kl.reduction", lambda v: v in KL_REDUCTIONS, f"one of {list(KL_REDUCTIONS)}")
    require("kl.scale", lambda v: _is_positive(v) or v == 0, "a number >= 0")
    require("kl.warmup_steps", _is_int(0), "an integer >= 0")
    require("kl.monte_carlo", lambda v: v is None or isinstance(v, bool), "true or false")
    require("posterior.estimator", lambda v: v in ESTIMATORS, f"one of {list(ESTIMATORS)}")
    require(
        "compile",
        lambda v: isinstance(v, bool) or v in compile_backends(),
        f"true, false or a torch.compile backend ({', '.join(compile_backends())})",
    )
    require("dataset.batch_size", lambda v: v is None or _is_int(1)(v), "an integer >= 1")
    require("optimizer.lr", _is_positive, "a number > 0")
    require("optimizer.fused", lambda v: v is None or isinstance(v, bool), "true or false")
    require(
        "trainer.max_epochs",
        lambda v: v is None or v == -1 or _is_int(1)(v),
        "an integer >= 1 (or -1: no limit)",
    )
    require(
        "trainer.limit_train_batches",
        lambda v: v is None or _is_positive(v),
        "null (all batches), an integer >= 1 or a fraction in (0, 1]: 0 would train nothing",
    )
    require(
        "trainer.limit_val_batches",
        lambda v: v is None or (is_real(v) and v >= 0),
        "null (all batches), an integer >= 0 or a fraction in [0, 1] (0: no validation)",
    )
    require(
        "trainer.limit_test_batches",
        lambda v: v is None or _is_positive(v),
        "null (all batches), an integer >= 1 or a fraction in (0, 1]: 0 would test nothing",
    )
    require(
        "trainer.gradient_clip_val",
        lambda v: v is None or (_is_positive(v) and math.isfinite(v)),
        "null (no clipping) or a finite number > 0 (Lightning skips clipping at <= 0)",
    )
    require(
        "trainer.min_epochs",
        lambda v: v is None or _is_int(0)(v),
        "null or an integer >= 0",
    )
    for key in ("accumulate_grad_batches", "check_val_every_n_epoch", "log_every_n_steps"):
        require(f"trainer.{key}", lambda v: v is None or _is_int(1)(v), "an integer >= 1")
    for key in ("enable_model_summary", "enable_progress_bar", "enable_checkpointing"):
        require(f"trainer.{key}", lambda v: v is None or isinstance(v, bool), "true or false")
    require(
        "trainer.deterministic",
        lambda v: v is None or isinstance(v, bool) or v == "warn",
        "true, false or 'warn'",
    )
    require(
        "trainer.val_check_interval",
        lambda v: v is None or _is_int(1)(v) or (isinstance(v, float) and 0 < v <= 1),
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


def check_checkpoint(path: Path) -> None:
    """A readable Lightning checkpoint, or a one-line UserError naming the path (and, for a
    damaged one, the newest intact checkpoint beside it)."""
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} is not allowed: no such checkpoint file")
    problem = checkpoint_problem(path)
    if problem is not None:
        alternative = describe_intact_alternative(path)
        raise UserError(f"ckpt_path={str(path)!r} is not allowed: {problem}; {alternative}")


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


class RefuseEarlierRunDirectory(Callback):
    """Hydra callback: a run pointed at a directory that already holds a run stops before Hydra
    writes anything there, so the earlier run's files are left as they were
    (:func:`check_fresh_output_dir` in ``train`` comes too late for them).

    A single run checks ``hydra.run.dir`` (its ``.hydra/``, ``train.log``); a multirun checks
    ``hydra.sweep.dir`` before the sweeper writes ``multirun.yaml`` and its jobs their
    ``0/.hydra/``, ``0/train.log``, ... and :class:`~bbb_lightning.summary.SweepSummary` its
    ``summary.md`` (see :func:`check_fresh_sweep_dir`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # A run.dir with ${now:...} resolves to a new directory here as later; a literal one,
        # the only kind that can hold an earlier run, resolves to itself.
        run_dir = Path(str(config.hydra.run.dir))
        with _refused_on_stderr():
            check_writable(run_dir, "hydra.run.dir")
            with _released_if_refused(run_dir, acquire_run_lock(run_dir, "hydra.run.dir")):
                ckpt_path = config.get("ckpt_path")
                check_fresh_output_dir(run_dir, ckpt_path)
                if _resumes_in(run_dir, ckpt_path):
                    check_same_model_and_data(run_dir, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Hydra calls this before the sweeper writes multirun.yaml or any job directory. A
        # sweep.dir with ${now:...} resolves to a new directory (the resolver caches its value).
        with _refused_on_stderr():
            sweep_dir = Path(str(config.hydra.sweep.dir))
            check_writable(sweep_dir, "hydra.sweep.dir")
            with _released_if_refused(sweep_dir, acquire_run_lock(sweep_dir, "hydra.sweep.dir")):
                check_fresh_sweep_dir(sweep_dir)


@contextmanager
def _released_if_refused(directory: Path, acquired: bool) -> Iterator[None]:
    """Keep the lock of ``directory`` taken for the run (the process releases it when it ends),
    unless the block refuses the run: then the directory is left as it was found."""
    try:
        yield
    except UserError:
        if acquired:
            release_run_lock(directory)
        raise


@contextmanager
def _refused_on_stderr() -> Iterator[None]:
    """A UserError (or a RunFault: a busy or read-only directory) becomes one line on stderr and
    exit status 1: not in a log file, since the directory's ``train.log`` (or the sweep's files)
    belongs to the earlier run, or cannot be written."""
    try:
        yield
    except (UserError, RunFault) as error:
        print(f"[{__name__}][ERROR] - {error}", file=sys.stderr)
        sys.exit(1)


def check_fresh_sweep_dir(sweep_dir: Path) -> None:
    """Refuse to start a multirun in a sweep directory that already holds an earlier one: its
    ``multirun.yaml``, or a job directory (``0/``, ``1/``, ...) with a ``.hydra/`` folder,
    ``metrics.json`` or checkpoints. The new jobs, numbered from 0 again, would write their
    config and ``train.log`` over the earlier jobs' and rewrite ``summary.md``. A job of it is
    resumed as a single run: ``hydra.run.dir=<its job dir> ckpt_path=<its last.ckpt>``."""
    if not sweep_dir.is_dir():
        return
    earlier = [sweep_dir / "multirun.yaml"] if (sweep_dir / "multirun.yaml").exists() else []
    earlier += [
        job
        for job in sorted(sweep_dir.iterdir())
        if job.is_dir()
        and (
            (job / ".hydra").is_dir()
            or (job / "metrics.json").exists()
            or any(job.glob("checkpoints/*.ckpt"))
        )
    ]
    if earlier:
        held = ", ".join(path.name + ("/" if path.is_dir() else "") for path in earlier[:3])
        held += ", ..." if len(earlier) > 3 else ""
        raise UserError(
            f"hydra.sweep.dir={str(sweep_dir)!r} is not allowed: it already holds a multirun "
            f"({held}); choose a new hydra.sweep.dir (or leave it to its default "
            "multirun/<date>/<time>), or resume one of its jobs with "
            "hydra.run.dir=<its job dir> ckpt_path=<its checkpoints/last.ckpt>"
        )


def check_same_model_and_data(run_dir: Path, cfg: DictConfig) -> None:
    """A run resumed into its own directory keeps its network and data (``model``,
    ``dataset``, ``prior``, ``posterior``, ``likelihood``): Hydra rewrites the run's saved
    config, from which evaluate and predict rebuild the network. Other settings (epochs, the
    optimizer) may change."""
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)
    for group in ("model", "dataset", "prior", "posterior", "likelihood"):
        before = OmegaConf.to_container(saved[group]) if group in saved else None
        now = OmegaConf.to_container(cfg[group]) if group in cfg else None
        if before != now:
            raise UserError(
                f"resuming the run in {str(run_dir)!r} with other {group} settings than its own "
                f"(saved in {saved_file}) would overwrite them; resume with its settings, or "
                "into another hydra.run.dir"
            )


def check_resumable(model: torch.nn.Module, ckpt_path: str | None) -> None:
    """The checkpoint to resume from holds this config's network: the same tensors, of the
    same shapes (a changed architecture failed inside Lightning with a size-mismatch
    traceback)."""
    if ckpt_path is None:
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    here = model.state_dict()
    for name in sorted(set(saved) | set(here)):
        ours, theirs = here.get(name), saved.get(name)
        shape = None if ours is None else tuple(ours.shape)
        saved_shape = None if theirs is None else tuple(theirs.shape)
        if shape != saved_shape:
            raise UserError(
                f"ckpt_path={ckpt_path!r} is not allowed: its network does not match this "
                f"config ({name}: {saved_shape or 'absent'} in the checkpoint, "
                f"{shape or 'absent'} here); resume with the run's own settings"
            )


def _resumes_in(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` is a checkpoint of the run in ``run_dir`` (a resume in place)."""
    return ckpt_path is not None and run_dir.resolve() in Path(ckpt_path).resolve().parents


def check_fresh_output_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to write a new run over an earlier one (resuming into its own directory is fine)."""
    earlier = (output_dir / "metrics.json").exists() or any(output_dir.glob("checkpoints/*.ckpt"))
    if earlier and not _resumes_in(output_dir, ckpt_path):
        raise UserError(
            f"output directory {str(output_dir)!r} already holds a run; choose another "
            "hydra.run.dir, or resume that run with ckpt_path=<its checkpoints/last.ckpt>"
        )
