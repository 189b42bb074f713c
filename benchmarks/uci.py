"""The UCI regression table: experiment=uci on every split of the seven sets, in one command.

    python benchmarks/uci.py --data-dir ../shared/data/UCI --jobs 2
    python benchmarks/uci.py --data-dir ../shared/data/UCI --splits 10 \\
        --splits kin8nm=2 --splits protein-tertiary-structure=1 --epochs 100 --jobs 2

Each set is one Hydra multirun of ``python -m bbb_lightning.train -m experiment=uci
dataset.name=<set> 'dataset.split=range(k)'`` in ``<out>/<set>/`` (its own run directories,
TensorBoard events and ``summary.md``); ``--jobs`` runs that many sets at once, the longest
first, each process on one thread. The table (``<out>/uci.md`` and ``uci.json``) gives per set
the mean ± standard error over the splits of the test RMSE and log-likelihood per example in
the target's units (``test/raw_rmse``, ``test/raw_ll``, from ``summary_splits.csv``) beside the
published reference on the same splits, whether our log-likelihood is at least the reference's
minus one standard error, and the set's wall time.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

# MC dropout, one hidden layer, grid search (Gal & Ghahramani 2016's repository), on these
# splits: (RMSE, its SE, test log-likelihood, its SE), from ../shared/data/README.md.
REFERENCE = {
    "bostonHousing": (2.90, 0.18, -2.40, 0.04),
    "concrete": (4.82, 0.16, -2.93, 0.02),
    "energy": (0.54, 0.06, -1.21, 0.01),
    "kin8nm": (0.08, 0.00, 1.14, 0.01),
    "naval-propulsion-plant": (0.00, 0.00, 4.45, 0.00),
    "protein-tertiary-structure": (4.27, 0.02, -2.87, 0.00),
    "wine-quality-red": (0.62, 0.01, -0.93, 0.01),
}
# Rough cost of one training epoch relative to concrete's (training rows), to start the
# longest multiruns first.
ROWS = {
    "bostonHousing": 506,
    "concrete": 1030,
    "energy": 768,
    "kin8nm": 8192,
    "naval-propulsion-plant": 11934,
    "protein-tertiary-structure": 45730,
    "wine-quality-red": 1599,
}


def _splits(values: list[str], sets: list[str], data_dir: Path) -> dict[str, int]:
    """Splits per set: every ``n_splits.txt`` split, capped by ``--splits N`` (all sets) and
    ``--splits name=N`` (one set; the later option wins)."""
    counts = {name: int((data_dir / name / "n_splits.txt").read_text()) for name in sets}
    caps: dict[str, int] = {}
    for value in values:
        name, _, number = value.rpartition("=")
        if name and name not in counts:
            raise SystemExit(f"--splits {value!r}: no set {name!r}; the sets: {', '.join(sets)}")
        if not number.isdigit() or int(number) < 1:
            raise SystemExit(f"--splits {value!r}: expected N or <set>=N with N >= 1")
        for key in [name] if name else sets:
            caps[key] = int(number)
    return {name: min(count, caps.get(name, count)) for name, count in counts.items()}


def _run_set(name: str, splits: int, args: argparse.Namespace) -> dict:
    sweep = args.out / name
    command = [
        sys.executable,
        "-m",
        "bbb_lightning.train",
        "-m",
        "experiment=uci",
        f"dataset.name={name}",
        f"dataset.data_dir={args.data_dir.resolve()}",
        f"dataset.split=range({splits})",
        f"hydra.sweep.dir={sweep.resolve()}",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        *([f"trainer.max_epochs={args.epochs}"] if args.epochs else []),
        *args.override,
    ]
    threads = {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {}
    started = time.perf_counter()
    result = subprocess.run(
        command,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **threads},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    print(f"{name}: {splits} splits in {wall:.0f} s (exit {result.returncode})", flush=True)
    row: dict = {"set": name, "splits_run": splits, "wall_s": wall, "exit": result.returncode}
    table = sweep / "summary_splits.csv"
    if result.returncode != 0 or not table.is_file():
        row["error"] = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return row
    (entry,) = csv.DictReader(table.open())
    for key in ("splits", "test/raw_rmse", "test/raw_rmse_se", "test/raw_ll", "test/raw_ll_se"):
        row[key] = float(entry[key])
    row["epochs"] = float(entry["epochs"])
    return row


def _markdown(rows: list[dict], command: str, total: float) -> str:
    lines = [
        f"UCI regression, experiment=uci ({date.today().isoformat()}; `{command}`; "
        f"{total:.0f} s wall in all). Mean ± standard error over the splits run; the "
        "reference: MC dropout on the same splits (all 20, or 5 for protein).",
        "",
        "| set | splits | epochs | RMSE (ours) | RMSE (reference) | test LL (ours) | "
        "test LL (reference) | LL >= ref - SE | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met = 0
    for row in rows:
        rmse, rmse_se, ll, ll_se = REFERENCE.get(row["set"], (float("nan"),) * 4)
        ref_rmse, ref_ll = f"{rmse:.2f} ± {rmse_se:.2f}", f"{ll:.2f} ± {ll_se:.2f}"
        wall = f"{row['wall_s']:.0f}"
        if "error" in row:
            cells = [row["set"], f"failed: {row['error']}", "", "", ref_rmse, "", ref_ll, "no"]
        else:
            ok = row["test/raw_ll"] >= ll - ll_se
            met += ok
            ours_rmse = f"{row['test/raw_rmse']:.3g} ± {row['test/raw_rmse_se']:.2g}"
            ours_ll = f"{row['test/raw_ll']:.2f} ± {row['test/raw_ll_se']:.2f}"
            counts = [f"{row['splits']:.0f}", f"{row['epochs']:.0f}"]
            cells = [
                row["set"],
                *counts,
                ours_rmse,
                ref_rmse,
                ours_ll,
                ref_ll,
                "yes" if ok else "no",
            ]
        lines.append("| " + " | ".join([*cells, wall]) + " |")
    lines += ["", f"Test LL at least the reference's minus one SE on {met} of {len(rows)} sets."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data/UCI"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/uci"))
    parser.add_argument("--sets", nargs="+", default=list(REFERENCE), metavar="SET")
    parser.add_argument(
        "--splits",
        action="append",
        default=[],
        metavar="N|SET=N",
        help="at most N splits per set, or for SET (repeatable); default: all",
    )
    parser.add_argument("--epochs", type=int, help="trainer.max_epochs (default: the config's)")
    parser.add_argument("--jobs", type=int, default=1, help="sets trained at once")
    parser.add_argument(
        "override", nargs="*", help="more Hydra overrides for every run, e.g. kl.scale=1"
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.epochs is not None and args.epochs < 1):
        parser.error("--jobs and --epochs must be >= 1")
    for name in args.sets:
        if not (args.data_dir / name / "n_splits.txt").is_file():
            parser.error(f"no {args.data_dir / name / 'n_splits.txt'}: --data-dir holds no {name}")
    if any((args.out / name).exists() for name in args.sets):
        parser.error(f"{args.out} already holds results of these sets; pass another --out")
    splits = _splits(args.splits, args.sets, args.data_dir)
    order = sorted(args.sets, key=lambda name: -ROWS.get(name, 0) * splits[name])
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        finished = pool.map(lambda name: _run_set(name, splits[name], args), order)
        results = dict(zip(order, finished, strict=True))
    total = time.perf_counter() - started
    rows = [results[name] for name in args.sets]
    command = "python benchmarks/uci.py " + " ".join(argv if argv is not None else sys.argv[1:])
    markdown = _markdown(rows, command, total)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "uci.md").write_text(markdown)
    payload = {"command": command, "date": date.today().isoformat(), "wall_s": total}
    (args.out / "uci.json").write_text(json.dumps({**payload, "rows": rows}, indent=2) + "\n")
    print(markdown, end="")
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
