"""Files written whole or not at all: checkpoints and ``metrics.json``.

Each file is written to a temporary file in its own directory (``.<name>.<random>.tmp``),
flushed to the disk (``fsync``), then renamed over the target with ``os.replace``, which POSIX
makes atomic within one file system: a reader sees the old file or the new one, never a part.
A write that fails (a full disk, a file-size limit, a lost mount) removes its temporary file,
keeps the earlier file of that name as it was, and raises a
:class:`~bbb_lightning.training.faults.RunFault`
naming the path and the free space. Lightning's own ``_atomic_save`` writes the finished bytes
straight onto the target, which a full disk leaves truncated.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ..training.faults import RunFault, describe_free_space

__all__ = ["AtomicCheckpointIO", "write_atomically", "write_text_atomically"]


def write_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    Raises:
        RunFault: the write failed (``No space left on device``, ``File too large``, ...); no
            temporary file is left and an earlier ``path`` is unchanged.
    """
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(
            dir=directory, prefix=f".{path.name}.", suffix=".tmp"
        )
    except OSError as error:
        raise _write_fault(path, error) from None
    try:
        os.fchmod(descriptor, 0o666 & ~_umask())  # mkstemp's 0600: make it an ordinary file
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_fault(path, error) from None
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), whole or not at all (:func:`write_atomically`)."""
    write_atomically(path, lambda file: file.write(text.encode("utf-8")))


def _umask() -> int:
    """The process's umask; read from /proc where it can be (setting it to read it back would
    change it for other threads for a moment)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_fault(path: Path, error: BaseException) -> RunFault:
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0] or type(error).__name__
    return RunFault(
        f"could not write {path} ({reason}); {describe_free_space(path.parent)}; no partial file "
        "was left and the files written before are intact; make room and resume the run with "
        "ckpt_path=<its checkpoints/last.ckpt>"
    )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` whose checkpoints are written by :func:`write_atomically`
    (``Trainer(plugins=[AtomicCheckpointIO()])``); loading and removing are Lightning's."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()  # torch.save into a file hides its OSError in a RuntimeError
        torch.save(checkpoint, buffer)
        write_atomically(Path(path), lambda file: file.write(buffer.getbuffer()))
