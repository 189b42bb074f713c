"""The benchmark scripts still run end to end (a smoke run; speed itself is never asserted).

They live outside the package and the test suite proper, so nothing else would notice when a
change to the core breaks them: each runs here in its smallest configuration, as a real
subprocess on the shared MNIST copy, and writes what it documents.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from bbb_lightning.bayes import native
from bbb_testing import write_uci_set

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


def _load(script: str) -> ModuleType:
    """Import a benchmark script as a module (it is not part of a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{Path(script).stem}", BENCHMARKS / script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["Reparameterization", "Flipout"])
def test_bayesian_torch_contestant_minimises_the_elbo(kind):
    """The peer's loss is CE + KL / N with the KL summed over all weights, as ours, blitz's and
    torchbayesian's: its gradient equals that of a float64 torch.distributions reference."""
    pytest.importorskip("bayesian_torch")
    bench = _load("bench_training.py")
    num_train = 1000
    torch.manual_seed(0)
    contestant = bench.bayesian_torch(kind, num_train)
    for group in contestant.optimizer.param_groups:
        group["lr"] = 0.0  # keep the parameters; the step leaves the loss's gradient behind
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    torch.manual_seed(1)
    contestant.train_step(x, y, 1)
    model = contestant.model
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same weight noise
    ce = F.cross_entropy(model(x), y)
    kl = torch.zeros((), dtype=torch.float64)
    for layer in model.modules():
        for part in ("weight", "bias"):
            mu = getattr(layer, f"mu_{part}", None)
            if mu is None:
                continue
            sigma = F.softplus(getattr(layer, f"rho_{part}").double())
            prior = Normal(
                getattr(layer, f"prior_{part}_mu").double(),
                getattr(layer, f"prior_{part}_sigma").double(),
            )
            kl = kl + kl_divergence(Normal(mu.double(), sigma), prior).sum()
    (ce + (kl / num_train).float()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_bench_training_quick_run_writes_its_tables(tmp_path, mnist_dir):
    common = ("--quick", "--repeats", "1", "--skip-peers", "--data-dir", str(mnist_dir.parent))
    done = _run(
        "bench_training.py", *common, "--quality-epochs", "0", "--out-dir", "out", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "bench_training.json").read_text())
    estimators = ("reparameterization", "local", "flipout")
    ours = {f"ours-{e}" for e in estimators}
    reference = {f"reference-{e}" for e in estimators}  # compiled-* rows are off under --quick
    assert set(results["throughput"]) == {"deterministic", *ours, *reference}
    for row in results["throughput"].values():
        assert math.isfinite(row["train_ratio"]) and row["train_ratio"] > 0
        low, high = row["train_ratio_quartiles"]
        assert low <= row["train_ratio"] <= high
    assert set(results["sample_scaling"]) == ours
    repeats = results["config"]["repeats"]  # every timing of every round is written
    assert all(len(row["train_rounds_s"]) == repeats for row in results["throughput"].values())
    scaling = results["sample_scaling_rounds_s"]
    assert set(scaling["steps_per_block"]) == {"1", "4", "16"}
    assert {f"{name}|16|loop" for name in ours} <= set(scaling["blocks"])
    assert all(len(times) == repeats for times in scaling["blocks"].values())
    assert {f"{name}|vec" for name in ours} <= set(results["eval_many_rounds_s"])
    assert all(len(times) == repeats for times in results["eval_many_rounds_s"].values())
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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--repeats", "0"], "--repeats=0: must be at least 1"),
        (["--steps-per-block", "0"], "--steps-per-block=0: must be at least 1"),
        (["--train-samples", "4", "16"], "--train-samples=[4, 16]: must be positive and include 1"),
    ],
)
def test_bench_training_refuses_bad_arguments_in_one_line(
    tmp_path, monkeypatch, capsys, args, message
):
    """Before any work: a traceback after the data and models were built (--repeats 0,
    --steps-per-block 0), or 'vs S=1' ratios taken against S=4 (--train-samples 4 16). The
    script's own argument parser, in this process (its main parses first, before any work)."""
    bench = _load("bench_training.py")
    monkeypatch.setattr(sys, "argv", ["bench_training.py", *args, "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_status:
        bench.parse_args()
    assert exit_status.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_bench_lightning_step_refuses_zero_steps_in_one_line(tmp_path):
    done = _run("bench_lightning_step.py", "--steps", "0", cwd=tmp_path)  # a StatisticsError
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].endswith("--steps=0: must be at least 1")


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


def test_uci_benchmark_writes_the_table_beside_the_reference(tmp_path):
    """Two sets in the UCI layout (one named as a real set, so it meets its reference row),
    two jobs at once, one epoch: the table has a row per set with the reference's numbers."""
    for name in ("toyset", "energy"):
        write_uci_set(tmp_path / "UCI", name)
    result = _run(
        "uci.py", "--data-dir", str(tmp_path / "UCI"), "--out", str(tmp_path / "out"),
        "--sets", "toyset", "energy", "--splits", "2", "--splits", "energy=1", "--epochs", "1",
        "--jobs", "2", "logger=none",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "out" / "uci.md").read_text()
    assert "| toyset | 2 | 1 |" in table and "| energy | 1 | 1 |" in table
    assert "0.54 ± 0.06" in table and "-1.21 ± 0.01" in table  # energy's reference row
    rows = json.loads((tmp_path / "out" / "uci.json").read_text())["rows"]
    assert [row["set"] for row in rows] == ["toyset", "energy"]
    assert all(math.isfinite(row["test/raw_ll"]) and row["wall_s"] > 0 for row in rows)
    assert (tmp_path / "out" / "toyset" / "1" / "metrics.json").is_file()


def test_bench_resnet_step_quick_run_has_a_ratio_per_estimator(tmp_path):
    done = _run("bench_resnet_step.py", "--quick", "--json", "out.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    estimators = ("reparameterization", "local", "flipout")
    names = ["deterministic", *(f"bayesian-{e}" for e in estimators)]
    assert [row["contestant"] for row in rows] == names
    assert rows[0]["ratio"] == 1.0
    assert all(math.isfinite(row["ratio"]) and row["ratio"] > 0 for row in rows)
    assert all(f"| {name} |" in done.stdout for name in names)


def test_bench_resnet_step_refuses_zero_rounds_in_one_line(monkeypatch, capsys):
    bench = _load("bench_resnet_step.py")
    monkeypatch.setattr(sys, "argv", ["bench_resnet_step.py", "--rounds", "0"])
    with pytest.raises(SystemExit) as exit_status:
        bench.parse_args()
    assert exit_status.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line.endswith("--rounds=0: must be at least 1")
