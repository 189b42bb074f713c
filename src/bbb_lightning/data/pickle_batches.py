"""The python-pickle batches of CIFAR-10 and CIFAR-100: where they are, reading, downloading.

Each batch file is a pickled ``dict`` whose ``data`` is a ``uint8`` array ``(N, 3072)`` (the
1024 red, then green, then blue pixels of a 32 x 32 image, row-major) and whose ``labels``
(CIFAR-10) or ``fine_labels`` (CIFAR-100) is a list of N class indices. Keys are ``bytes`` (the
files were written by Python 2) or ``str``. The files are read with an unpickler that builds
only plain containers and numpy arrays: a file that asks for anything else is refused.

A copy is found in ``data_dir`` in any of the layouts in which it is distributed:

1. ``data_dir`` is the archive ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``);
2. ``data_dir/cifar-10-batches-py/`` (``cifar-100-python/``) holds the batch files, as
   torchvision's ``root`` does;
3. ``data_dir`` holds the batch files itself;
4. ``data_dir/cifar-10-python.tar.gz`` (read from the archive, not extracted).
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import pickle
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CIFAR_SETS",
    "CifarSet",
    "download_archive",
    "find_copy",
    "read_batches",
    "read_class_names",
]

_DOWNLOAD_ERRORS = (OSError, EOFError, zlib.error, http.client.HTTPException)
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how Python 3's protocol 2 writes bytes (latin-1 text to bytes)
}


@dataclass(frozen=True)
class CifarSet:
    """One CIFAR dataset: its archive, folder, batch files and label keys."""

    title: str
    url: str
    md5: str  # of the archive, as published with it
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def archive(self) -> str:
        return self.url.rsplit("/", 1)[1]

    def layouts(self, data_dir: Path) -> str:
        """The accepted layouts under ``data_dir``, for error messages (one line)."""
        files = ", ".join((*self.train, *self.test))
        return (
            f"{data_dir}/{self.folder}/ or {data_dir}/ holding {files}, or "
            f"{data_dir}/{self.archive} (or data_dir set to that archive)"
        )


CIFAR_SETS = {
    "cifar10": CifarSet(
        title="CIFAR-10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        meta="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarSet(
        title="CIFAR-100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train=("train",),
        test=("test",),
        meta="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}


class _ArraysOnly(pickle.Unpickler):
    """Builds dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(stream: IO[bytes], where: str) -> dict[str, Any]:
    try:
        content = _ArraysOnly(stream, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zlib.error, OSError) as err:
        raise ValueError(f"corrupt CIFAR batch {where}: {err}") from None
    if not isinstance(content, dict):
        raise ValueError(f"corrupt CIFAR batch {where}: a {type(content).__name__}, not a dict")
    return {
        key.decode() if isinstance(key, bytes) else key: value for key, value in content.items()
    }


def find_copy(data_dir: str | Path, spec: CifarSet) -> Path | None:
    """The folder holding ``spec``'s batch files, or its archive, found in ``data_dir``."""
    root = Path(data_dir).expanduser()
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz")):
        return root
    for folder in (root / spec.folder, root):
        if all((folder / name).is_file() for name in (*spec.train, *spec.test)):
            return folder
    archive = root / spec.archive
    return archive if archive.is_file() else None


def read_batches(copy: Path, spec: CifarSet, names: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    """The images ``uint8 (N, 3, 32, 32)`` and labels ``int64 (N,)`` of the batch files
    ``names`` (in that order) of the copy at ``copy`` (a folder or an archive).

    Raises:
        ValueError: a file is missing from an archive, corrupt, or not in the CIFAR format.
    """
    contents = []
    if copy.is_dir():
        for name in names:
            with open(copy / name, "rb") as stream:
                contents.append((str(copy / name), _unpickle(stream, str(copy / name))))
    else:
        contents = _read_archive(copy, names)
    images, labels = [], []
    for where, content in contents:
        x, y = _arrays(content, spec, where)
        images.append(x)
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def read_class_names(copy: Path, spec: CifarSet) -> list[str] | None:
    """The class names in the copy's meta file, or None when it has none."""
    try:
        if copy.is_dir():
            if not (copy / spec.meta).is_file():
                return None
            with open(copy / spec.meta, "rb") as stream:
                meta = _unpickle(stream, str(copy / spec.meta))
        else:
            ((_, meta),) = _read_archive(copy, (spec.meta,))
    except ValueError:
        return None
    names = meta.get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        return None
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _read_archive(archive: Path, names: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    found: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = member.name.rsplit("/", 1)[-1]
                if name in names and member.isfile() and name not in found:
                    stream = tar.extractfile(member)
                    assert stream is not None
                    where = f"{archive}:{member.name}"
                    found[name] = _unpickle(io.BytesIO(stream.read()), where)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise ValueError(f"corrupt CIFAR archive {archive}: {err}") from None
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"CIFAR archive {archive} has no {', '.join(missing)}")
    return [(f"{archive}:{name}", found[name]) for name in names]


def _arrays(content: dict[str, Any], spec: CifarSet, where: str) -> tuple[Tensor, Tensor]:
    data, labels = content.get("data"), content.get(spec.label_key)
    if not isinstance(data, np.ndarray) or labels is None:
        raise ValueError(
            f"corrupt CIFAR batch {where}: expected keys 'data' (an array) and "
            f"'{spec.label_key}', found {sorted(map(str, content))}"
        )
    labels = np.asarray(labels)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"corrupt CIFAR batch {where}: data of {data.dtype} {data.shape}, expected uint8 "
            "(N, 3072)"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"corrupt CIFAR batch {where}: {len(data)} images but labels of shape "
            f"{labels.shape} ({labels.dtype})"
        )
    outside = (labels < 0) | (labels >= spec.num_classes)
    if outside.any():
        raise ValueError(
            f"corrupt CIFAR batch {where}: label {int(labels[outside][0])} outside "
            f"0..{spec.num_classes - 1}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.astype(np.int64))


def download_archive(data_dir: str | Path, spec: CifarSet) -> Path:
    """Download ``spec``'s archive into ``data_dir``, check its md5, return its path.

    Raises:
        OSError: the download failed or the md5 differs (nothing is left behind).
    """
    root = Path(data_dir).expanduser()
    digest = hashlib.md5(usedforsecurity=False)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=root, suffix=".part", delete=False) as tmp:
        try:
            with urllib.request.urlopen(spec.url, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    tmp.write(chunk)
        except _DOWNLOAD_ERRORS as err:
            tmp.close()
            os.unlink(tmp.name)
            raise OSError(f"{spec.url}: {err}") from None
    if digest.hexdigest() != spec.md5:
        os.unlink(tmp.name)
        raise OSError(f"{spec.url}: md5 {digest.hexdigest()} != {spec.md5}")
    target = root / spec.archive
    os.replace(tmp.name, target)
    return target
