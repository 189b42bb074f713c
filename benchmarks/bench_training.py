"""Training and evaluation throughput: bbb-lightning, a deterministic net, and peer libraries.

Every contestant is the MLP 784-400-400-10 (ReLU) on MNIST, batch 128, Adam (lr 1e-3), trained
by a plain PyTorch loop (no Lightning for anyone), on 2 CPU threads:

- ``deterministic``: the plain network (cross-entropy);
- ``ours-<estimator>``: ``bayesianize(MLP, estimator=...)`` + ``sample_forward_with_kl``, the
  loss of ``module.py``: NLL / B + (1/M) KL / B (uniform weighting, M minibatches per epoch, so
  the KL counts once per epoch), with the native CPU kernels where they serve;
- ``reference-<estimator>``: the same on the reference path alone (plain torch ops, the kernels
  stepped aside: what a GPU user runs eagerly), and ``compiled-<estimator>``: the network
  ``torch.compile``d in place (``nn.Module.compile``, inductor; what ``compile=true`` does),
  unless ``--no-compiled`` (default under ``--quick``: compiling takes minutes on 2 cores);
- peers, installed from PyPI at the pins below (``pip install --no-deps``; their declared
  torchvision / scikit-learn / tensorboard requirements are not used by the layers used here),
  each trained as its documentation shows:
  ``bayesian-torch-reparameterization`` / ``-flipout``: ``dnn_to_bnn`` and
  ``CE + KL / N``, the KL summed over the weights (:func:`bayesian_torch_kl`; its README's
  ``get_kl_loss(model) / B`` averages each tensor's KL over its elements, which weighs the
  first layer's KL about 800 times less than the ELBO does); ``blitz``:
  ``@variational_estimator`` and ``sample_elbo(..., complexity_cost_weight=1/N)``;
  ``torchbayesian``: ``bnn.BayesianModule`` and ``CE + model.kl_divergence() / N``. So every
  Bayesian contestant minimises the same per-example negative ELBO, NLL / B + KL / N; each peer
  keeps its own default prior and initialisation.

Measured, in one process and one run:

1. training step time and throughput (examples/s), evaluation throughput (one posterior draw,
   ``torch.inference_mode``, as Lightning's evaluation loops run), peak memory: every figure
   with its ratio to the deterministic network;
2. S = 1, 4, 16 training samples: ours vectorized (``sample_forward``) against a Python loop;
3. 100-sample predictive evaluation: ours vectorized against a loop of 100 forwards; peers
   loop, as their documentation does;
4. quality after a fixed budget (``--quality-epochs`` epochs, same data order, same lr): test
   accuracy, NLL and ECE (15 bins) of the predictive with ``--quality-samples`` samples.

Memory: by default the process keeps freed memory for reuse (``--allocator retain``,
:func:`bbb_lightning.training.allocator.retain_freed_memory`, as
``python -m bbb_lightning.train`` does),
for every contestant alike; ``--allocator default`` leaves glibc's policy, under which every
step faults in fresh pages for the tensors the previous step freed.

Timings: R rounds (``--repeats``); in each round every case runs one block of steps, the order
of the cases reversed every other round (interleaved), and the median over rounds is reported.
A block is ``--steps-per-block`` (20) consecutive steps of one model, as in a training loop: the
first step of a block finds the caches filled by the other contestants, and with short blocks
that cold step weighs most on the smallest step, the deterministic one (in one comparison
5-step blocks read our ratios about 15 % lower, no more than runs differ from each other).
A ratio to the deterministic network is the median of the per-round ratios. Peak memory: the
growth of the resident set (Linux ``VmHWM`` after ``/proc/self/clear_refs`` and
``malloc_trim``) during one step, above the memory held before it; ``state`` counts parameters,
gradients and optimizer state.

``--precision bf16-mixed`` runs every contestant's forward passes under bfloat16 autocast
(the backward pass and the optimizer outside it, as Lightning's precision plugin does); ours
computes the likelihood in float32 from the bfloat16 logits, as ``module.py`` does.

``--baseline DIR`` adds ``ours-<estimator>@baseline`` contestants built from another copy of the
``bbb_lightning/bayes`` package (e.g. ``git archive HEAD src/bbb_lightning/bayes``), for
before/after comparisons in one invocation. Run from the repository root::

    pip install --no-deps bayesian-torch==0.5.0 blitz-bayesian-pytorch==0.2.8 torchbayesian==0.2.1
    python benchmarks/bench_training.py
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import bbb_lightning.bayes as ours
from bbb_lightning.bayes import native
from bbb_lightning.data import MNISTDataModule
from bbb_lightning.models.nets import MLP
from bbb_lightning.training.allocator import retain_freed_memory
from bbb_lightning.training.objectives import CategoricalLikelihood, KLTerm

REPO = Path(__file__).resolve().parents[1]
PEER_PINS = {
    "bayesian-torch": "0.5.0",
    "blitz-bayesian-pytorch": "0.2.8",
    "torchbayesian": "0.2.1",
}
ESTIMATORS = ("reparameterization", "local", "flipout")
BATCH = 128
LR = 1e-3
NUM_CLASSES = 10
LIKELIHOOD = CategoricalLikelihood(NUM_CLASSES)


# -- contestants ------------------------------------------------------------------------------
class ForwardPrecision:
    """The context of every contestant's forward pass: bfloat16 autocast under ``bf16-mixed``,
    nothing under ``32-true`` (``--precision``)."""

    CHOICES = ("32-true", "bf16-mixed")

    def __init__(self) -> None:
        self.name = "32-true"

    def __call__(self) -> contextlib.AbstractContextManager[Any]:
        if self.name == "bf16-mixed":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()


FORWARD = ForwardPrecision()


def mlp() -> nn.Module:
    return MLP([1, 28, 28], NUM_CLASSES, hidden=(400, 400))


@dataclass
class Contestant:
    """A model with its optimizer, one training step and its predictive.

    ``train_step(x, y, S)`` runs one optimizer step with S training samples; ``predict(x, S)``
    returns S sets of logits, shape (S, B, 10), under ``torch.inference_mode``.
    """

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_step: Callable[[Tensor, Tensor, int], None]
    predict: Callable[[Tensor, int], Tensor]
    loop_train_step: Callable[[Tensor, Tensor, int], None] | None = None
    loop_predict: Callable[[Tensor, int], Tensor] | None = None
    group: str = "peer"


def stack_forwards(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    with FORWARD():
        return torch.stack([model(x) for _ in range(samples)])


def deterministic(num_train: int) -> Contestant:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def train_step(x: Tensor, y: Tensor, samples: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with FORWARD():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    def predict(x: Tensor, samples: int) -> Tensor:
        with FORWARD():
            return model(x).unsqueeze(0)

    return Contestant("deterministic", model, optimizer, train_step, predict, group="baseline")


def ours_contestant(
    bayes: ModuleType, estimator: str, num_train: int, suffix: str = ""
) -> Contestant:
    """bayesianize + sample_forward_with_kl (an older copy without it: sample_forward +
    kl_divergence) with the loss of module.py."""
    model = bayes.bayesianize(mlp(), estimator=estimator)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    num_batches = math.ceil(num_train / BATCH)
    kl_weight = KLTerm(weighting="uniform").weight(0, num_batches, step=0)  # 1 / M

    def step(x: Tensor, y: Tensor, outputs: Callable[[], tuple[Tensor, Tensor]]) -> None:
        optimizer.zero_grad(set_to_none=True)
        with FORWARD():
            out, kl = outputs()
            nll = LIKELIHOOD.expected_nll(out.float(), y)
            loss = nll / x.shape[0] + kl_weight * kl / x.shape[0]
        loss.backward()
        optimizer.step()

    def with_kl(x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        if hasattr(bayes, "sample_forward_with_kl"):
            return bayes.sample_forward_with_kl(model, x, samples)
        return bayes.sample_forward(model, x, samples), bayes.kl_divergence(model)

    def train_step(x: Tensor, y: Tensor, samples: int) -> None:
        step(x, y, lambda: with_kl(x, samples))

    def loop_train_step(x: Tensor, y: Tensor, samples: int) -> None:
        step(x, y, lambda: (stack_forwards(model, x, samples), bayes.kl_divergence(model)))

    def predict(x: Tensor, samples: int) -> Tensor:
        with FORWARD():
            return bayes.sample_forward(model, x, samples)

    return Contestant(
        f"ours-{estimator}{suffix}",
        model,
        optimizer,
        train_step,
        predict,
        loop_train_step=loop_train_step,
        loop_predict=lambda x, samples: stack_forwards(model, x, samples),
        group="ours" if not suffix else "baseline-ours",
    )


def reference_contestant(estimator: str, num_train: int, compiled: bool) -> Contestant:
    """Ours on the reference path: eager with the native kernels stepped aside, or with the
    network compiled in place by ``torch.compile`` (which steps them aside by itself)."""
    name = f"{'compiled' if compiled else 'reference'}-{estimator}"
    contestant = ours_contestant(ours, estimator, num_train)
    if compiled:
        contestant.model.compile()
        train_step, predict = contestant.train_step, contestant.predict
    else:

        def train_step(x: Tensor, y: Tensor, samples: int) -> None:
            with native.stepped_aside():
                contestant.train_step(x, y, samples)

        def predict(x: Tensor, samples: int) -> Tensor:
            with native.stepped_aside():
                return contestant.predict(x, samples)

    return Contestant(
        name, contestant.model, contestant.optimizer, train_step, predict, group="reference"
    )


def bayesian_torch_kl(model: nn.Module) -> Tensor:
    """KL(q || p) of a ``dnn_to_bnn`` network, summed over every weight and bias:
    sum_i [log(sigma_p / sigma_i) + (sigma_i^2 + (mu_i - mu_p)^2) / (2 sigma_p^2) - 1/2],
    sigma_i = log(1 + exp(rho_i)).

    bayesian-torch's ``get_kl_loss`` adds each tensor's *mean* of these terms (its layers'
    ``kl_div`` ends in ``kl.mean()``), so ``get_kl_loss / N`` would not be the ELBO's
    ``KL / N``; the layer's own ``kl_div`` times the tensor's size is its sum.
    """
    total = torch.zeros(())
    for layer in model.modules():
        if not hasattr(layer, "kl_loss"):
            continue
        for part in ("weight", "bias"):
            mu = getattr(layer, f"mu_{part}", None)
            if mu is None:
                continue
            sigma = torch.log1p(torch.exp(getattr(layer, f"rho_{part}")))
            prior_mu = getattr(layer, f"prior_{part}_mu")
            prior_sigma = getattr(layer, f"prior_{part}_sigma")
            total = total + layer.kl_div(mu, sigma, prior_mu, prior_sigma) * mu.numel()
    return total


def bayesian_torch(kind: str, num_train: int) -> Contestant:
    """bayesian-torch's README (dnn_to_bnn, its prior and initialisation), with the ELBO's loss
    CE + KL / N (:func:`bayesian_torch_kl`) in place of the README's CE + get_kl_loss / B."""
    from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn

    model = mlp()
    prior = {  # the README's const_bnn_prior_parameters
        "prior_mu": 0.0,
        "prior_sigma": 1.0,
        "posterior_mu_init": 0.0,
        "posterior_rho_init": -3.0,
        "type": kind,
        "moped_enable": False,
        "moped_delta": 0.5,
    }
    dnn_to_bnn(model, prior)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def train_step(x: Tensor, y: Tensor, samples: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with FORWARD():
            outputs = [model(x) for _ in range(samples)]
            ce = torch.stack([F.cross_entropy(out, y) for out in outputs]).mean()
            loss = ce + bayesian_torch_kl(model) / num_train
        loss.backward()
        optimizer.step()

    return Contestant(
        f"bayesian-torch-{kind.lower()}",
        model,
        optimizer,
        train_step,
        lambda x, samples: stack_forwards(model, x, samples),
    )


def blitz(num_train: int) -> Contestant:
    """blitz's README: @variational_estimator, sample_elbo with complexity_cost_weight = 1/N."""
    from blitz.modules import BayesianLinear
    from blitz.utils import variational_estimator

    @variational_estimator
    class BlitzMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = BayesianLinear(784, 400)
            self.fc2 = BayesianLinear(400, 400)
            self.fc3 = BayesianLinear(400, NUM_CLASSES)

        def forward(self, x: Tensor) -> Tensor:
            hidden = F.relu(self.fc1(x.flatten(1)))
            return self.fc3(F.relu(self.fc2(hidden)))

    model = BlitzMLP()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()

    def train_step(x: Tensor, y: Tensor, samples: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with FORWARD():
            loss = model.sample_elbo(
                inputs=x,
                labels=y,
                criterion=criterion,
                sample_nbr=samples,
                complexity_cost_weight=1 / num_train,
            )
        loss.backward()
        optimizer.step()

    return Contestant(
        "blitz",
        model,
        optimizer,
        train_step,
        lambda x, samples: stack_forwards(model, x, samples),
    )


def torchbayesian(num_train: int) -> Contestant:
    """torchbayesian's example: bnn.BayesianModule(net), loss = NLL + KL (here per example)."""
    import torchbayesian.bnn as bnn

    model = bnn.BayesianModule(mlp())
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def train_step(x: Tensor, y: Tensor, samples: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        with FORWARD():
            ce = torch.stack([F.cross_entropy(model(x), y) for _ in range(samples)]).mean()
            loss = ce + model.kl_divergence() / num_train
        loss.backward()
        optimizer.step()

    return Contestant(
        "torchbayesian",
        model,
        optimizer,
        train_step,
        lambda x, samples: stack_forwards(model, x, samples),
    )


PEERS: dict[str, tuple[str, Callable[[int], Contestant]]] = {
    "bayesian-torch-reparameterization": (
        "bayesian-torch",
        lambda n: bayesian_torch("Reparameterization", n),
    ),
    "bayesian-torch-flipout": ("bayesian-torch", lambda n: bayesian_torch("Flipout", n)),
    "blitz": ("blitz-bayesian-pytorch", blitz),
    "torchbayesian": ("torchbayesian", torchbayesian),
}


def load_bayes_copy(path: Path) -> ModuleType:
    """Import another copy of the ``bbb_lightning/bayes`` package as ``bayes_baseline``."""
    spec = importlib.util.spec_from_file_location(
        "bayes_baseline", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no package at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bayes_baseline"] = module
    spec.loader.exec_module(module)
    return module


# -- measuring --------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    cases: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds per call of each case: ``repeats`` rounds, order reversed every other round."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else reversed(names):
            times[name].append(timed(cases[name]))
    return times


def median_ratio(times: list[float], reference: list[float]) -> float:
    """Median over rounds of time / reference time of the same round."""
    return statistics.median(t / r for t, r in zip(times, reference, strict=True))


def ratio_quartiles(times: list[float], reference: list[float]) -> list[float]:
    """First and third quartiles over rounds of time / reference time of the same round: the
    spread of the median ratio on a noisy machine."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    if len(ratios) < 2:
        return [ratios[0], ratios[0]]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return [first, third]


_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"{key} not in /proc/self/status")
    return int(match.group(1))


def peak_rss_growth_mib(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory above the pre-call level while ``fn`` runs (Linux only)."""
    if _LIBC is None:
        return None
    try:
        gc.collect()
        _LIBC.malloc_trim(0)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        fn()
        return (_status_kib("VmHWM") - before) / 1024
    except OSError:
        return None


def state_mib(contestant: Contestant) -> float:
    """Parameters, their gradients and the optimizer state, in MiB."""
    total = 0
    for parameter in contestant.model.parameters():
        total += 2 * parameter.numel() * parameter.element_size()
    for state in contestant.optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / 2**20


# -- quality ----------------------------------------------------------------------------------
def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins: sum_b (n_b / N) |acc_b - conf_b|."""
    confidence, prediction = probs.max(-1)
    correct = (prediction == labels).double()
    index = (confidence.double() * bins).ceil().clamp(1, bins).long() - 1
    gap = torch.zeros(bins, dtype=torch.float64)
    gap.index_add_(0, index, correct - confidence.double())
    return (gap.abs().sum() / len(labels)).item()


def evaluate_quality(
    predict: Callable[[Tensor, int], Tensor], x: Tensor, y: Tensor, samples: int, batch: int
) -> dict[str, float]:
    probs = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            logits = predict(x[start : start + batch], samples)
            probs.append(F.softmax(logits.double(), dim=-1).mean(0))
    p = torch.cat(probs)
    nll = -p.gather(1, y.unsqueeze(1)).clamp_min(1e-300).log().mean().item()
    return {
        "accuracy": (p.argmax(1) == y).double().mean().item(),
        "nll": nll,
        "ece": expected_calibration_error(p, y),
    }


def train_epochs(contestant: Contestant, x: Tensor, y: Tensor, epochs: int, seed: int) -> float:
    """``epochs`` passes in a seeded order shared by all contestants; returns seconds."""
    contestant.model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(x), BATCH):
            index = order[i : i + BATCH]
            contestant.train_step(x[index], y[index], 1)
    return time.perf_counter() - start


# -- reporting --------------------------------------------------------------------------------
def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    main = results["throughput"]
    names = list(main)
    ratios = [main[n]["train_ratio"] for n in names]
    colors = [
        {
            "baseline": "grey",
            "ours": "tab:blue",
            "baseline-ours": "lightsteelblue",
            "reference": "tab:green",
        }.get(main[n]["group"], "tab:orange")
        for n in names
    ]
    quartiles = [
        main[n].get("train_ratio_quartiles") or [r, r] for n, r in zip(names, ratios, strict=True)
    ]
    spread_bars = [
        [r - q[0] for r, q in zip(ratios, quartiles, strict=True)],
        [q[1] - r for r, q in zip(ratios, quartiles, strict=True)],
    ]
    axes[0].barh(names, ratios, color=colors, xerr=spread_bars, capsize=2)
    axes[0].axvline(2.0, color="tab:red", linestyle="--", label="target 2.0x")
    axes[0].invert_yaxis()
    axes[0].set(
        xlabel="training step time / deterministic step (median, middle half of rounds)",
        title="Training step cost",
    )
    axes[0].legend(loc="upper right")

    scaling = results["sample_scaling"]
    for estimator, color in zip(ESTIMATORS, ("tab:blue", "tab:green", "tab:purple"), strict=True):
        rows = scaling.get(f"ours-{estimator}")
        if not rows:
            continue
        samples = sorted(int(s) for s in rows)
        axes[1].plot(
            samples,
            [rows[str(s)]["vectorized_over_s1"] for s in samples],  # as the table and target
            "o-",
            color=color,
            label=f"{estimator} vectorized",
        )
        axes[1].plot(
            samples,
            [rows[str(s)]["loop_over_s1"] for s in samples],  # medians of per-round ratios
            "x--",
            color=color,
            alpha=0.6,
            label=f"{estimator} loop",
        )
    axes[1].axhline(4.0, color="tab:red", linestyle="--", label="target 4x at S=16")
    axes[1].set(
        xlabel="training samples S",
        ylabel="step time / S=1 vectorized step",
        title="Training cost against S",
        xscale="log",
        xticks=[1, 4, 16],
        xticklabels=["1", "4", "16"],
    )
    axes[1].legend(fontsize=7)

    evals = results["eval_many"]
    labels, vec, loop = [], [], []
    for name, row in evals.items():
        labels.append(name)
        vec.append(row.get("vectorized_ms") or float("nan"))
        loop.append(row.get("loop_ms") or float("nan"))
    index = range(len(labels))
    axes[2].barh([i - 0.2 for i in index], loop, height=0.4, label="loop", color="tab:orange")
    axes[2].barh([i + 0.2 for i in index], vec, height=0.4, label="vectorized", color="tab:blue")
    axes[2].set_yticks(list(index), labels)
    axes[2].invert_yaxis()
    axes[2].set(
        xlabel="ms per batch of 128", title=f"{results['config']['eval_samples']}-sample evaluation"
    )
    axes[2].legend()
    fig.suptitle(
        f"MLP 784-400-400-10, MNIST, batch {BATCH}, {results['config']['threads']} CPU threads, "
        f"torch {torch.__version__} ({results['config']['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=11, help="interleaved rounds (default 11)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a fast smoke run: fewer rounds, "
        "shorter blocks, 1 epoch on 10k examples, 20-sample evaluations",
    )
    parser.add_argument("--skip-peers", action="store_true", help="ours and deterministic only")
    parser.add_argument(
        "--compiled",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the torch.compile'd reference path (default: on, off under --quick)",
    )
    parser.add_argument(
        "--quality-epochs",
        type=int,
        default=3,
        help="epochs of the fixed training budget; 0 skips the quality table",
    )
    parser.add_argument(
        "--quality-samples",
        type=int,
        default=100,
        help="samples of the predictive in the quality evaluation",
    )
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=100,
        help="samples of the many-sample evaluation benchmark",
    )
    parser.add_argument(
        "--train-samples",
        type=int,
        nargs="+",
        default=[1, 4, 16],
        help="training samples S to time (default 1 4 16; must include 1, the reference of "
        "every 'vs S=1' ratio)",
    )
    parser.add_argument(
        "--steps-per-block",
        type=int,
        default=20,
        help="training steps timed together, as a training loop runs them (S samples: "
        "block // S, at least 2)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--precision",
        choices=ForwardPrecision.CHOICES,
        default="32-true",
        help="bf16-mixed: every forward pass under bfloat16 autocast (default 32-true)",
    )
    parser.add_argument(
        "--allocator",
        choices=("retain", "default"),
        default="retain",
        help="retain: malloc keeps freed memory, as bbb_lightning.train sets it (default); "
        "default: glibc's own policy",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=REPO.parent / "shared" / "data",
        help="directory holding MNIST/ (default ../shared/data)",
    )
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another copy of bbb_lightning/bayes to compare against",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only profile (torch.profiler) the training steps, ours also with the most training "
        "samples and the many-sample evaluation, and write profile.md",
    )
    args = parser.parse_args()
    for name in ("repeats", "steps_per_block", "threads", "quality_samples", "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    if args.quality_epochs < 0:
        parser.error(
            f"--quality-epochs={args.quality_epochs}: must be 0 (no quality table) or more"
        )
    if 1 not in args.train_samples or min(args.train_samples) < 1:
        parser.error(
            f"--train-samples={args.train_samples}: must be positive and include 1, the reference "
            "of every 'vs S=1' ratio"
        )
    args.train_samples = sorted(set(args.train_samples))  # S=1 first
    return args


def main() -> None:
    args = parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.steps_per_block = min(args.steps_per_block, 3)
        args.quality_epochs = min(args.quality_epochs, 1)
        args.quality_samples = min(args.quality_samples, 20)
        args.eval_samples = min(args.eval_samples, 20)
    if args.compiled is None:
        args.compiled = not args.quick
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    FORWARD.name = args.precision
    retained = args.allocator == "retain" and retain_freed_memory()
    started = datetime.datetime.now()

    data = MNISTDataModule(args.data_dir / "MNIST", download=False, seed=args.seed)
    data.setup()
    assert data.train_set is not None and data.test_set is not None
    train_x, train_y = data.train_set.tensors
    test_x, test_y = data.test_set.tensors
    if args.quick:
        train_x, train_y = train_x[:10_000], train_y[:10_000]
    num_train = len(train_x)

    notes: list[str] = []
    versions = {"torch": torch.__version__}
    contestants: dict[str, Contestant] = {}

    def add(name: str, build: Callable[[], Contestant]) -> None:
        torch.manual_seed(args.seed)
        try:
            contestant = build()
            contestant.train_step(train_x[:BATCH], train_y[:BATCH], 1)  # fails here, not later
        except Exception as error:  # a peer that does not install, import or run
            notes.append(f"{name}: unavailable ({type(error).__name__}: {error})")
            print(f"[skip] {notes[-1]}", flush=True)
            return
        contestants[name] = contestant

    add("deterministic", lambda: deterministic(num_train))
    for estimator in ESTIMATORS:
        add(f"ours-{estimator}", lambda e=estimator: ours_contestant(ours, e, num_train))
    if args.baseline is not None:
        baseline = load_bayes_copy(args.baseline.resolve())
        for estimator in ESTIMATORS:
            add(
                f"ours-{estimator}@baseline",
                lambda e=estimator: ours_contestant(baseline, e, num_train, "@baseline"),
            )
    for estimator in ESTIMATORS:
        add(f"reference-{estimator}", lambda e=estimator: reference_contestant(e, num_train, False))
        if args.compiled:
            add(
                f"compiled-{estimator}",
                lambda e=estimator: reference_contestant(e, num_train, True),
            )
    if not args.skip_peers:
        for name, (distribution, build) in PEERS.items():
            try:
                versions[distribution] = metadata.version(distribution)
            except metadata.PackageNotFoundError:
                notes.append(
                    f"{name}: unavailable ({distribution} is not installed; "
                    f"pip install --no-deps {distribution}=={PEER_PINS[distribution]})"
                )
                print(f"[skip] {notes[-1]}", flush=True)
                continue
            if versions[distribution] != PEER_PINS[distribution]:
                notes.append(
                    f"{distribution} {versions[distribution]} installed, "
                    f"pinned {PEER_PINS[distribution]}"
                )
            add(name, lambda b=build: b(num_train))

    config = {
        "date": started.strftime("%Y-%m-%d"),
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{platform.platform()}",
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "precision": args.precision,
        "allocator": "freed memory retained" if retained else "glibc malloc defaults",
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
            if k in os.environ
        },
        "batch": BATCH,
        "lr": LR,
        "num_train": num_train,
        "repeats": args.repeats,
        "steps_per_block": args.steps_per_block,
        "eval_samples": args.eval_samples,
        "quality_epochs": args.quality_epochs,
        "quality_samples": args.quality_samples,
        "versions": versions,
    }
    print(
        f"# bench_training  {config['started']}  torch {torch.__version__}, "
        f"{config['threads']} threads, {config['cpu']}",
        flush=True,
    )

    # Fixed minibatches (no data loading in the timed region), the same for every contestant.
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(num_train, generator=generator)
    batches = [
        (train_x[order[i : i + BATCH]], train_y[order[i : i + BATCH]])
        for i in range(0, 64 * BATCH, BATCH)
    ]
    eval_x = test_x[:BATCH]
    cursor = {"i": 0}

    def next_batch() -> tuple[Tensor, Tensor]:
        cursor["i"] = (cursor["i"] + 1) % len(batches)
        return batches[cursor["i"]]

    def train_block(
        c: Contestant, samples: int, steps: int, loop: bool = False
    ) -> Callable[[], None]:
        step = c.loop_train_step if loop else c.train_step
        assert step is not None

        def run() -> None:
            c.model.train()
            for _ in range(steps):
                x, y = next_batch()
                step(x, y, samples)

        return run

    def eval_block(
        predict: Callable[[Tensor, int], Tensor], model: nn.Module, samples: int, steps: int
    ) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            with torch.inference_mode():
                for _ in range(steps):
                    predict(eval_x, samples)

        return run

    if args.profile:
        workloads = profile_workloads(
            contestants, batches, eval_x, max(args.train_samples), args.eval_samples
        )
        report = profile_steps(workloads, config, args.repeats)
        print(report)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "profile.md").write_text(report + "\n")
        return

    # 1. training and evaluation throughput, peak memory -------------------------------------
    block = args.steps_per_block
    print("timing training steps ...", flush=True)
    train_times = interleaved(
        {n: train_block(c, 1, block) for n, c in contestants.items()}, args.repeats, warmup=1
    )
    print("timing evaluation ...", flush=True)
    eval_times = interleaved(
        {n: eval_block(c.predict, c.model, 1, 2 * block) for n, c in contestants.items()},
        args.repeats,
        warmup=1,
    )
    print("measuring memory ...", flush=True)
    throughput: dict[str, dict[str, Any]] = {}
    det_train, det_eval = train_times["deterministic"], eval_times["deterministic"]
    det_peak = None
    for name, c in contestants.items():
        x, y = batches[0]
        c.model.train()  # the evaluation timing left it in eval mode
        peaks = [peak_rss_growth_mib(lambda c=c, x=x, y=y: c.train_step(x, y, 1)) for _ in range(3)]
        peak = None if None in peaks else statistics.median(p for p in peaks if p is not None)
        if name == "deterministic":
            det_peak = peak
        step_s = statistics.median(train_times[name]) / block
        eval_s = statistics.median(eval_times[name]) / (2 * block)
        throughput[name] = {
            "group": c.group,
            "train_step_ms": step_s * 1e3,
            "train_examples_per_s": BATCH / step_s,
            "train_ratio": median_ratio(train_times[name], det_train),
            "train_ratio_quartiles": ratio_quartiles(train_times[name], det_train),
            "eval_examples_per_s": BATCH / eval_s,
            "eval_ratio": median_ratio(eval_times[name], det_eval),
            "peak_step_mib": peak,
            "peak_ratio": None if peak is None or not det_peak else peak / det_peak,
            "state_mib": state_mib(c),
            "train_rounds_s": train_times[name],
            "eval_rounds_s": eval_times[name],
        }

    peers = [n for n, c in contestants.items() if c.group == "peer"]
    fastest_peer = min(peers, key=lambda n: throughput[n]["train_step_ms"]) if peers else None
    for name, row in throughput.items():
        row["throughput_over_fastest_peer"] = (
            None
            if fastest_peer is None
            else median_ratio(train_times[fastest_peer], train_times[name])
        )
        row["throughput_over_fastest_peer_quartiles"] = (
            None
            if fastest_peer is None
            else ratio_quartiles(train_times[fastest_peer], train_times[name])
        )

    # 2. S training samples: vectorized against a loop ----------------------------------------
    print("timing S training samples ...", flush=True)
    scaling_cases: dict[str, Callable[[], None]] = {}
    ours_names = [n for n, c in contestants.items() if c.loop_train_step is not None]
    steps_with = {s: max(2, block // s) for s in args.train_samples}  # steps per block
    for name in ours_names:
        c = contestants[name]
        for s, steps in steps_with.items():
            scaling_cases[f"{name}|{s}|vec"] = train_block(c, s, steps)
            scaling_cases[f"{name}|{s}|loop"] = train_block(c, s, steps, loop=True)
    scaling_cases["deterministic|1|vec"] = train_block(contestants["deterministic"], 1, block)
    scaling_times = interleaved(scaling_cases, args.repeats, warmup=1)
    det_scaling = [t / block for t in scaling_times["deterministic|1|vec"]]
    sample_scaling: dict[str, dict[str, dict[str, float]]] = {}
    for name in ours_names:
        rows: dict[str, dict[str, float]] = {}
        first = args.train_samples[0]
        s1 = [t / steps_with[first] for t in scaling_times[f"{name}|{first}|vec"]]
        for s, steps in steps_with.items():
            vec = [t / steps for t in scaling_times[f"{name}|{s}|vec"]]
            loop = [t / steps for t in scaling_times[f"{name}|{s}|loop"]]
            rows[str(s)] = {
                "vectorized_ms": statistics.median(vec) * 1e3,
                "loop_ms": statistics.median(loop) * 1e3,
                "loop_over_vectorized": median_ratio(loop, vec),
                "vectorized_over_s1": median_ratio(vec, s1),
                "loop_over_s1": median_ratio(loop, s1),
                "vectorized_over_s1_quartiles": ratio_quartiles(vec, s1),
                "vectorized_over_deterministic": median_ratio(vec, det_scaling),
            }
        sample_scaling[name] = rows

    # 3. many-sample evaluation ---------------------------------------------------------------
    print(f"timing {args.eval_samples}-sample evaluation ...", flush=True)
    s_eval = args.eval_samples
    eval_cases: dict[str, Callable[[], None]] = {
        "deterministic|vec": eval_block(
            contestants["deterministic"].predict, contestants["deterministic"].model, 1, 1
        )
    }
    for name, c in contestants.items():
        if name == "deterministic":
            continue
        if c.loop_predict is not None:
            eval_cases[f"{name}|vec"] = eval_block(c.predict, c.model, s_eval, 1)
            eval_cases[f"{name}|loop"] = eval_block(c.loop_predict, c.model, s_eval, 1)
        else:
            eval_cases[f"{name}|loop"] = eval_block(c.predict, c.model, s_eval, 1)
    eval_many_times = interleaved(eval_cases, args.repeats, warmup=1)
    eval_many: dict[str, dict[str, Any]] = {}
    det_many = eval_many_times["deterministic|vec"]
    for name, c in contestants.items():
        if name == "deterministic":
            continue
        vec = eval_many_times.get(f"{name}|vec")
        loop = eval_many_times[f"{name}|loop"]
        peak = peak_rss_growth_mib(eval_block(c.predict, c.model, s_eval, 1))
        eval_many[name] = {
            "vectorized_ms": None if vec is None else statistics.median(vec) * 1e3,
            "loop_ms": statistics.median(loop) * 1e3,
            "loop_over_vectorized": None if vec is None else median_ratio(loop, vec),
            "loop_over_vectorized_quartiles": None if vec is None else ratio_quartiles(loop, vec),
            "best_over_deterministic_forward": median_ratio(vec if vec else loop, det_many),
            "peak_mib": peak,
        }

    # 4. quality after a fixed budget ---------------------------------------------------------
    quality: dict[str, dict[str, float]] = {}
    if args.quality_epochs > 0:
        for name in contestants:
            if name.endswith("@baseline"):
                continue
            print(f"training {name} for {args.quality_epochs} epochs ...", flush=True)
            torch.manual_seed(args.seed)
            fresh = rebuild(name, num_train)
            seconds = train_epochs(fresh, train_x, train_y, args.quality_epochs, args.seed)
            fresh.model.eval()
            torch.manual_seed(args.seed + 1)
            samples = 1 if name == "deterministic" else args.quality_samples
            quality[name] = {
                **evaluate_quality(fresh.predict, test_x, test_y, samples, batch=500),
                "train_seconds": seconds,
                "samples": samples,
            }

    results = {
        "config": config,
        "notes": notes,
        "fastest_peer": fastest_peer,
        "throughput": throughput,
        "sample_scaling": sample_scaling,
        "eval_many": eval_many,
        "quality": quality,
        # seconds of every block of every round (throughput rows carry their own): S-scaling
        # blocks run steps_per_block[S] steps, many-sample evaluation blocks one predictive
        "sample_scaling_rounds_s": {
            "steps_per_block": {str(s): steps for s, steps in steps_with.items()},
            "blocks": scaling_times,
        },
        "eval_many_rounds_s": eval_many_times,
    }
    results["targets"] = targets(results)
    report = render(results)
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_training.json").write_text(json.dumps(results, indent=1))
    (args.out_dir / "bench_training.md").write_text(report + "\n")
    plot(results, args.out_dir / "bench_training.png")
    print(f"wrote {args.out_dir / 'bench_training.json'}, .md and .png")


def rebuild(name: str, num_train: int) -> Contestant:
    """A fresh (untrained) copy of contestant ``name``, built with the same seed."""
    if name == "deterministic":
        return deterministic(num_train)
    if name.startswith("ours-"):
        return ours_contestant(ours, name.removeprefix("ours-"), num_train)
    return PEERS[name][1](num_train)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


PROFILE_CATEGORIES = {  # operator (aten, or our native kernels) -> where the time goes
    "matrix products": ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"),
    "random numbers": (
        "aten::normal_",
        "aten::randint",
        "aten::random_",
        "aten::bernoulli_",
        "aten::uniform_",
        "bbb_lightning::normal_",
        "bbb_lightning::scaled_normal_",
        "bbb_lightning::random_signs_",
        "bbb_lightning::local_noise",
    ),
    "other native kernels": (
        "bbb_lightning::local_noise_backward",
        "bbb_lightning::sample_with_kl",
        "bbb_lightning::sample_with_kl_backward",
        "bbb_lightning::softplus_scale",
        "bbb_lightning::kl_rho_grad",
    ),
    "transcendental": (
        "aten::softplus",
        "aten::softplus_backward",
        "aten::sigmoid",
        "aten::log",
        "aten::log1p",
        "aten::exp",
        "aten::sqrt",
        "aten::pow",
    ),
}


def profile_workloads(
    contestants: dict[str, Contestant],
    batches: list[tuple[Tensor, Tensor]],
    eval_x: Tensor,
    train_samples: int,
    eval_samples: int,
) -> dict[str, tuple[Callable[[], None], int]]:
    """What ``--profile`` measures, each as (one unit of work, units per profiled round): the
    one-sample training step of every contestant; for ours, also the step with
    ``train_samples`` samples and the ``eval_samples``-sample predictive, vectorized and as a
    loop of forwards (the two targets that are ratios between our own runs)."""
    cursor = {"i": 0}

    def train(c: Contestant, samples: int) -> Callable[[], None]:
        def run() -> None:
            cursor["i"] = (cursor["i"] + 1) % len(batches)
            c.model.train()
            c.train_step(*batches[cursor["i"]], samples)

        return run

    def predict(c: Contestant, fn: Callable[[Tensor, int], Tensor]) -> Callable[[], None]:
        def run() -> None:
            c.model.eval()
            with torch.inference_mode():
                fn(eval_x, eval_samples)

        return run

    workloads = {f"{name}, S=1 step": (train(c, 1), 10) for name, c in contestants.items()}
    for name, c in contestants.items():
        if c.group != "ours" or c.loop_predict is None:
            continue
        workloads[f"{name}, S={train_samples} step"] = (train(c, train_samples), 4)
        workloads[f"{name}, {eval_samples}-sample evaluation"] = (predict(c, c.predict), 2)
        loop = f"{name}, {eval_samples}-sample evaluation as a loop"
        workloads[loop] = (predict(c, c.loop_predict), 1)
    return workloads


def profile_steps(
    workloads: dict[str, tuple[Callable[[], None], int]], config: dict, repeats: int
) -> str:
    """torch.profiler over each workload: self CPU ms per unit of work by category, the
    optimizer's share, and the top operators (medians over interleaved rounds)."""
    from torch.profiler import ProfilerActivity, profile

    columns = [*PROFILE_CATEGORIES, "optimizer", "other"]
    per_round: dict[str, list[dict[str, float]]] = {name: [] for name in workloads}
    for run, _ in workloads.values():
        for _ in range(2):
            run()
    for round_ in range(repeats):
        names = list(workloads) if round_ % 2 == 0 else list(reversed(workloads))
        for name in names:
            run, units = workloads[name]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(units):
                    run()
            ops: dict[str, float] = {"total": 0.0, "optimizer": 0.0}
            for event in prof.events():
                ms = event.self_cpu_time_total / units / 1e3
                ops["total"] += ms
                parent = event
                while parent is not None and not parent.name.startswith("Optimizer.step"):
                    parent = parent.cpu_parent
                key = "optimizer" if parent is not None else event.name
                ops[key] = ops.get(key, 0.0) + ms
            per_round[name].append(ops)

    rows, tops = [], []
    for name, rounds in per_round.items():

        def median_of(pick: Callable[[dict[str, float]], float], rounds=rounds) -> float:
            return statistics.median(pick(ops) for ops in rounds)

        values = {
            category: median_of(lambda ops, o=op_names: sum(ops.get(op, 0.0) for op in o))
            for category, op_names in PROFILE_CATEGORIES.items()
        }
        values["optimizer"] = median_of(lambda ops: ops["optimizer"])
        total = median_of(lambda ops: ops["total"])
        values["other"] = total - sum(values.values())
        rows.append([name, f"{total:.2f}", *(f"{values[c]:.2f}" for c in columns)])
        op_names = {op for ops in rounds for op in ops} - {"total", "optimizer"}
        ranked = sorted(
            ((op, median_of(lambda ops, op=op: ops.get(op, 0.0))) for op in op_names),
            key=lambda item: item[1],
            reverse=True,
        )[:8]
        tops.append(
            f"- {name}: " + ", ".join(f"{op.removeprefix('aten::')} {ms:.2f}" for op, ms in ranked)
        )
    lines = [
        f"## Where the time goes ({config['date']}, {config['cpu']}, "
        f"{config['threads']} threads, torch {config['versions']['torch']}, "
        f"{config['allocator']})",
        "",
        f"Command: `{config['command']}`. Self CPU ms per unit of work (a training step, or one "
        f"predictive of {BATCH} examples) under torch.profiler: medians of {repeats} "
        "interleaved rounds. The profiler adds microseconds per operator, so code made of many "
        "small operators looks slower than it runs. Our native draws count as random numbers: "
        "`local_noise` (local reparameterization's pre-activations, mean + sqrt(variance) eps in "
        "one pass), `scaled_normal_` (a weight draw without gradients, mu + sigma eps in one "
        "pass), `random_signs_` (flipout's signs) and `normal_`. `other native kernels`: the "
        "posterior's joint node (draw, perturbation or variance with the KL's sums) and its "
        "backward, and the backward of `local_noise`. `optimizer`: everything "
        "inside `Adam.step`; the other columns and "
        "the top operators exclude it; `other`: the rest (elementwise work, autograd and "
        "Python overhead).",
        "",
        markdown(["workload", "total", *columns], rows),
        "",
        "Top operators (self CPU ms per unit of work):",
        "",
        *tops,
    ]
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    rows: list[dict[str, Any]] = []
    ours_rows = {n: r for n, r in results["throughput"].items() if r["group"] == "ours"}
    if ours_rows:
        best = min(ours_rows, key=lambda n: ours_rows[n]["train_ratio"])
        value = ours_rows[best]["train_ratio"]
        rows.append(
            {
                "target": "best estimator's training step <= 2.0x deterministic",
                "measured": f"{best}: {value:.2f}x"
                + spread(ours_rows[best].get("train_ratio_quartiles")),
                "met": value <= 2.0,
            }
        )
        if results["fastest_peer"] is not None:
            best_peer = max(ours_rows, key=lambda n: ours_rows[n]["throughput_over_fastest_peer"])
            value = ours_rows[best_peer]["throughput_over_fastest_peer"]
            rows.append(
                {
                    "target": "throughput >= 1.4x the fastest peer",
                    "measured": f"{best_peer}: {value:.2f}x {results['fastest_peer']}"
                    + spread(ours_rows[best_peer].get("throughput_over_fastest_peer_quartiles")),
                    "met": value >= 1.4,
                }
            )
    for name, by_s in results["sample_scaling"].items():
        if name.endswith("@baseline") or "16" not in by_s or "1" not in by_s:
            continue
        value = by_s["16"]["vectorized_over_s1"]
        rows.append(
            {
                "target": "S=16 training step <= 4x S=1",
                "measured": f"{name}: {value:.2f}x"
                + spread(by_s["16"].get("vectorized_over_s1_quartiles")),
                "met": value <= 4.0,
            }
        )
    for name, r in results["eval_many"].items():
        if not name.startswith("ours-") or name.endswith("@baseline"):
            continue
        value = r["loop_over_vectorized"]
        rows.append(
            {
                "target": f"{results['config']['eval_samples']}-sample evaluation >= 10x faster "
                "than a loop",
                "measured": f"{name}: {value:.2f}x"
                + spread(r.get("loop_over_vectorized_quartiles")),
                "met": value >= 10.0,
            }
        )
    quality = results["quality"]
    peer_quality = {
        n: q
        for n, q in quality.items()
        if n in results["throughput"] and results["throughput"][n]["group"] == "peer"
    }
    if peer_quality:
        best_acc = max(q["accuracy"] for q in peer_quality.values())
        best_nll = min(q["nll"] for q in peer_quality.values())
        best_ece = min(q["ece"] for q in peer_quality.values())
        for name, q in quality.items():
            if not name.startswith("ours-"):
                continue
            met = q["accuracy"] >= best_acc and q["nll"] <= best_nll and q["ece"] <= best_ece
            rows.append(
                {
                    "target": "quality >= best peer on accuracy, NLL and ECE",
                    "measured": f"{name}: {100 * q['accuracy']:.2f} % / {q['nll']:.4f} / "
                    f"{100 * q['ece']:.2f} % (best peers {100 * best_acc:.2f} % / {best_nll:.4f} / "
                    f"{100 * best_ece:.2f} %)",
                    "met": met,
                }
            )
    return rows


def spread(quartiles: list[float] | None) -> str:
    """`` (a-bx)``: the middle half of the per-round ratios, or nothing if not measured."""
    return "" if not quartiles else f" ({quartiles[0]:.2f}-{quartiles[1]:.2f}x)"


def render(results: dict[str, Any]) -> str:
    cfg = results["config"]
    out = [
        f"## bench_training: {cfg['date']}, {cfg['cpu']}, {cfg['threads']} threads, "
        f"torch {cfg['versions']['torch']}",
        "",
        f"Command: `{cfg['command']}`. MLP 784-400-400-10, MNIST, batch {cfg['batch']}, Adam lr "
        f"{cfg['lr']}; precision {cfg.get('precision', '32-true')}; "
        f"malloc: {cfg.get('allocator', 'glibc malloc defaults')}; medians of "
        f"{cfg['repeats']} interleaved rounds; x = ratio to the deterministic network in the "
        "same rounds (time, or memory); (a-bx) = the middle half of the per-round ratios.",
        "",
        "### Training and evaluation (1 posterior sample)",
        "",
    ]
    rows = []
    for name, r in results["throughput"].items():
        rows.append(
            [
                name,
                fmt(r["train_step_ms"]),
                fmt(r["train_examples_per_s"], ".0f"),
                fmt(r["train_ratio"], ".2f", "x") + spread(r.get("train_ratio_quartiles")),
                fmt(r["eval_examples_per_s"], ".0f"),
                fmt(r["eval_ratio"], ".2f", "x"),
                fmt(r["peak_step_mib"], ".1f"),
                fmt(r["peak_ratio"], ".1f", "x"),
                fmt(r["state_mib"], ".1f"),
                fmt(r["throughput_over_fastest_peer"], ".2f", "x")
                + spread(r.get("throughput_over_fastest_peer_quartiles")),
            ]
        )
    out.append(
        markdown(
            [
                "contestant",
                "train step ms",
                "train ex/s",
                "train cost",
                "eval ex/s",
                "eval cost",
                "step peak MiB",
                "peak",
                "state MiB",
                "ex/s vs fastest peer",
            ],
            rows,
        )
    )
    out += ["", "### S training samples (vectorized `sample_forward` against a Python loop)", ""]
    rows = []
    for name, by_s in results["sample_scaling"].items():
        for s, r in by_s.items():
            rows.append(
                [
                    name,
                    s,
                    fmt(r["vectorized_ms"]),
                    fmt(r["loop_ms"]),
                    fmt(r["loop_over_vectorized"], ".2f", "x"),
                    fmt(r["vectorized_over_s1"], ".2f", "x")
                    + spread(r.get("vectorized_over_s1_quartiles")),
                    fmt(r["vectorized_over_deterministic"], ".2f", "x"),
                ]
            )
    out.append(
        markdown(
            [
                "contestant",
                "S",
                "vectorized ms",
                "loop ms",
                "loop / vectorized",
                "vs S=1",
                "vs deterministic",
            ],
            rows,
        )
    )
    out += ["", f"### {cfg['eval_samples']}-sample evaluation (batch of {cfg['batch']})", ""]
    rows = []
    for name, r in results["eval_many"].items():
        rows.append(
            [
                name,
                fmt(r["vectorized_ms"]),
                fmt(r["loop_ms"]),
                fmt(r["loop_over_vectorized"], ".2f", "x")
                + spread(r.get("loop_over_vectorized_quartiles")),
                fmt(r["best_over_deterministic_forward"], ".0f", "x"),
                fmt(r["peak_mib"], ".0f"),
            ]
        )
    out.append(
        markdown(
            [
                "contestant",
                "vectorized ms",
                "loop ms",
                "loop / vectorized",
                "vs one deterministic forward",
                "peak MiB",
            ],
            rows,
        )
    )
    if results["quality"]:
        out += [
            "",
            f"### Quality after {cfg['quality_epochs']} epochs (test set, "
            f"{cfg['quality_samples']}-sample predictive)",
            "",
        ]
        rows = [
            [
                name,
                fmt(100 * q["accuracy"], ".2f", " %"),
                fmt(q["nll"], ".4f"),
                fmt(100 * q["ece"], ".2f", " %"),
                fmt(q["train_seconds"], ".0f", " s"),
            ]
            for name, q in results["quality"].items()
        ]
        out.append(markdown(["contestant", "accuracy", "NLL", "ECE", "training time"], rows))
    if results["targets"]:
        out += ["", "### Targets", ""]
        out.append(
            markdown(
                ["target", "measured", "met"],
                [
                    [t["target"], t["measured"], "yes" if t["met"] else "**no**"]
                    for t in results["targets"]
                ],
            )
        )
    if results["notes"]:
        out += ["", "Notes:", *[f"- {note}" for note in results["notes"]]]
    return "\n".join(out)


if __name__ == "__main__":
    main()
