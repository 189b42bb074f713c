"""One table for a multirun: each job's overrides, status and metrics, best first.

``python -m bbb_lightning.summary multirun/<date>/<time> [--sort val/nll] [--descending]`` writes
``summary.csv`` and ``summary.md`` into that directory and prints the markdown. During a
multirun the :class:`SweepSummary` Hydra callback rewrites both after every job, so a failed
job shows up (status ``failed`` and its one-line error) while the others go on.

A sweep over ``dataset.split`` (the UCI protocol's fixed splits) also gets, in ``summary.md``
and ``summary_splits.csv``, each metric's mean ± standard error over the finished splits of
every other combination of overrides (:func:`over_splits`).
"""

from __future__ import annotations

import argparse
import atexit
import csv
import json
import math
import shlex
from pathlib import Path
from typing import Any

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

__all__ = [
    "HIGHER_IS_BETTER",
    "SweepSummary",
    "collect",
    "main",
    "mean_and_standard_error",
    "metric_mode",
    "over_splits",
    "shared_overrides",
    "tags_text",
    "write_summary",
]

ERROR_FILE = "error.txt"
# Metrics where a larger value is better; every other one (nll, ece, rmse, ...) is minimised.
HIGHER_IS_BETTER = frozenset({"accuracy", "raw_ll"})
SPLIT_KEY = "dataset.split"


def metric_mode(name: str) -> str:
    """``"max"`` for a metric where larger is better (``val/accuracy``), else ``"min"``: the
    checkpoint callback's ``mode``, the sweeps' sort order and Optuna's direction.

    Example:
        >>> metric_mode("val/accuracy"), metric_mode("best/val/nll")
        ('max', 'min')
    """
    return "max" if name.rsplit("/", 1)[-1] in HIGHER_IS_BETTER else "min"


def _job_row(job_dir: Path) -> dict[str, Any] | None:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return None
    overrides = yaml.safe_load(overrides_file.read_text()) or []
    row: dict[str, Any] = {"job": job_dir.name, "overrides": _joined(overrides)}
    tags = _tags(job_dir / ".hydra" / "config.yaml")
    if tags:
        row["tags"] = tags
    metrics_file, error_file = job_dir / "metrics.json", job_dir / ERROR_FILE
    if metrics_file.is_file():  # also a job that failed at the end (non-finite final metrics)
        row |= json.loads(metrics_file.read_text())
    if error_file.is_file():
        row |= {"status": "failed", "error": error_file.read_text().strip()}
    else:
        row["status"] = "ok" if metrics_file.is_file() else "running or killed"
    return row


def tags_text(tags: Any) -> str:
    """A run's ``tags`` (``tags=[baseline,mnist]``) as one text, the way the sweep summary,
    TensorBoard's HParams tab and MLflow show them; "" for none.

    Example:
        >>> tags_text(["baseline", "mnist", 2024]), tags_text(None)
        ('baseline, mnist, 2024', '')
    """
    return ", ".join(map(str, tags or []))


def _tags(config_file: Path) -> str:
    """:func:`tags_text` of the ``tags`` in a job's saved config ("" without one)."""
    if not config_file.is_file():
        return ""
    return tags_text((yaml.safe_load(config_file.read_text()) or {}).get("tags"))


def _joined(overrides: list[str]) -> str:
    """The overrides as one command-line string (an item with a space quoted, as typed)."""
    return " ".join(shlex.quote(item) if " " in item else item for item in overrides)


def shared_overrides(rows: list[dict]) -> list[str]:
    """The overrides every job of the sweep has (none for a single job: nothing to compare).

    Example:
        >>> shared_overrides([{"overrides": "a=1 b=2"}, {"overrides": "a=1 b=3"}])
        ['a=1']
    """
    if len(rows) < 2:
        return []
    lists = [shlex.split(row["overrides"]) for row in rows]
    return [item for item in lists[0] if all(item in others for others in lists[1:])]


def _shown(overrides: str, shared: list[str]) -> str:
    """``overrides`` without the ``shared`` ones: what sets a job apart."""
    return _joined([item for item in shlex.split(overrides) if item not in shared]) or "-"


def collect(sweep_dir: Path, sort_by: str = "val/nll", descending: bool = False) -> list[dict]:
    """A row per job directory of ``sweep_dir``; finished jobs sorted by ``sort_by`` first.

    A job is ranked by ``best/<sort_by>`` where its metrics have it (the best validation value,
    that of the checkpoint it tested), else by ``sort_by`` (the last epoch's); failed jobs last.
    """
    rows = [row for job in sorted(sweep_dir.iterdir()) if (row := _job_row(job)) is not None]

    def key(row: dict) -> tuple[bool, float]:
        value = row.get(f"best/{sort_by}", row.get(sort_by))
        missing = row["status"] != "ok" or not isinstance(value, int | float) or math.isnan(value)
        return missing, 0.0 if missing else (-value if descending else value)

    return sorted(rows, key=key)


def _columns(rows: list[dict]) -> list[str]:
    first = ["job", "status", "overrides"]
    first += ["tags"] if any("tags" in row for row in rows) else []
    rest = sorted({name for row in rows for name in row} - {*first, "error"})
    return first + rest + (["error"] if any("error" in row for row in rows) else [])


