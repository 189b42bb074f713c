"""MNIST from the four original IDX files, decoded once into memory."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import tempfile
import urllib.request
import zlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from bbb_lightning.data.base import BBBDataModule
from bbb_lightning.data.idx import read_idx

__all__ = ["MIRRORS", "NORMALIZATIONS", "MNISTDataModule"]

MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

# MD5 of the uncompressed IDX files.
_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# (offset, scale) applied to the raw pixel values 0..255 as (x - offset) / scale.
NORMALIZATIONS: dict[str, tuple[float, float]] = {
    "standard": (0.1307 * 255, 0.3081 * 255),  # (x/255 - mean) / std of the training pixels
    "blundell": (0.0, 126.0),  # Blundell et al. (2015): pixel values divided by 126
    "none": (0.0, 255.0),  # x/255, in [0, 1]
}

_MNIST_TRAIN_SIZE = 60_000
_DOWNLOAD_ERRORS = (OSError, EOFError, zlib.error, http.client.HTTPException)


class MNISTDataModule(BBBDataModule):
    """MNIST digits: images ``float32 (B, 1, 28, 28)``, labels ``int64`` in ``0..9``.

    The 60,000 training images are split by a permutation drawn from ``seed`` into
    ``60000 - val_size`` training and ``val_size`` validation images (Blundell et al. use
    50,000 / 10,000, the default). The validation set is never empty: ``val_size >= 1``.
    The test set is the 10,000 ``t10k`` images.

    The files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte`` are looked up in ``data_dir``, ``data_dir/raw`` and
    ``data_dir/MNIST/raw`` (what ``torchvision.datasets.MNIST(data_dir)`` leaves), each either
    uncompressed or gzipped (``.gz``). :meth:`prepare_data` downloads missing ones into
    ``data_dir/raw`` when ``download`` is true.

    Args:
        data_dir: Directory holding the IDX files (or their ``raw/`` subdirectory, or
            torchvision's ``MNIST/raw/``).
        batch_size, num_workers, seed, pin_memory: See :class:`BBBDataModule`.
        val_size: Training images held out for validation, ``>= 1``.
        normalization: ``"standard"`` (``(x/255 - 0.1307) / 0.3081``), ``"blundell"``
            (``x/126``) or ``"none"`` (``x/255``).
        download: Download missing files from :data:`MIRRORS` in :meth:`prepare_data`.
        limit_train: Keep only the first ``limit_train`` examples of the training split (for
            quick runs); ``None`` keeps all.
    """

    task = "classification"
    input_shape = (1, 28, 28)
    num_classes = 10

    def __init__(
        self,
        data_dir: str | Path = "data/MNIST",
        batch_size: int = 128,
        val_size: int = 10_000,
        normalization: str = "standard",
        download: bool = True,
        limit_train: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        is_int = isinstance(val_size, int) and not isinstance(val_size, bool)
        if not (is_int and 1 <= val_size < _MNIST_TRAIN_SIZE):
            raise ValueError(
                f"dataset val_size must be an integer in [1, {_MNIST_TRAIN_SIZE}), got {val_size!r}"
            )
        if normalization not in NORMALIZATIONS:
            allowed = ", ".join(NORMALIZATIONS)
            raise ValueError(f"unknown normalization {normalization!r}; allowed: {allowed}")
        if limit_train is not None and limit_train < 1:
            raise ValueError(f"limit_train must be >= 1 or None, got {limit_train}")
        self.data_dir = Path(data_dir)
        self.val_size = val_size
        self.normalization = normalization
        self.download = download
        self.limit_train = limit_train

    @property
    def num_train(self) -> int:
        """Number of training examples, known before :meth:`setup`."""
        if self.train_set is not None:
            return len(self.train_set)
        available = _MNIST_TRAIN_SIZE - self.val_size
        return available if self.limit_train is None else min(self.limit_train, available)

    def prepare_data(self) -> None:
        """Download the missing files into ``data_dir/raw`` if ``download`` is set.

        Raises:
            FileNotFoundError: Files are missing and ``download`` is false or every mirror fails.
        """
        missing = [name for name in _MD5 if self._find(name) is None]
        if missing and not self.download:
            raise FileNotFoundError(self._missing_message("download=False"))
        for name in missing:
            self._download(name)

    def setup(self, stage: str | None = None) -> None:
        """Decode the four files (once; later calls return at once) and split them."""
        if self.test_set is not None:
            return
        train_x, train_y = self._read("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
        test_x, test_y = self._read("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
        if self.val_size >= len(train_x):
            raise ValueError(
                f"val_size must be < {len(train_x)} (the training images), got {self.val_size}"
            )
        order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        if self.limit_train is not None:
            train_idx = train_idx[: self.limit_train]
        self.train_set = TensorDataset(self._normalize(train_x[train_idx]), train_y[train_idx])
        self.val_set = TensorDataset(self._normalize(train_x[val_idx]), train_y[val_idx])
        self.test_set = TensorDataset(self._normalize(test_x), test_y)

    def _find(self, name: str) -> Path | None:
        for folder in (self.data_dir, self.data_dir / "raw", self.data_dir / "MNIST" / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _read(self, images_name: str, labels_name: str) -> tuple[Tensor, Tensor]:
        images_path, labels_path = self._find(images_name), self._find(labels_name)
        if images_path is None or labels_path is None:
            hint = "run prepare_data() to download them" if self.download else "download=False"
            raise FileNotFoundError(self._missing_message(hint))
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.shape[1:] != (28, 28) or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"MNIST files {images_path} and {labels_path} do not match: image shape "
                f"{tuple(images.shape)}, label shape {tuple(labels.shape)}; "
                "expected (N, 28, 28) and (N,)"
            )
        labels = labels.long()
        if len(labels) and not bool(((labels >= 0) & (labels <= 9)).all()):
            bad = int(labels[(labels < 0) | (labels > 9)][0])
            raise ValueError(f"corrupt MNIST labels in {labels_path}: label {bad} outside 0..9")
        return images, labels

    def _normalize(self, images: Tensor) -> Tensor:
        """``uint8 (N, 28, 28)`` pixels to normalized ``float32 (N, 1, 28, 28)``."""
        offset, scale = NORMALIZATIONS[self.normalization]
        return ((images.float() - offset) / scale).unsqueeze(1)

    def _download(self, name: str) -> None:
        raw_dir = self.data_dir / "raw"
        failures = []
        for mirror in MIRRORS:
            url = f"{mirror}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    payload = response.read()
                digest = hashlib.md5(gzip.decompress(payload), usedforsecurity=False).hexdigest()
            except _DOWNLOAD_ERRORS as err:
                failures.append(f"{url}: {err}")
                continue
            if digest != _MD5[name]:
                failures.append(f"{url}: md5 {digest} != {_MD5[name]}")
                continue
            raw_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=raw_dir, suffix=".part", delete=False) as tmp:
                tmp.write(payload)
            os.replace(tmp.name, raw_dir / f"{name}.gz")
            return
        reason = "download failed: " + "; ".join(failures)
        raise FileNotFoundError(self._missing_message(reason))

    def _missing_message(self, reason: str) -> str:
        expected = ", ".join(_MD5)
        return (
            f"MNIST not found in {self.data_dir} (or its raw/ or MNIST/raw/): expected {expected} "
            f"(optionally .gz); {reason}. Set dataset.data_dir=... (evaluate: data_dir=...) to "
            "a local copy"
        )
