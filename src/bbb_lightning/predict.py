"""Predict with a trained run: ``python -m bbb_lightning.predict ckpt_path=... input=x.npy``.

``predict(cfg)`` is a plain function of the composed config (``conf/predict.yaml``). It reads
the inputs (``.npy``, ``.npz`` (its first array), ``.pt`` (a tensor) or ``.csv`` (numbers, one
example per row, an optional header row; for a run trained on a CSV, a header's columns are
matched by name to the run's ``dataset.features``)), checks them against the model's input
shape (a flat row of the right size is reshaped), draws S = ``eval_samples`` posterior
samples and writes, per example:

- classification: ``probs`` (N, C) the predictive p̄ = (1/S) sum_s softmax(f_s),
  ``prediction`` its argmax (and, for a run trained on a CSV, ``label``: the class label
  behind it), ``entropy`` H[p̄] (total), ``expected_entropy`` (aleatoric),
  ``mutual_information`` (epistemic); with ``save_samples``, ``sample_probs`` (S, N, C);
- regression: ``mean``, ``epistemic_var``, ``aleatoric_var``, ``total_var`` (N, D); with
  ``save_samples``, ``sample_mean`` and ``sample_std`` (S, N, D).

The output format follows the suffix of ``output``: ``.pt`` (a dict of tensors), ``.npz``
(named arrays), ``.csv`` (a table with a header) or ``.npy`` (the same table as a 2-D float
array, columns as in the CSV header, logged). Samples do not fit a table: with ``.csv`` /
``.npy`` they go to ``<output stem>.samples.npz``.

Inputs are in the units the model was trained on (normalised MNIST pixels, standardised CSV
features); ``raw=true`` takes raw units instead (MNIST pixel values 0..255, the CSV's own
feature values) and maps standardised regression outputs back to the target's units.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from .cli.command_line import checked
from .cli.config_checks import integer_at_least, require_value
from .cli.errors import UserError, exit_on_user_error, user_errors
from .data.csv import numeric_columns, read_table
from .data.mnist import NORMALIZATIONS
from .evaluation.metrics import expected_entropy, predictive_entropy
from .storage.runs import load_model, resolve_checkpoint, resolve_device, sample_outputs
from .training.module import BayesByBackprop
from .training.objectives import GaussianLikelihood

log = logging.getLogger(__name__)

__all__ = [
    "INPUT_SUFFIXES",
    "OUTPUT_SUFFIXES",
    "check_input_range",
    "csv_header",
    "fit_input_shape",
    "main",
    "predict",
    "read_input",
]

INPUT_SUFFIXES = (".npy", ".npz", ".pt", ".csv")
OUTPUT_SUFFIXES = (".pt", ".npz", ".csv", ".npy")


# -- input ------------------------------------------------------------------------------------
def read_input(
    path: str | Path, features: Sequence[str] | None = None, target: str | None = None
) -> Tensor:
    """The array stored in ``path`` as float32; the format follows the suffix.

    A CSV's optional header row (a first row that is not all numbers) names its columns. Given
    ``features`` (the run's feature columns), such a file's columns are matched by name: the
    ``features`` are taken in their order, the ``target`` column is dropped silently, any other
    column with a log line; a missing feature column is a UserError. A CSV without a header
    (or without ``features``) is taken as it is, its columns in the order of the features.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     table = Path(folder) / "x.csv"
        ...     _ = table.write_text("b,y,a\\n2,0,1\\n4,0,3\\n")
        ...     read_input(table, features=["a", "b"], target="y")
        tensor([[1., 2.],
                [3., 4.]])
    """
    path = Path(path)
    if path.suffix not in INPUT_SUFFIXES:
        raise UserError(
            f"input={str(path)!r}: unknown suffix {path.suffix!r}; use one of {INPUT_SUFFIXES}"
        )
    if not path.is_file():
        raise UserError(f"input={str(path)!r}: no such file")
    try:
        if path.suffix == ".npy":
            values: Any = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                values = archive[archive.files[0]]
        elif path.suffix == ".pt":
            values = torch.load(path, map_location="cpu", weights_only=True)
        else:
            values = _read_csv(path, features, target)
        x = torch.as_tensor(np.asarray(values) if not isinstance(values, Tensor) else values)
        x = x.to(torch.float32)
    except UserError:
        raise
    except Exception as error:  # unreadable, or not an array of numbers
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        raise UserError(
            f"input={str(path)!r}: cannot read an array of numbers ({reason})"
        ) from error
    if not torch.isfinite(x).all():
        raise UserError(f"input={str(path)!r}: holds non-finite values (NaN or inf)")
    return x


def csv_header(path: str | Path) -> list[str] | None:
    """The column names of the CSV file ``path``, or ``None`` when it has no header row."""
    path = Path(path)
    if path.suffix != ".csv" or not path.is_file():
        return None
    try:
        table = read_table(path, detect_header=True)
    except (ValueError, OSError, csv.Error):  # read_input says what is wrong
        return None
    return table.columns if table.has_header else None


def _read_csv(
    path: Path, features: Sequence[str] | None = None, target: str | None = None
) -> Tensor:
    try:
        table = read_table(path, detect_header=True)
        columns = table.columns
        if table.has_header and features is not None:
            source = f"input={str(path)!r}"
            missing = [name for name in features if name not in columns]
            if missing:
                raise UserError(
                    f"{source}: no column {', '.join(repr(name) for name in missing)}; the run "
                    f"expects the feature columns {', '.join(features)} (in any order, by name)"
                )
            extra = [name for name in columns if name not in features and name != target]
            if extra:
                log.warning("%s: columns not among the run's features, ignored: %s", source, extra)
            columns = list(features)
        return numeric_columns(path, table, columns)
    except ValueError as error:  # the message names the file, the line and the column
        raise UserError(f"input: {error}") from error


def fit_input_shape(x: Tensor, input_shape: Sequence[int], source: str = "input") -> Tensor:
    """``x`` as a batch (N, *input_shape): exact, flat rows, or one unbatched example.

    Example:
        >>> fit_input_shape(torch.zeros(5, 784), (1, 28, 28)).shape
        torch.Size([5, 1, 28, 28])
        >>> fit_input_shape(torch.zeros(7), (1,)).shape
        torch.Size([7, 1])
    """
    shape = tuple(int(size) for size in input_shape)
    size = math.prod(shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if tuple(x.shape) == shape:
        return x.unsqueeze(0)
    if x.ndim == 1 and size == 1:
        return x.reshape(-1, *shape)
    if x.ndim >= 2 and math.prod(x.shape[1:]) == size:
        return x.reshape(x.shape[0], *shape)
    if x.numel() == size:  # one example, flat or without its channel dimension
        return x.reshape(1, *shape)
    expected = ", ".join(str(s) for s in shape)
    raise UserError(
        f"{source}: shape {tuple(x.shape)} does not fit the model: expected (N, {expected})"
        + (f" or (N, {size})" if len(shape) > 1 else "")
    )


# -- the run's data -----------------------------------------------------------------------------
class _RunData:
    """What predict needs of the training run's dataset, read only when needed."""

    def __init__(self, run_dir: Path) -> None:
        self.config_file = run_dir / ".hydra" / "config.yaml"
        self.config = OmegaConf.load(self.config_file) if self.config_file.is_file() else None
        self._datamodule: Any = None

    @property
    def dataset(self) -> DictConfig | None:
        return None if self.config is None else self.config.get("dataset")

    @property
    def is_csv(self) -> bool:
        return self.dataset is not None and "CSVDataModule" in str(self.dataset.get("_target_"))

    def datamodule(self) -> Any:
        """The run's datamodule, built once (for a CSV run this reads its training CSV)."""
        if self._datamodule is None:
            with user_errors():
                self._datamodule = instantiate(self.dataset)
        return self._datamodule

    def features(self, source: str) -> list[str]:
        """The run's CSV feature columns: ``dataset.features``, else its training CSV's columns
        except the target."""
        features = self.dataset.get("features")
        if features is not None:
            return [str(name) for name in features]
        try:
            header = read_table(Path(self.dataset.path)).columns
        except (OSError, ValueError, csv.Error):
            header = None
        if not header:
            raise UserError(
                f"{source} has a header row, but the run's feature columns are unknown: its "
                f"dataset.features is null and its training CSV {self.dataset.path!r} cannot be "
                "read; drop the header row to give the columns in the run's order"
            )
        return [name for name in header if name != self.dataset.target]

    def raw_transforms(self) -> tuple[Any, Any]:
        """Maps from raw input units to the model's, and from standardised targets back."""
        if self.dataset is None:
            raise UserError(f"raw=true needs the run's config {self.config_file}; it is missing")
        normalization = self.dataset.get("normalization")
        if normalization in NORMALIZATIONS:
            offset, scale = NORMALIZATIONS[normalization]
            return (lambda x: (x - offset) / scale), None
        if "ToyRegression" in str(self.dataset.get("_target_")):
            return None, None
        datamodule = self.datamodule()
        to_model = None
        if getattr(datamodule, "feature_mean", None) is not None:
            mean, std = datamodule.feature_mean, datamodule.feature_std
            to_model = lambda x: (x - mean.reshape(x.shape[1:])) / std.reshape(x.shape[1:])  # noqa: E731
        target_mean = getattr(datamodule, "target_mean", None)
        if target_mean is None:
            return to_model, None
        return to_model, (target_mean, datamodule.target_std)

    def raw_units(self) -> str | None:
        """What ``raw=true`` takes, in words, or None where raw and model units are the same."""
        if self.dataset is None:
            return None
        if self.dataset.get("normalization") in NORMALIZATIONS:
            return "pixel values 0..255"
        if "ToyRegression" in str(self.dataset.get("_target_")):
            return None
        return "the dataset's own feature values"

    def classes(self) -> list | None:
        """The labels behind the class indices of a CSV run, else ``None``."""
        if not self.is_csv or self.dataset.get("task") != "classification":
            return None
        try:
            return list(self.datamodule().classes)
        except UserError as error:
            log.warning("No class labels in the output: the run's dataset: %s", error)
            return None


_RANGE_MARGIN = 10  # training ranges beyond either end that an input may reach


def check_input_range(
    x: Tensor, trained_on: Sequence[float], source: str, raw: bool, raw_units: str | None
) -> None:
    """A UserError when the inputs reach more than ten times the training inputs' range
    ``[lo, hi]`` beyond either end (below ``lo - 10 (hi - lo)`` or above ``hi + 10 (hi - lo)``):
    inputs in other units (pixels 0..255 where the run trained on normalised ones, whose range
    is about 3) gave confident nonsense, probabilities of exactly 0 and 1. Inputs a few ranges
    away, as a regression's extrapolation asks for, pass."""
    lo, hi = trained_on
    width = _RANGE_MARGIN * (hi - lo)
    low, high = float(x.min()), float(x.max())
    if low >= lo - width and high <= hi + width:
        return
    units = "after raw=true's transform" if raw else "in the model's units"
    hint = (
        f"pass raw=true for inputs in raw units ({raw_units})"
        if raw_units is not None and not raw
        else "check the inputs' units"
    )
    raise UserError(
        f"{source}: values span [{low:.4g}, {high:.4g}] {units}, far outside the training "
        f"inputs' [{lo:.4g}, {hi:.4g}]; {hint}, or check_input_range=false to predict anyway"
    )


# -- output -----------------------------------------------------------------------------------
def _columns(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Column names and columns of the table: numbers, or the labels (strings) as they are."""
    names: list[str] = []
    columns: list[list[Any]] = []
    for key, value in results.items():
        if key.startswith("sample_"):
            continue
        if not isinstance(value, Tensor):  # class labels that are strings
            names.append(key)
            columns.append([str(label) for label in value])
            continue
        value = value.double().reshape(value.shape[0], -1)
        width = value.shape[1]
        for j in range(width):
            names.append(f"{key}_{j}" if width > 1 or key == "probs" else key)
            columns.append(value[:, j].tolist())
    return names, columns


def write_output(results: dict[str, Any], path: Path) -> list[Path]:
    """Write ``results`` in the format of ``path``'s suffix; return the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        key: value.numpy() if isinstance(value, Tensor) else np.asarray(value, dtype=str)
        for key, value in results.items()
    }
    if path.suffix == ".pt":
        torch.save(results, path)
        return [path]
    if path.suffix == ".npz":
        np.savez(path, **arrays)
        return [path]
    names, columns = _columns(results)
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(names)
            writer.writerows(
                [value if isinstance(value, str) else format(value, ".9g") for value in row]
                for row in zip(*columns, strict=True)
            )
    else:
        numeric = [
            (name, column)
            for name, column in zip(names, columns, strict=True)
            if not (column and isinstance(column[0], str))
        ]
        if len(numeric) < len(names):  # a float array holds no strings
            log.info("%s leaves out the class labels (strings); a .csv or .npz keeps them", path)
        np.save(path, np.array([column for _, column in numeric], dtype=np.float64).T)
        log.info("Columns of %s: %s", path, ", ".join(name for name, _ in numeric))
    written = [path]
    samples = {key: value for key, value in arrays.items() if key.startswith("sample_")}
    if samples:
        samples_path = path.with_suffix(".samples.npz")
        np.savez(samples_path, **samples)
        written.append(samples_path)
    return written


# -- prediction -------------------------------------------------------------------------------
@torch.no_grad()
def predictive_summaries(
    model: BayesByBackprop, outputs: Tensor, save_samples: bool = False
) -> dict[str, Tensor]:
    """Per-example predictive summaries of network outputs for S draws, (S, N, out)."""
    if model.is_classifier:
        sample_probs = F.softmax(outputs, dim=-1)
        probs = sample_probs.mean(0)
        total, aleatoric = predictive_entropy(probs), expected_entropy(sample_probs)
        results = {
            "probs": probs,
            "prediction": probs.argmax(-1),
            "entropy": total,
            "expected_entropy": aleatoric,
            "mutual_information": (total - aleatoric).clamp_min(0),
        }
        if save_samples:
            results["sample_probs"] = sample_probs
        return results
    likelihood = model.likelihood
    assert isinstance(likelihood, GaussianLikelihood)
    mean, epistemic, aleatoric = likelihood.predictive_moments(outputs)
    results = {
        "mean": mean,
        "epistemic_var": epistemic,
        "aleatoric_var": aleatoric,
        "total_var": epistemic + aleatoric,
    }
    if save_samples:
        results["sample_mean"], results["sample_std"] = likelihood.mean_and_std(outputs)
    return results


def _to_target_units(results: dict[str, Tensor], mean: Tensor, std: Tensor) -> None:
    for key in ("mean", "sample_mean"):
        if key in results:
            results[key] = results[key] * std + mean
    for key in ("epistemic_var", "aleatoric_var", "total_var"):
        results[key] = results[key] * std.square()
    if "sample_std" in results:
        results["sample_std"] = results["sample_std"] * std


def _check_writable(output: Path) -> None:
    """The output's directory exists or can be made, before any sampling."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"output={str(output)!r}: cannot create its directory ({error.strerror})"
        ) from None


def _with_labels(results: dict[str, Any], classes: list) -> dict[str, Any]:
    """``results`` with ``label``, the class label of each prediction, after ``prediction``."""
    labels = [classes[int(index)] for index in results["prediction"]]
    if all(isinstance(label, int) for label in labels):
        labels = torch.tensor(labels, dtype=torch.int64)
    merged: dict[str, Any] = {}
    for key, value in results.items():
        merged[key] = value
        if key == "prediction":
            merged["label"] = labels
    return merged


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Predict for ``cfg.input`` with the run ``cfg.ckpt_path``; write and return the results."""
    for key in ("ckpt_path", "input"):
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) is None:
            raise UserError(f"{key} is required (python -m bbb_lightning.predict --help)")
    for key in ("eval_samples", "batch_size"):
        require_value(cfg, key, integer_at_least(1), "an integer >= 1")
    for key in ("raw", "save_samples", "check_input_range"):
        require_value(cfg, key, lambda value: isinstance(value, bool), "true or false")
    raw, save_samples = cfg.raw, cfg.save_samples
    output = (
        Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.pt"
    )
    if output.suffix not in OUTPUT_SUFFIXES:
        raise UserError(
            f"output={str(output)!r}: unknown suffix {output.suffix!r}; "
            f"use one of {OUTPUT_SUFFIXES}"
        )
    _check_writable(output)
    torch.manual_seed(cfg.seed)
    checkpoint, run_dir = resolve_checkpoint(cfg.ckpt_path)
    model = load_model(checkpoint).to(resolve_device(cfg.get("device", "cpu"))).eval()
    model.likelihood.cpu()  # no part of the forward: it scores the outputs, gathered on the CPU
    run = _RunData(run_dir)
    source = f"input={str(cfg.input)!r}"
    features = target = None
    if run.is_csv and csv_header(cfg.input) is not None:  # match the columns by name
        features, target = run.features(source), run.dataset.target
    x = read_input(cfg.input, features, target)
    input_shape = (model.hparams.get("net") or {}).get("input_shape")
    if x.ndim == 0:
        expected = "(N, {})".format(", ".join(map(str, input_shape))) if input_shape else "(N, ...)"
        raise UserError(
            f"{source}: shape () (one number) does not fit the model: expected {expected}"
        )
    if len(x) == 0:
        raise UserError(f"{source} holds no examples")
    if input_shape is not None:
        x = fit_input_shape(x, input_shape, source=source)
    to_target = None
    if raw:
        to_model, to_target = run.raw_transforms()
        x = to_model(x) if to_model is not None else x
    trained_on = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get(
        "input_range"
    )
    if cfg.check_input_range and trained_on is not None:
        check_input_range(x, trained_on, source, raw, run.raw_units())
    outputs = sample_outputs(model, x, cfg.eval_samples, cfg.batch_size)
    results: dict[str, Any] = predictive_summaries(model, outputs, save_samples)
    if to_target is not None and not model.is_classifier:
        _to_target_units(results, *to_target)
    classes = run.classes() if model.is_classifier else None
    if classes is not None:
        results = _with_labels(results, classes)
    written = write_output(results, output)
    log.info(
        "Predicted %d examples with S=%d from %s: %s",
        len(x),
        cfg.eval_samples,
        checkpoint,
        ", ".join(str(p) for p in written),
    )
    return results


@checked("predict")
@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: a user error is one line on the log and exit status 1."""
    exit_on_user_error(predict, cfg)


if __name__ == "__main__":
    main()
