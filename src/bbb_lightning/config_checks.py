"""Early, one-line checks of a composed config: each names the key, the value and what is allowed.

Constructors validate their own arguments too (priors, posteriors, likelihoods, datamodules);
:meth:`UserError.describe` turns those errors, raised through ``hydra.utils.instantiate``, into
the same one-line form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from omegaconf import DictConfig

from .bayes.kl import KL_REDUCTIONS
from .bayes.layers import ESTIMATORS
from .objectives import KL_WEIGHTINGS

__all__ = ["UserError", "check_config", "user_errors"]


class UserError(Exception):
    """A mistake in the user's config or data, reported as one line without a traceback."""

    @staticmethod
    def describe(error: BaseException) -> str:
        """One line for ``error``; for an instantiation error, the root cause and its key."""
        if isinstance(error, InstantiationException):
            cause = error.__cause__ or error
            key = getattr(error, "full_key", None)
            where = f" (config key {key!r})" if key else ""
            return f"{type(cause).__name__}: {cause}{where}".splitlines()[0]
        return str(error).splitlines()[0] if str(error) else type(error).__name__


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the ValueError / TypeError / FileNotFoundError of user-facing setup into UserError."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError, InstantiationException) as error:
        raise UserError(UserError.describe(error)) from error


def _require(cfg: DictConfig, key: str, ok: Callable[[Any], bool], allowed: str) -> None:
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, DictConfig) else None
    if not ok(value):
        raise UserError(f"{key}={value!r} is not allowed: {allowed}")


def _is_int(minimum: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def check_config(cfg: DictConfig) -> None:
    """Validate the top-level knobs of a training config before anything is built."""
    _require(cfg, "seed", _is_int(0), "an integer >= 0")
    _require(cfg, "num_samples", _is_int(1), "an integer >= 1")
    _require(cfg, "eval_samples", _is_int(1), "an integer >= 1")
    _require(cfg, "kl.weighting", lambda v: v in KL_WEIGHTINGS, f"one of {list(KL_WEIGHTINGS)}")
    _require(cfg, "kl.reduction", lambda v: v in KL_REDUCTIONS, f"one of {list(KL_REDUCTIONS)}")
    _require(cfg, "kl.scale", lambda v: _is_positive(v) or v == 0, "a number >= 0")
    _require(cfg, "kl.warmup_steps", _is_int(0), "an integer >= 0")
    _require(cfg, "posterior.estimator", lambda v: v in ESTIMATORS, f"one of {list(ESTIMATORS)}")
    _require(cfg, "optimizer.lr", _is_positive, "a number > 0")
    _require(
        cfg,
        "trainer.max_epochs",
        lambda v: v is None or v == -1 or _is_int(1)(v),
        "an integer >= 1 (or -1: no limit)",
    )
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path!r} is not allowed: no such checkpoint file")
