"""The error type of a user's mistake and how an entry point reports it: one line each, no
traceback, and a non-zero exit status (in a multirun, the job fails and the others run)."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from ..training.faults import RunFault
from ..training.guard import NonFiniteError
from .config_terms import in_config_terms

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def exit_on_user_error(task: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """Run an entry point's task; a user error, a non-finite loss or a fault of the machine
    (:class:`~bbb_lightning.training.faults.RunFault`) becomes one log line.

    In a single run the process then exits with status 1 (a fault: its ``exit_status``), no
    traceback. In a multirun the
    error is re-raised, so that Hydra records the job as failed and runs the others. A
    :class:`NonFiniteError` is decided by every process of a data-parallel run together and
    raised by each with the same message: rank 0 alone logs it, as a fault raised by every
    process (a SIGTERM).
    """
    try:
        return task(cfg)
    except (UserError, FloatingPointError, RunFault) as error:
        reported_by_rank_zero = isinstance(error, NonFiniteError) or getattr(
            error, "every_process", False
        )
        if not (reported_by_rank_zero and rank_zero_only.rank > 0):
            for line in UserError.describe(error).splitlines():
                log.error("%s", line)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(getattr(error, "exit_status", 1))


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
