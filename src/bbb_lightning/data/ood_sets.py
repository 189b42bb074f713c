"""The test images of another dataset, for out-of-distribution evaluation: where they are,
downloading them, reading them as raw pixels.

- IDX sets (FashionMNIST, or any set of 28 x 28 grey images in MNIST's format): the file
  ``t10k-images-idx3-ubyte`` (or ``.gz``) in ``path``, ``path/raw``, or torchvision's root
  layout ``path/<Folder>/raw`` (``path/FashionMNIST/raw``). A set of :data:`IDX_SETS` missing
  there is downloaded (``download``) into ``path/raw``, its ``.gz`` checked against the md5
  published with it; another name is read from a local copy only.
- CIFAR-10 / CIFAR-100: the test batch of the python-pickle copy in ``path``, in any layout of
  :mod:`bbb_lightning.data.pickle_batches` (the training batches need not be there), the
  archive downloaded and md5-checked as that module does.

Nothing is normalised here: the caller normalises the pixels as its own training data.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from bbb_lightning.data.idx import read_idx
from bbb_lightning.data.pickle_batches import CIFAR_SETS, download_archive, find_copy, read_batches

__all__ = ["IDX_SETS", "IDX_TEST_IMAGES", "IdxSet", "cifar_test_images", "idx_test_images"]

IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
_DOWNLOAD_ERRORS = (OSError, EOFError, zlib.error, http.client.HTTPException)


@dataclass(frozen=True)
class IdxSet:
    """An IDX dataset that can be downloaded: its torchvision folder, mirrors and the md5 of
    its gzipped test images as published."""

    title: str
    folder: str
    mirrors: tuple[str, ...]
    md5: str  # of t10k-images-idx3-ubyte.gz


IDX_SETS = {
    "fashion_mnist": IdxSet(
        title="FashionMNIST",
        folder="FashionMNIST",
        mirrors=(
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        md5="bef4ecab320f06d8554ea6380940ec79",
    ),
}


def _folders(root: Path, spec: IdxSet | None) -> list[Path]:
    folders = [root, root / "raw"]
    if spec is not None:
        folders += [root / spec.folder, root / spec.folder / "raw"]
    return folders


def _find_idx(root: Path, spec: IdxSet | None) -> Path | None:
    for folder in _folders(root, spec):
        for name in (IDX_TEST_IMAGES, f"{IDX_TEST_IMAGES}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _download_idx(root: Path, spec: IdxSet) -> Path:
    """``t10k-images-idx3-ubyte.gz`` from the first mirror that serves it with the published
    md5, written atomically into ``root/raw``; OSError naming every failure otherwise."""
    failures = []
    for mirror in spec.mirrors:
        url = f"{mirror}{IDX_TEST_IMAGES}.gz"
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
            gzip.decompress(payload)
        except _DOWNLOAD_ERRORS as err:
            failures.append(f"{url}: {err}")
            continue
        digest = hashlib.md5(payload, usedforsecurity=False).hexdigest()
        if digest != spec.md5:
            failures.append(f"{url}: md5 {digest} != {spec.md5}")
            continue
        raw_dir = root / "raw"
        raw_dir.mkdir(parents=True, exist_ok=True)
        target = raw_dir / f"{IDX_TEST_IMAGES}.gz"
        with tempfile.NamedTemporaryFile(dir=raw_dir, suffix=".part", delete=False) as tmp:
            try:
                tmp.write(payload)
            except OSError:  # a full disk: no partial file left behind
                tmp.close()
                os.unlink(tmp.name)
                raise
        os.replace(tmp.name, target)
        return target
    raise OSError("download failed: " + "; ".join(failures))


def idx_test_images(path: str | Path, name: str, download: bool) -> Tensor:
    """The ``uint8 (N, H, W)`` test images of the IDX set ``name`` found in (or downloaded
    into) ``path``.

    Raises:
        FileNotFoundError: no copy, and no download (``download`` false, ``name`` not in
            :data:`IDX_SETS`, or every mirror failed): one line naming the places looked in.
        ValueError: the file is not an IDX file of images.
    """
    root = Path(path).expanduser()
    spec = IDX_SETS.get(name)
    found, reason = _find_idx(root, spec), ""
    if found is None:
        if spec is None:
            reason = f"no download for {name!r} (known: {', '.join(IDX_SETS)})"
        elif not download:
            reason = "ood.download=false"
        else:
            try:
                found = _download_idx(root, spec)
            except OSError as err:
                reason = str(err)
    if found is None:
        places = ", ".join(str(folder) for folder in _folders(root, spec))
        raise FileNotFoundError(
            f"ood.path={str(path)!r}: no {IDX_TEST_IMAGES}[.gz] in {places}; {reason}. Point "
            "ood.path at a local copy"
        )
    images = read_idx(found)
    if images.ndim != 3:
        raise ValueError(
            f"{found}: an IDX file of shape {tuple(images.shape)}, expected test images (N, H, W)"
        )
    return images


def cifar_test_images(path: str | Path, name: str, download: bool) -> Tensor:
    """The ``uint8 (N, 3, 32, 32)`` test images of CIFAR set ``name`` (``cifar10`` or
    ``cifar100``) found in (or downloaded into) ``path``.

    Raises:
        FileNotFoundError: no copy, and ``download`` false or the download failed.
        ValueError: a batch file is corrupt or not in the CIFAR format.
    """
    spec = replace(CIFAR_SETS[name], train=())  # a copy with the test batch alone will do
    copy, reason = find_copy(path, spec), "ood.download=false"
    if copy is None and download:
        try:
            copy = download_archive(path, spec)
        except OSError as err:
            reason = f"download failed: {err}"
    if copy is None:
        raise FileNotFoundError(
            f"ood.path={str(path)!r}: no {spec.title} copy, expected {spec.layouts(Path(path))}; "
            f"{reason}. Point ood.path at a local copy"
        )
    images, _ = read_batches(copy, spec, spec.test)
    return images
