"""Tabular data from a CSV file with a header row, read with the standard ``csv`` module."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from bbb_lightning.data.base import TASKS, BBBDataModule

__all__ = ["CSVDataModule", "Table", "column_stats", "numeric_columns", "read_table"]


class CSVDataModule(BBBDataModule):
    """Numeric feature columns and one target column of a CSV file, split at random.

    The file is read when the datamodule is built, so every attribute is available at once.
    Rows are split by a permutation drawn from ``seed`` into test (``test_fraction``),
    validation (``val_fraction``) and training (the rest); every split keeps at least one row.

    For classification the target values, strings or integers, become class indices in the
    order of :attr:`classes`: the sorted unique labels (numerically sorted when all of them
    are integers). For regression the target must be numeric.

    With ``standardize``, features (and regression targets) are shifted and scaled by the mean
    and standard deviation of the training split only (a constant column keeps scale 1);
    :attr:`target_mean` and :attr:`target_std` map standardized predictions back.

    Args:
        path: The CSV file; its first row names the columns.
        target: Name of the target column.
        task: ``"classification"`` or ``"regression"``.
        features: Feature columns, in order; ``None`` takes every column except ``target``.
        standardize: Standardize features and regression targets with training statistics.
        val_fraction: Fraction of rows for validation, in ``(0, 1)``.
        test_fraction: Fraction of rows for testing, in ``(0, 1)``.
        batch_size, num_workers, seed, pin_memory: See :class:`BBBDataModule`.

    Attributes:
        features: The feature column names.
        classes: The labels behind the class indices (classification), else ``None``.
        feature_mean, feature_std: Per-feature shift and scale (0 and 1 without ``standardize``).
        target_mean, target_std: Shift and scale of the regression target (likewise); ``None``
            for classification.
    """

    def __init__(
        self,
        path: str | Path,
        target: str,
        task: str = "classification",
        features: Sequence[str] | None = None,
        standardize: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
            if not (number and 0 < fraction < 1):
                raise ValueError(f"dataset {name} must be a number in (0, 1), got {fraction!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}"
            )
        self.path = Path(path)
        self.task = task
        self.target = target
        self.standardize = standardize

        table = read_table(self.path)
        header, rows = table.columns, table.rows
        self.features = _select_features(self.path, header, target, features)
        self.input_shape = (len(self.features),)
        x = numeric_columns(self.path, table, self.features)
        train_idx, val_idx, test_idx = self._split(len(rows), val_fraction, test_fraction)
        self.feature_mean, self.feature_std = column_stats(x[train_idx], standardize)
        x = (x - self.feature_mean) / self.feature_std

        self.classes: list[str] | list[int] | None = None
        self.target_mean: Tensor | None = None
        self.target_std: Tensor | None = None
        if task == "classification":
            target_position = header.index(target)
            labels = [(line, row[target_position]) for line, row in rows]
            _check_labels(self.path, target, labels)
            self.classes, y = _encode_labels([label for _, label in labels])
            self.num_classes = len(self.classes)
        else:
            y = numeric_columns(self.path, table, [target])
            self.target_dim = 1
            self.target_mean, self.target_std = column_stats(y[train_idx], standardize)
            y = (y - self.target_mean) / self.target_std
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])
        self.test_set = TensorDataset(x[test_idx], y[test_idx])

    def _split(
        self, n: int, val_fraction: float, test_fraction: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        num_val = max(1, round(n * val_fraction))
        num_test = max(1, round(n * test_fraction))
        if n - num_val - num_test < 1:
            raise ValueError(
                f"{self.path} has {n} data rows, too few for training, validation and test splits"
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return order[num_val + num_test :], order[:num_val], order[num_val : num_val + num_test]


class Table(NamedTuple):
    """A CSV file's column names and its non-blank rows, each with its line number.

    ``has_header`` says whether the names come from a header row; without one they are the
    column numbers ``"1"``, ``"2"``, ...
    """

    columns: list[str]
    rows: list[tuple[int, list[str]]]
    has_header: bool


def read_table(path: Path, detect_header: bool = False) -> Table:
    """The table in ``path``, whose first row names the columns.

    With ``detect_header``, a first row whose fields are all numbers is data, not names (the
    form of an input file of numbers only). Every row must have as many fields as the first.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not UTF-8, is empty, repeats a column name, has no data rows
            or a row of another length; the message names the file and the line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CSV file not found: {path}")
    try:
        return _read_rows(path, detect_header)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None


def _is_number(field: str) -> bool:
    try:
        float(field)
    except ValueError:
        return False
    return True


