"""The benchmark scripts still run end to end (a smoke run; speed itself is never asserted).

They live outside the package and the test suite proper, so nothing else would notice when a
change to the core breaks them: each runs here in its smallest configuration, as a real
subprocess on the shared MNIST copy, and writes what it documents.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bbb_lightning.bayes import native

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_bench_training_quick_run_writes_its_tables(tmp_path, mnist_dir):
    common = ("--quick", "--skip-peers", "--data-dir", str(mnist_dir.parent))
    done = _run(
        "bench_training.py", *common, "--quality-epochs", "0", "--out-dir", "out", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench_training.json").read_text())
    ours = {f"ours-{e}" for e in ("reparameterization", "local", "flipout")}
    assert set(results["throughput"]) == {"deterministic", *ours}
    for row in results["throughput"].values():
        assert math.isfinite(row["train_ratio"]) and row["train_ratio"] > 0
        low, high = row["train_ratio_quartiles"]
        assert low <= row["train_ratio"] <= high
    assert set(results["sample_scaling"]) == ours
    assert {t["target"].split(" ")[0] for t in results["targets"]} >= {"best", "S=16"}
    assert "### Targets" in (tmp_path / "out" / "bench_training.md").read_text()
    assert (tmp_path / "out" / "bench_training.png").stat().st_size > 0

    profiled = _run(  # and the forward passes under bfloat16 autocast
        "bench_training.py", *common, "--profile", "--precision", "bf16-mixed", "--out-dir",
        "prof", cwd=tmp_path,
    )  # fmt: skip
    assert profiled.returncode == 0, profiled.stderr[-2000:]
    report = (tmp_path / "prof" / "profile.md").read_text()
    assert "ours-local, S=16 step" in report
    if native.kernels() is not None:
        assert "bbb_lightning::sample_with_kl" in report


def test_bench_lightning_step_runs_the_composed_config(tmp_path, mnist_dir):
    done = _run(
        "bench_lightning_step.py",
        "--data-dir",
        str(mnist_dir),
        "--steps",
        "3",
        "--rounds",
        "1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Lightning / plain" in done.stdout
