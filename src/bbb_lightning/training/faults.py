"""Faults a cluster deals out, reported as one line: the error type and the exit statuses.

A :class:`RunFault` is no mistake of the user's (a full disk, a second run in the same
directory, a lost data-parallel process, preemption): ``exit_on_user_error`` logs its message
as one line, like a user error, and exits with its ``exit_status``:

- 1: the run failed (a full disk, a busy or read-only directory, a lost process);
- 143 (128 + SIGTERM): the run was stopped by SIGTERM after saving its state; resume it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

__all__ = ["EXIT_PREEMPTED", "RunFault", "check_writable", "describe_free_space"]

EXIT_PREEMPTED = 143


class RunFault(Exception):
    """A fault of the machine or the cluster, not of the config: one line, then ``exit_status``."""

    def __init__(self, message: str, exit_status: int = 1, every_process: bool = False) -> None:
        """``every_process``: each process of a data-parallel run raises it (a SIGTERM reaches
        them all): the first process alone reports it."""
        super().__init__(message)
        self.exit_status = exit_status
        self.every_process = every_process


def describe_free_space(directory: Path) -> str:
    """``'1.2 GB free on the file system of <directory>'`` (or why that is unknown).

    Example:
        >>> describe_free_space(Path("/")).endswith("free on the file system of /")
        True
    """
    try:
        free = shutil.disk_usage(directory).free
    except OSError as error:
        return f"free space unknown ({error.strerror})"
    units = ("bytes", "KB", "MB", "GB", "TB")
    size, unit = float(free), 0
    while size >= 1000 and unit < len(units) - 1:
        size, unit = size / 1000, unit + 1
    shown = f"{free} bytes" if unit == 0 else f"{size:.1f} {units[unit]}"
    return f"{shown} free on the file system of {directory}"


def check_writable(directory: Path, what: str) -> None:
    """A :class:`RunFault` naming ``directory`` (and ``what`` sets it, e.g. ``hydra.run.dir``)
    unless files can be created in it: it, or its nearest existing parent when it does not exist
    yet, takes a probe file (created and removed at once). The probe is the real test: a
    read-only mount, missing permissions and (for root) permission bits all decide it."""
    target = Path(directory).absolute()
    existing = next((folder for folder in (target, *target.parents) if folder.exists()), None)
    if existing is None or not existing.is_dir():
        raise RunFault(
            f"output directory {str(target)!r} cannot be created: {existing} is not a directory; "
            f"choose another {what}"
        )
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".bbb-write-probe-"):
            pass
    except OSError as error:
        where = "it" if existing == target else f"its parent {existing}"
        raise RunFault(
            f"output directory {str(target)!r} is not writable ({where}: "
            f"{error.strerror or type(error).__name__}); choose another {what}, or make "
            f"{existing} writable"
        ) from None
