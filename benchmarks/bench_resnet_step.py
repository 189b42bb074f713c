"""One training step of the Bayesian ResNet-20 against the deterministic one, on the CPU.

Both are the network of ``experiment=cifar10_resnet20`` (the CIFAR ResNet-20 of He et al. 2016,
269,722 parameters, 10 classes) on batches of ``--batch`` (128) random 3 x 32 x 32 images,
with the experiment's optimizer (torch's fused Adam, lr 1e-3), in a plain PyTorch loop (no
Lightning, no data loading):

- ``deterministic``: the plain network, cross-entropy;
- ``bayesian-<estimator>``: the model ``python -m bbb_lightning.train
  experiment=cifar10_resnet20 posterior.estimator=<estimator>`` builds (``build_model``:
  every convolution and the linear layer Bayesian, batch norm deterministic, N(0, 1) prior,
  S = 1 training sample), its loss as ``module.py`` computes it: from one
  ``sample_forward_with_kl`` pass, NLL / B + KL / N with N = 45,000 training images.

Config overrides after the options apply to every Bayesian contestant (e.g.
``model.bayesian_batchnorm=true``, ``num_samples=4``).

Timings: ``--rounds`` rounds (15); in each every contestant runs one block of
``--steps-per-block`` (1) consecutive steps, the order reversed every other round; a step's time
is its block's mean. A ratio is the median over rounds of (contestant / deterministic) of the
same round, reported with the quartiles of those per-round ratios, and beside it the ratio of
the fastest steps (the least disturbed by other processes on a shared machine). The process
keeps freed memory for reuse, as ``python -m bbb_lightning.train`` does. ``--quick``: one round
of one step on batches of 8 (a smoke run). Run from the repository root::

    python benchmarks/bench_resnet_step.py
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from torch import Tensor

from bbb_lightning.bayes import sample_forward_with_kl
from bbb_lightning.data import CIFARDataModule
from bbb_lightning.train import build_model
from bbb_lightning.training.allocator import retain_freed_memory

ESTIMATORS = ("reparameterization", "local", "flipout")
NUM_TRAIN = 45_000  # experiment=cifar10_resnet20's training images (50,000 - 5,000 validation)

Step = Callable[[Tensor, Tensor], None]


def _config(overrides: list[str]):
    with (
        tempfile.TemporaryDirectory() as tmp,
        initialize_config_module("bbb_lightning.conf", version_base="1.3"),
    ):
        return compose(
            "config",
            overrides=[f"paths.output_dir={tmp}", "experiment=cifar10_resnet20", *overrides],
        )


def deterministic_step(cfg) -> Step:
    """The plain ResNet-20 of the experiment's config (the net config ``build_model`` fills in
    from the dataset's sizes): cross-entropy, Adam."""
    net = instantiate(build_model(cfg, CIFARDataModule("cifar10", download=False)).hparams.net)
    optimizer = instantiate(cfg.optimizer)(net.parameters())

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    return step


def bayesian_step(cfg) -> Step:
    """The experiment's model (``build_model``) and the loss of ``module.py``'s training step:
    NLL / B + KL / N from one ``sample_forward_with_kl`` pass."""
    model = build_model(cfg, CIFARDataModule("cifar10", download=False)).train()
    net, likelihood, kl_term = model.net, model.likelihood, model.kl_term
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):  # with a scheduler: Lightning's dict
        optimizer = optimizer["optimizer"]

    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        outputs, kl = sample_forward_with_kl(
            net, x, model.num_samples, kl_term.reduction, kl_term.monte_carlo
        )
        loss = likelihood.expected_nll(outputs, y) / len(x) + kl / NUM_TRAIN
        loss.backward()
        optimizer.step()

    return step


def measure(
    steps: dict[str, Step], batch: tuple[Tensor, Tensor], rounds: int, block: int
) -> dict[str, list[float]]:
    """Seconds per step of each contestant, one block of ``block`` steps per round (after one
    warm-up block each), the order reversed every other round."""
    names = list(steps)
    for name in names:
        for _ in range(block):
            steps[name](*batch)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else reversed(names):
            start = time.perf_counter()
            for _ in range(block):
                steps[name](*batch)
            seconds[name].append((time.perf_counter() - start) / block)
    return seconds


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    first, _, third = statistics.quantiles(values, n=4, method="inclusive")
    return first, third


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def report(seconds: dict[str, list[float]], batch_size: int) -> list[dict[str, float | str]]:
    """Per contestant: median step time, examples/s, the median per-round ratio to the
    deterministic step with its quartiles, the fastest step and its ratio to the fastest
    deterministic step."""
    reference = seconds["deterministic"]
    fastest = min(reference)
    rows = []
    for name, times in seconds.items():
        ratios = [t / r for t, r in zip(times, reference, strict=True)]
        low, high = _quartiles(ratios)
        median = statistics.median(times)
        rows.append(
            {
                "contestant": name,
                "step_ms": 1e3 * median,
                "examples_per_s": batch_size / median,
                "ratio": statistics.median(ratios),
                "ratio_q1": low,
                "ratio_q3": high,
                "fastest_step_ms": 1e3 * min(times),
                "fastest_ratio": min(times) / fastest,
            }
        )
    return rows


def parse_args() -> argparse.Namespace:
    """The options, checked (a bad one exits with one line, status 2, before any work)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps-per-block", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--quick", action="store_true", help="1 round of 1 step, batch 8")
    parser.add_argument("--json", type=Path, help="also write the rows and timings here")
    parser.add_argument("overrides", nargs="*", help="config overrides for the Bayesian nets")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps_per_block, args.batch = 1, 1, 8
    for name in ("rounds", "steps_per_block", "batch", "threads"):
        if getattr(args, name) < 1:
            flag = name.replace("_", "-")
            parser.error(f"--{flag}={getattr(args, name)}: must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = _config(args.overrides)
    if base.retain_freed_memory:  # as the train entry point does, for every contestant
        retain_freed_memory()
    steps = {"deterministic": deterministic_step(base)}
    for estimator in args.estimators:
        cfg = _config([f"posterior.estimator={estimator}", *args.overrides])
        steps[f"bayesian-{estimator}"] = bayesian_step(cfg)
    batch = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,)))
    seconds = measure(steps, batch, args.rounds, args.steps_per_block)
    rows = report(seconds, args.batch)

    overrides = " ".join(args.overrides) or "none"
    print(
        f"# ResNet-20 training step, batch {args.batch} x 3 x 32 x 32, {args.threads} threads, "
        f"{args.rounds} rounds of {args.steps_per_block} steps; {_cpu()}, torch "
        f"{torch.__version__}; overrides: {overrides}"
    )
    print(
        "| contestant | step (ms) | examples/s | vs deterministic (median [q1, q3]) "
        "| fastest step (ms) | fastest vs fastest |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['contestant']} | {row['step_ms']:.1f} | {row['examples_per_s']:.0f} | "
            f"{row['ratio']:.2f}x [{row['ratio_q1']:.2f}, {row['ratio_q3']:.2f}] | "
            f"{row['fastest_step_ms']:.1f} | {row['fastest_ratio']:.2f}x |"
        )
    if args.json is not None:
        config = {key: getattr(args, key) for key in ("rounds", "steps_per_block", "batch")}
        results = {"config": {**config, "overrides": args.overrides}, "rows": rows}
        args.json.write_text(json.dumps({**results, "seconds": seconds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
