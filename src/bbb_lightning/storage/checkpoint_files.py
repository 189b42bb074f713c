"""Whether a file is an intact checkpoint, and the newest intact one of a run.

``torch.save`` writes a zip archive whose directory sits at its end: a zero-byte file, random
bytes and a file cut off by a full disk are no zip archive at all, and ``torch.load`` reports
them with a misleading ``mmap can only be used with files saved with ...``. They are named for
what they are here, before torch reads them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_problem", "describe_intact_alternative", "newest_intact_checkpoint"]


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is no checkpoint to load (None: it is one).

    ``not a checkpoint (empty)``, ``not a checkpoint (not a zip archive)`` (random bytes, or a
    file cut off while it was written), ``not a readable checkpoint (<torch's reason>)`` or
    ``no state_dict in the file`` (a zip archive of something else).

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".ckpt") as file:
        ...     checkpoint_problem(Path(file.name))
        'not a checkpoint (empty)'
    """
    state = _load(path)
    return state if isinstance(state, str) else None


def _load(path: Path) -> dict[str, Any] | str:
    """The checkpoint in ``path`` (memory-mapped, so its tensors are not read), or the problem."""
    try:
        size = path.stat().st_size
    except OSError as error:
        return f"not readable ({error.strerror})"
    if size == 0:
        return "not a checkpoint (empty)"
    if not zipfile.is_zipfile(path):
        return f"not a checkpoint (not a zip archive: {size} bytes of something else, or cut off)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:  # torch raises several types for a damaged archive
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"not a readable checkpoint ({reason})"
    if not isinstance(state, dict) or "state_dict" not in state:
        return "no state_dict in the file"
    return state


def newest_intact_checkpoint(folder: Path, exclude: Path | None = None) -> tuple[Path, int] | None:
    """The intact ``*.ckpt`` in ``folder`` with the most training steps, and that step; ties go
    to the file written last. ``exclude``: a file to leave out (the damaged one)."""
    found: list[tuple[int, float, Path]] = []
    for path in folder.glob("*.ckpt") if folder.is_dir() else ():
        if exclude is not None and path.resolve() == Path(exclude).resolve():
            continue
        state = _load(path)
        if not isinstance(state, str):
            found.append((int(state.get("global_step", -1)), path.stat().st_mtime, path))
    if not found:
        return None
    step, _, path = max(found)
    return path, step


def describe_intact_alternative(damaged: Path) -> str:
    """``'the newest intact checkpoint beside it is <path> (step N): use that one'``, or that
    there is none, for the folder of a damaged checkpoint."""
    newest = newest_intact_checkpoint(damaged.parent, exclude=damaged)
    if newest is None:
        return f"no intact checkpoint in {damaged.parent}"
    path, step = newest
    return f"the newest intact checkpoint beside it is {path} (step {step}): use that one"