def _cell(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value if value is not None else "")


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean and standard error sqrt(sum (v - mean)^2 / (n - 1)) / sqrt(n) (0 for one value).

    Example:
        >>> mean_and_standard_error([1.0, 2.0, 3.0, 4.0])  # sample std 1.291, / sqrt(4)
        (2.5, 0.6454972243679028)
    """
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    variance = math.fsum((value - mean) ** 2 for value in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _without_split(overrides: str) -> str:
    return _joined(
        [item for item in shlex.split(overrides) if not item.startswith(f"{SPLIT_KEY}=")]
    )


def over_splits(rows: list[dict]) -> list[dict[str, Any]]:
    """Per combination of the overrides other than ``dataset.split``: ``splits`` (how many
    finished), then ``<metric>`` and ``<metric>_se``, the mean and standard error over them of
    every numeric metric. Empty unless some job overrides ``dataset.split``."""
    if not any(f"{SPLIT_KEY}=" in row["overrides"] for row in rows):
        return []
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["status"] == "ok":
            groups.setdefault(_without_split(row["overrides"]), []).append(row)
    table = []
    for overrides, members in groups.items():
        entry: dict[str, Any] = {"overrides": overrides, "splits": len(members)}
        names = sorted({name for row in members for name in row if name not in entry})
        for name in names:
            values = [row.get(name) for row in members]
            if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
                entry[name], entry[f"{name}_se"] = mean_and_standard_error(
                    [float(v) for v in values]
                )
        table.append(entry)
    return table


def _splits_markdown(table: list[dict[str, Any]], shared: list[str]) -> list[str]:
    """The test metrics (and training time) of :func:`over_splits` as mean ± SE cells."""
    metrics = sorted(
        {name for entry in table for name in entry if name.startswith("test/")}
        - {name for entry in table for name in entry if name.endswith("_se")}
    )
    metrics.append("fit_seconds")
    cells = [
        " | ".join(
            f"{entry[name]:.4g} ± {entry[f'{name}_se']:.2g}" if name in entry else ""
            for name in metrics
        )
        for entry in table
    ]
    return [
        "",
        f"Mean ± standard error over the finished values of `{SPLIT_KEY}` (also in "
        "summary_splits.csv):",
        "",
        "| overrides | splits | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 2),
        *(
            f"| {_shown(entry['overrides'], shared)} | {entry['splits']} | {row} |"
            for entry, row in zip(table, cells, strict=True)
        ),
    ]


def write_summary(sweep_dir: Path, sort_by: str = "val/nll", descending: bool = False) -> str:
    """Write ``summary.csv`` (each job's every override) and ``summary.md`` (the overrides
    every job shares named once above the table, a row's own in it) in ``sweep_dir``; return
    the markdown."""
    rows = collect(sweep_dir, sort_by, descending)
    columns = _columns(rows)
    shared = shared_overrides(rows)
    with (sweep_dir / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"Sorted by `best/{sort_by}` where a job has it, else `{sort_by}` "
        f"({'descending' if descending else 'ascending'}); failed jobs last.",
        *([f"Every job: `{_joined(shared)}`."] if shared else []),
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *(
            "| " + " | ".join(_cell(_markdown_value(row, c, shared)) for c in columns) + " |"
            for row in rows
        ),
    ]
    splits = over_splits(rows)
    if splits:
        with (sweep_dir / "summary_splits.csv").open("w", newline="") as handle:
            names = list(dict.fromkeys(name for entry in splits for name in entry))
            writer = csv.DictWriter(handle, fieldnames=names)
            writer.writeheader()
            writer.writerows(splits)
        lines += _splits_markdown(splits, shared)
    markdown = "\n".join(lines) + "\n"
    (sweep_dir / "summary.md").write_text(markdown)
    return markdown


def _markdown_value(row: dict, column: str, shared: list[str]) -> Any:
    value = row.get(column, "")
    return _shown(value, shared) if column == "overrides" else value


class SweepSummary(Callback):
    """Hydra callback: after each multirun job, record a failure and refresh the summary; when
    the multirun ends, print it and where it is (the last job's metrics were the last lines a
    sweep printed)."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_config = HydraConfig.get()
        if hydra_config.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(hydra_config.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            (job_dir / ERROR_FILE).write_text(f"{type(error).__name__}: {message}\n")
        sort_by = config.get("optimized_metric", "val/nll")
        write_summary(Path(hydra_config.sweep.dir), sort_by, metric_mode(sort_by) == "max")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # At exit rather than on_multirun_end, which Hydra skips when a job failed.
        sort_by = config.get("optimized_metric", "val/nll")
        atexit.register(_print_summary, Path(str(config.hydra.sweep.dir)), sort_by)


def _print_summary(sweep_dir: Path, sort_by: str) -> None:
    """Print the sweep's table and where it is written (nothing if no job started)."""
    if not sweep_dir.is_dir() or not collect(sweep_dir):
        return
    markdown = write_summary(sweep_dir, sort_by, metric_mode(sort_by) == "max")
    print(f"\nThe sweep ({sweep_dir / 'summary.md'}, also summary.csv):\n\n{markdown}", end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bbb_lightning.summary",
        description="Collect the metrics.json of every job of a multirun into summary.csv/.md.",
    )
    parser.add_argument("sweep_dir", type=Path, help="e.g. multirun/2026-11-24/12-00-00")
    parser.add_argument("--sort", default="val/nll", help="metric to sort by (default val/nll)")
    parser.add_argument(
        "--descending",
        action="store_true",
        help="largest first (the default for accuracy, where larger is better)",
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir {str(args.sweep_dir)!r} is not a directory")
    rows = collect(args.sweep_dir)
    if not rows:
        parser.error(
            f"sweep_dir {str(args.sweep_dir)!r} holds no job directories (a multirun's "
            "multirun/<date>/<time>/, whose subdirectories 0, 1, ... are its jobs)"
        )
    columns = _columns(rows)
    if args.sort not in columns and any(row["status"] == "ok" for row in rows):
        parser.error(f"--sort {args.sort!r} is not a column; the columns are: {', '.join(columns)}")
    descending = args.descending or metric_mode(args.sort) == "max"
    print(write_summary(args.sweep_dir, args.sort, descending), end="")


if __name__ == "__main__":
    main()
