"""A lost data-parallel process: one line naming it and the last checkpoint, status 1, no hang.

When one process of a data-parallel run dies (SIGKILL, the OOM killer, a crash), the others
fail in their next collective with gloo's ``Connection reset by peer`` (a traceback of over a
hundred lines that never says which process died), and Lightning's child-process observer, which
polls the processes it launched every 5 s, SIGKILLs the launching process without a word.

:class:`ProcessWatch` learns every process's host and pid when training starts (one
``all_gather_object``). Afterwards:

- in the launching process (rank 0 of a node), a thread waits on each process it launched; when
  one ends with a non-zero status while the run goes on, it logs the one line at once, flushes
  the logs and TensorBoard, ends the other launched processes (as Lightning's observer would)
  and exits with status 1 before that observer acts (it could only SIGKILL the process, with
  no message and status 137);
- in any process, a collective that fails because a peer is gone becomes the same line
  (:meth:`ProcessWatch.fault`), naming the processes of this host found dead (``kill(pid, 0)``,
  a zombie counting as dead); those of other hosts cannot be checked and are named as such.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from ..storage.checkpoint_files import checkpoint_problem
from ..storage.run_lock import release_all_run_locks
from .faults import RunFault

log = logging.getLogger(__name__)

__all__ = ["ProcessWatch", "is_lost_peer_error"]

# what gloo's TCP transport says when the other end of a connection is gone
_LOST_PEER_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
)


def is_lost_peer_error(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process is gone.

    Example:
        >>> is_lost_peer_error(RuntimeError("[pair.cc:537] Read error: Connection reset by peer"))
        True
        >>> is_lost_peer_error(RuntimeError("CUDA out of memory"))
        False
    """
    distributed_error = getattr(torch.distributed, "DistError", ())
    if not isinstance(error, RuntimeError | ConnectionError) and not (
        distributed_error and isinstance(error, distributed_error)
    ):
        return False
    return any(marker in str(error) for marker in _LOST_PEER_MARKERS)


def _is_dead(pid: int) -> bool:
    """Whether process ``pid`` (of this host) has ended: gone, or a zombie not yet reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def _how_it_ended(returncode: int | None) -> str:
    if returncode is None:
        return "gone"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


class ProcessWatch(Callback):
    """Tell which data-parallel process was lost, in one line (see the module's docstring).

    Args:
        checkpoint_dir: where the run's ``last.ckpt`` is saved (named in the message).
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.peers: list[tuple[str, int]] = []  # (host, pid) of each global rank
        self.rank = 0
        self._trainer: Trainer | None = None
        self._launched: dict[int, subprocess.Popen] = {}  # global rank -> process started here
        self._done = threading.Event()
        self._reported = threading.Lock()

    # -- when training starts ----------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.world_size == 1 or self.peers:
            return
        peers: list[Any] = [None] * trainer.world_size
        torch.distributed.all_gather_object(peers, (socket.gethostname(), os.getpid()))
        self.peers = [(str(host), int(pid)) for host, pid in peers]
        self.rank = trainer.global_rank
        self._trainer = trainer
        first_of_node = trainer.global_rank - trainer.local_rank
        for local_rank, process in enumerate(getattr(trainer.strategy.launcher, "procs", []), 1):
            self._launched[first_of_node + local_rank] = process
            threading.Thread(
                target=self._wait_for,
                args=(first_of_node + local_rank, process),
                name=f"bbb-watch-rank-{first_of_node + local_rank}",
                daemon=True,
            ).start()

    def finish(self) -> None:
        """The run is over (done, or failing for a reason of its own): processes that end from
        now on are no loss to report."""
        self._done.set()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if not is_lost_peer_error(exception):
            self.finish()  # every process fails on its own (a non-finite loss, SIGTERM, ...)

    # -- the launching process: a launched process ended --------------------------------------
    def _wait_for(self, rank: int, process: subprocess.Popen) -> None:
        returncode = process.wait()
        if returncode == 0 or self._done.is_set() or not self._reported.acquire(blocking=False):
            return
        log.error("%s", self._message({rank}, ""))
        for handler in (*logging.getLogger().handlers, *log.handlers):
            handler.flush()
        self._flush_tensorboard()
        for other in self._launched.values():
            if other.poll() is None:
                other.kill()
        release_all_run_locks()
        os._exit(1)

    def _flush_tensorboard(self) -> None:
        for logger in getattr(self._trainer, "loggers", []):
            if isinstance(logger, TensorBoardLogger):
                # the run is being abandoned: a flush that fails changes nothing
                with contextlib.suppress(Exception):
                    logger.experiment.flush()

    # -- any process: a collective failed -----------------------------------------------------
    def fault(self, error: BaseException) -> RunFault:
        """The one-line fault for ``error`` (see :func:`is_lost_peer_error`). In the launching
        process, a watcher that already reports the loss exits the process meanwhile."""
        dead = {
            rank
            for rank, (host, pid) in enumerate(self.peers)
            if rank != self.rank and host == socket.gethostname() and _is_dead(pid)
        }
        if dead & self._launched.keys():
            time.sleep(10)  # that process's watcher reports the loss and exits this process
        if not self._reported.acquire(blocking=False):
            time.sleep(30)  # a watcher is reporting it and about to exit this process
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return RunFault(self._message(dead, reason))

    def _message(self, dead: set[int], reason: str) -> str:
        step = self._trainer.global_step if self._trainer is not None else 0
        here = socket.gethostname()
        elsewhere = sorted(r for r, (host, _) in enumerate(self.peers) if host != here)
        if dead:
            described = [self._describe(rank) for rank in sorted(dead)]
            lost = f"data-parallel process of {', '.join(described)} was lost at step {step}"
        elif elsewhere:
            hosts = sorted({self.peers[rank][0] for rank in elsewhere})
            lost = (
                f"lost contact with a data-parallel process at step {step} (those of rank "
                f"{', '.join(map(str, elsewhere))} on {', '.join(hosts)} cannot be checked from "
                f"here: see their logs; {reason})"
            )
        else:
            lost = f"lost contact with a data-parallel process at step {step} ({reason})"
        return f"{lost}; this process (rank {self.rank}) stops too; {self._last_checkpoint()}"

    def _describe(self, rank: int) -> str:
        host, pid = self.peers[rank]
        process = self._launched.get(rank)
        ended = _how_it_ended(process.poll() if process is not None else None)
        return f"rank {rank} (pid {pid} on {host}, {ended})"

    def _last_checkpoint(self) -> str:
        last = self.checkpoint_dir / "last.ckpt"
        if not last.is_file() or checkpoint_problem(last) is not None:
            return f"no checkpoint was saved yet ({last}): start the run again"
        step = torch.load(last, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        return f"the last checkpoint is {last} (step {step}): resume with ckpt_path={last}"
