"""One run per directory at a time: a lock taken before anything is written there.

The lock is a POSIX record lock (``fcntl.lockf``, which NFS carries between hosts) on
``<directory>/.run.lock``, a file that records the holder: its pid, host, start time and
command line. The kernel drops the lock when its process ends, however it ends (SIGKILL
included), so a lock file left by a dead process is stale and simply taken over. A process
that finds the lock held stops with one line naming the directory and the other process.

The holder removes the file when it is done (at the end of ``train``, or when the process
exits); a process that opened the file just before it was removed finds the file gone (or
another file under that name) once it holds its lock, and starts again.

Only the process that launches a run takes its lock: the other processes of a data-parallel
run (Lightning's ``LOCAL_RANK``/``NODE_RANK``, SLURM's ``SLURM_PROCID``, torchrun's ``RANK``
other than 0) join the run of the one that holds it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..training.faults import RunFault

log = logging.getLogger(__name__)

__all__ = ["LOCK_NAME", "acquire_run_lock", "is_launching_process", "release_run_lock", "run_lock"]

LOCK_NAME = ".run.lock"
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")

# the directories this process holds -> the lock file's descriptor, whether the lock created it
_held: dict[Path, tuple[int, bool]] = {}


def is_launching_process() -> bool:
    """Whether this process launches the run (every rank variable that is set is 0)."""
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


def acquire_run_lock(directory: Path, what: str) -> bool:
    """Create ``directory`` if needed and lock it for this process.

    ``what`` names the setting that chose the directory (``hydra.run.dir``), for the message.
    Returns True when this call took the lock, False when this process held it already (or
    is not the launching process: see :func:`is_launching_process`).

    Raises:
        RunFault: another process holds the lock.
    """
    directory = Path(directory).absolute()
    if directory in _held or not is_launching_process():
        return False
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_holder(descriptor)
            os.close(descriptor)
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            raise RunFault(
                f"output directory {str(directory)!r} is in use by another run ({holder}); wait "
                f"for it to end, or choose another {what}"
            ) from None
        try:
            same_file = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(descriptor)  # its holder removed it after we opened it: open the new one
    stale = _read_holder(descriptor, default="")
    if stale:
        log.info("Took over the lock of %s, which has ended", stale)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(sys.argv)[:200],
    }
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, (json.dumps(record) + "\n").encode(), 0)
    _held[directory] = descriptor, created
    return True


def release_run_lock(directory: Path) -> None:
    """Remove this process's lock file of ``directory`` and drop the lock (nothing if not held);
    a directory that taking the lock created and that is still empty is removed too."""
    directory = Path(directory).absolute()
    descriptor, created = _held.pop(directory, (None, False))
    if descriptor is None:
        return
    (directory / LOCK_NAME).unlink(missing_ok=True)
    os.close(descriptor)
    if created and not any(directory.iterdir()):
        directory.rmdir()


@contextmanager
def run_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold the lock of ``directory`` within the block; release it after, if this block took it."""
    acquired = acquire_run_lock(directory, what)
    try:
        yield
    finally:
        if acquired:
            release_run_lock(directory)


@atexit.register
def _release_all() -> None:
    for directory in list(_held):
        release_run_lock(directory)


def _read_holder(descriptor: int, default: str = "a process that is starting") -> str:
    """The holder recorded in a lock file: ``pid 123 on host h, started ...: <command>``."""
    try:
        record = json.loads(os.pread(descriptor, 65536, 0).decode() or "null")
        return (
            f"pid {record['pid']} on host {record['host']}, started {record['started']}: "
            f"{record['command']}"
        )
    except (OSError, ValueError, TypeError, KeyError):
        return default