def _read_rows(path: Path, detect_header: bool) -> Table:
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first column's name
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        lines = ((reader.line_num, row) for row in reader if any(field.strip() for field in row))
        line, first = next(lines, (0, []))
        if not first:
            raise ValueError(f"{path} is empty: expected a header row naming the columns")
        has_header = not (detect_header and all(_is_number(field) for field in first))
        rows = [] if has_header else [(line, first)]
        columns = [name.strip() for name in first] if has_header else []
        if len(set(columns)) != len(columns):
            raise ValueError(f"{path} has duplicate column names: {', '.join(columns)}")
        first_row = "the header has" if has_header else "the first row has"
        for line, row in lines:
            if len(row) != len(first):
                raise ValueError(f"{path} line {line}: {len(row)} fields, {first_row} {len(first)}")
            rows.append((line, row))
    if not rows:
        raise ValueError(f"{path} has a header but no data rows")
    if not has_header:
        columns = [str(number) for number in range(1, len(first) + 1)]
    return Table(columns, rows, has_header)


def _select_features(
    path: Path, header: list[str], target: str, features: Sequence[str] | None
) -> list[str]:
    available = ", ".join(header)
    if target not in header:
        raise ValueError(f"target column {target!r} not in {path}; available: {available}")
    if isinstance(features, str):  # dataset.features=age: one column, not the letters a, g, e
        features = [features]
    features = [name for name in header if name != target] if features is None else list(features)
    repeated = sorted({name for name in features if features.count(name) > 1})
    if repeated:
        raise ValueError(f"dataset.features names {', '.join(map(repr, repeated))} twice")
    if not features:
        raise ValueError(
            f"no feature column in {path}: the table needs one besides the target {target!r} "
            "(dataset.features)"
        )
    for name in features:
        if name == target:
            raise ValueError(f"feature column {name!r} is also the target column")
        if name not in header:
            raise ValueError(f"feature column {name!r} not in {path}; available: {available}")
    return features


_FLOAT32_MAX = torch.finfo(torch.float32).max


def numeric_columns(path: Path, table: Table, columns: Sequence[str]) -> Tensor:
    """The named columns as ``float32 (rows, columns)``; a non-finite value is an error."""
    positions = [table.columns.index(name) for name in columns]
    values = []
    for line, row in table.rows:
        parsed = []
        for name, position in zip(columns, positions, strict=True):
            try:
                value = float(row[position])
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise ValueError(
                    f"{path} line {line}, column {name!r}: expected a finite number, "
                    f"got {row[position]!r}"
                )
            if abs(value) > _FLOAT32_MAX:
                raise ValueError(
                    f"{path} line {line}, column {name!r}: {row[position]!r} does not fit "
                    f"float32 (|x| <= {_FLOAT32_MAX:.4g}); rescale the column"
                )
            parsed.append(value)
        values.append(parsed)
    return torch.tensor(values, dtype=torch.float32)


def _check_labels(path: Path, target: str, labels: list[tuple[int, str]]) -> None:
    """Class labels are present and not fractional numbers (a regression target read as
    classes would make every distinct value a class)."""
    for line, label in labels:
        value = label.strip()
        if value == "" or value.lower() == "nan":
            raise ValueError(
                f"{path} line {line}, column {target!r}: missing class label {label!r}"
            )
        try:
            number = float(value)
        except ValueError:
            continue
        if not number.is_integer():
            raise ValueError(
                f"{path} line {line}, column {target!r}: {label!r} is not a class label; for a "
                "numeric target use dataset.task=regression likelihood=gaussian"
            )


def _encode_labels(values: list[str]) -> tuple[list[str] | list[int], Tensor]:
    """Sorted unique labels and the ``int64`` index of each value among them."""
    labels = [value.strip() for value in values]
    try:  # integers, also written as floats: "2" and "2.0" are one class, 2 (sorted as numbers)
        numeric = [int(float(label)) for label in labels]
    except ValueError:
        classes: list[str] | list[int] = sorted(set(labels))
        keys: list[str] | list[int] = labels
    else:
        classes, keys = sorted(set(numeric)), numeric
    index = {label: i for i, label in enumerate(classes)}
    return classes, torch.tensor([index[key] for key in keys], dtype=torch.int64)


def column_stats(values: Tensor, standardize: bool) -> tuple[Tensor, Tensor]:
    """Per-column mean and standard deviation (0 and 1 when not standardizing)."""
    if not standardize:
        width = values.shape[1:]
        return torch.zeros(width), torch.ones(width)
    std = values.std(dim=0, correction=0)
    return values.mean(dim=0), torch.where(std > 0, std, torch.ones_like(std))
