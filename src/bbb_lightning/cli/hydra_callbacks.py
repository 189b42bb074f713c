"""Hydra callbacks: a run or a multirun pointed at a directory that already holds one stops
before Hydra writes anything there."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..storage.resume import latest_state_of_same_run
from ..storage.run_lock import acquire_run_lock, release_run_lock
from ..training.faults import RunFault, check_writable
from ..training.preemption import run_config_text
from .errors import UserError
from .run_dir_checks import (
    check_fresh_output_dir,
    check_fresh_sweep_dir,
    check_same_model_and_data,
    resumes_in,
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
                if latest_state_of_same_run(run_dir, run_config_text(config)) is not None:
                    return  # the same command again: train resumes the unfinished run
                ckpt_path = config.get("ckpt_path")
                check_fresh_output_dir(run_dir, ckpt_path)
                if resumes_in(run_dir, ckpt_path):
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
