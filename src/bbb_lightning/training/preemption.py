"""Preemption: at SIGTERM a run saves its state at the step it reached, says so and exits 143.

Lightning's signal connector (``lightning.pytorch.trainer.connectors.signal_connector``) turns
SIGTERM into a flag that its loops read at safe points: after a training batch (its optimizer
step, any validation after it and its logging done), after a training epoch, and between two
validation batches. There they raise ``SIGTERMException``, a ``SystemExit`` whose status is 0:
the run looked successful, and it had saved nothing since the last epoch. :class:`Preemption`
saves the trainer's full state at that point (``trainer.save_checkpoint``: weights, optimizer,
loop counters, the resumable loader's position, the checkpoint callback's best score) as
``last.ckpt``, so a resume from it trains exactly the steps an uninterrupted run would have.

A SIGTERM in the middle of a validation is saved as "the validation after step t not yet run":
Lightning, resumed, would skip a validation that had started, or run only its remaining
batches; this way the whole validation runs again (its randomness is seeded per epoch, so it
gives the uninterrupted run's metrics).

Under SLURM, Lightning's ``SLURMEnvironment(auto_requeue=True, requeue_signal=SIGUSR1)``
makes the connector handle the signal SLURM sends ahead of the time limit
(``--signal=USR1@<seconds>``, set by the ``slurm`` launcher config) by ``scontrol requeue``;
SLURM then ends the job with SIGTERM, which lands here. :func:`slurm_environment` builds that
plugin with the signal the launcher asked SLURM for. The handlers are those of
:class:`SignalConnector`: Lightning's own run collectives inside the handler (a broadcast, the
requeue handler's checkpoint), which hang a data-parallel run whose processes are in another
collective when the signal lands.

Every checkpoint also records the run's config (:meth:`Preemption.on_save_checkpoint`), which
is how the same command, started again, recognises the state of its own unfinished run
(:func:`bbb_lightning.storage.resume.latest_state_of_same_run`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_info
from omegaconf import DictConfig, OmegaConf

from ..storage.resume import RUN_CONFIG_KEY
from .faults import EXIT_PREEMPTED, RunFault

log = logging.getLogger(__name__)

__all__ = [
    "Preemption",
    "SavedAtSignal",
    "SignalConnector",
    "install_signal_connector",
    "requeue_signal",
    "run_config_text",
    "slurm_environment",
]


def run_config_text(cfg: DictConfig) -> str:
    """The run's config as one canonical string, interpolations unresolved and ``hydra`` left
    out: equal for the same command line started again (a requeued job), in the same place."""
    container = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return json.dumps(container, sort_keys=True, default=str)


@dataclass(frozen=True)
class SavedAtSignal:
    """Where and at which point of training the state was saved at SIGTERM."""

    path: Path
    global_step: int
    epoch: int
    batch: int
    num_batches: int | float
    during: str  # "training", "the validation" or "the end of the epoch"


class Preemption(Callback):
    """Save ``<dirpath>/last.ckpt`` when Lightning stops the run at SIGTERM; stamp every
    checkpoint with ``run_config`` (see :func:`run_config_text`).

    ``saved`` is set once the state is saved; :func:`preempted_fault` turns it into the run's
    one-line message.
    """

    def __init__(self, dirpath: Path, run_config: str) -> None:
        self.dirpath = Path(dirpath)
        self.run_config = run_config
        self.saved: SavedAtSignal | None = None
        self._val_progress_before: dict[str, Any] | None = None

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.run_config
        if self._val_progress_before is not None:
            loops = checkpoint["loops"]["fit_loop"]
            loops["epoch_loop.val_loop.batch_progress"] = self._val_progress_before

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        connector = trainer._signal_connector
        if isinstance(connector, SignalConnector):
            connector.agree()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        loop = trainer.fit_loop.epoch_loop
        mid_validation = trainer.state.stage == RunningStage.VALIDATING
        if mid_validation:
            self._val_progress_before = _validation_not_started(loop.val_loop.batch_progress)
            during = "the validation"
        elif loop.batch_progress.current.completed >= trainer.num_training_batches:
            during = "the end of the epoch"
        else:
            during = "training"
        path = self.dirpath / "last.ckpt"
        try:
            trainer.save_checkpoint(path)
        finally:
            self._val_progress_before = None
        self.saved = SavedAtSignal(
            path=path,
            global_step=trainer.global_step,
            epoch=trainer.fit_loop.epoch_progress.current.started - 1,  # the one being run
            batch=loop.batch_progress.current.completed,
            num_batches=trainer.num_training_batches,
            during=during,
        )


class SignalConnector(_SignalConnector):
    """Lightning's signal connector with its two handlers kept free of collectives.

    Lightning's SIGTERM handler broadcasts from inside the handler, and its SLURM requeue
    handler saves a checkpoint there (a barrier): under data parallelism a signal lands in the
    middle of another collective (a metric's all-reduce, a barrier), the processes wait in
    different collectives, and the run hangs until it is killed (seen with 2 gloo processes).
    Here the handlers only note the signal (and forward SIGTERM to the processes this one
    launched, as Lightning's does; the requeue handler calls ``scontrol requeue`` and saves
    nothing: SLURM's SIGTERM that follows saves the exact state). The processes agree on it
    after each training batch (:meth:`agree`, one all-reduce), and
    ``received_sigterm``, which the loops read, is that agreed value: every process stops at
    the same point.
    """

    def __init__(self, trainer: Trainer) -> None:
        self._noted = False  # this process received SIGTERM
        self._agreed = False  # some process did, as all of them know (after agree())
        super().__init__(trainer)

    @property  # type: ignore[override]
    def received_sigterm(self) -> bool:
        return self._agreed if self.trainer.world_size > 1 else self._noted

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:  # Lightning resets it at each fit/test
        self._noted = self._agreed = bool(value)

    def agree(self) -> None:
        """Share whether any process received SIGTERM (a collective: every process calls it)."""
        if self.trainer.world_size > 1:
            noted = torch.tensor([float(self._noted)], device=self.trainer.strategy.root_device)
            torch.distributed.all_reduce(noted, op=torch.distributed.ReduceOp.MAX)
            self._agreed = bool(noted.item())

    def _sigterm_notifier_fn(self, signum: Any, _: Any) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if not self._noted and self.trainer.strategy.launcher is not None:
            self.trainer.strategy.launcher.kill(signum)
        self._noted = True

    def _slurm_sigusr_handler_fn(self, signum: Any, _: Any) -> None:
        rank_zero_info(f"Handling auto-requeue signal: {signum}")
        if not self.trainer.is_global_zero:
            return
        array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = (
            f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            if array_job is not None
            else os.environ["SLURM_JOB_ID"]
        )
        try:
            status = subprocess.call(["scontrol", "requeue", job])
        except FileNotFoundError:
            status = None
        if status == 0:
            log.info("Requeued SLURM job %s; its SIGTERM saves the state of the step", job)
        else:
            log.warning("Requeuing SLURM job %s failed (scontrol: %s)", job, status)


def install_signal_connector(trainer: Trainer) -> None:
    """Give ``trainer`` the :class:`SignalConnector` (before fit: it registers the handlers)."""
    if type(trainer._signal_connector) is _SignalConnector:
        trainer._signal_connector = SignalConnector(trainer)


def _validation_not_started(progress: Any) -> dict[str, Any]:
    """The validation loop's progress as if its first batch had started and not finished:
    what Lightning's restart reads as "restarted mid-evaluation" with nothing of it done, so
    that the whole validation runs again (its counters of earlier validations in the epoch
    kept)."""
    state = progress.state_dict()
    before = state["total"]["completed"] - state["current"]["completed"]
    state["total"] = {"ready": before + 1, "started": before + 1, "processed": before}
    state["total"]["completed"] = before
    state["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
    state["is_last_batch"] = False
    return state


def preempted_fault(saved: SavedAtSignal | None, output_dir: Path, stage: str) -> RunFault:
    """The one-line fault of a run stopped by SIGTERM (exit status 143)."""
    if saved is None:
        return RunFault(
            f"stopped by SIGTERM while {stage}: training had finished and "
            f"{output_dir / 'checkpoints' / 'last.ckpt'} holds its final state; run the same "
            "command again to test it (metrics.json is written then)",
            exit_status=EXIT_PREEMPTED,
            every_process=True,
        )
    where = f"batch {saved.batch} of {saved.num_batches}"
    if saved.during != "training":
        where += f", at {saved.during}"
    return RunFault(
        f"stopped by SIGTERM at step {saved.global_step} (epoch {saved.epoch}, {where}); the "
        f"state of that step is saved in {saved.path}; to go on, run the same command again "
        f"in {output_dir} (a requeued SLURM job does so by itself), or resume it with "
        f"ckpt_path={saved.path}",
        exit_status=EXIT_PREEMPTED,
        every_process=True,
    )


def requeue_signal(launcher: Any) -> signal.Signals:
    """The signal SLURM sends ahead of the time limit, as the ``slurm`` launcher asks for it
    (``additional_parameters.signal``: ``[B:]USR1@<seconds>``); SIGUSR1 (Lightning's default)
    when no launcher says.

    Example:
        >>> requeue_signal({"additional_parameters": {"signal": "USR1@120"}}).name
        'SIGUSR1'
    """
    parameters = (launcher or {}).get("additional_parameters") or {}
    spec = str(parameters.get("signal", "USR1")).split("@")[0].split(":")[-1].upper()
    name = spec if spec.startswith("SIG") else f"SIG{spec}"
    try:
        return signal.Signals[name]
    except KeyError:
        raise RunFault(
            f"hydra.launcher.additional_parameters.signal={parameters.get('signal')!r} names no "
            "signal: use USR1@<seconds>"
        ) from None


def slurm_environment(launcher: Any) -> SLURMEnvironment | None:
    """Lightning's SLURM environment with auto-requeue on the launcher's signal, inside a SLURM
    batch job (not an interactive one: Lightning's own test); None elsewhere."""
    if not SLURMEnvironment.detect():
        return None
    return SLURMEnvironment(auto_requeue=True, requeue_signal=requeue_signal(launcher))


def stopped_by_sigterm(error: BaseException) -> bool:
    """Whether ``error`` is Lightning's stop at SIGTERM."""
    return isinstance(error, SIGTERMException)
