"""Vectorized ``sample_forward(net, x, S)`` against a Python loop of S single forwards.

The network is the MLP 784-400-400-10 (ReLU) made Bayesian with each estimator; the batch is
128 MNIST-sized inputs. Two workloads:

- eval: ``torch.no_grad()``, ``net.eval()``, S in (1, 4, 16, 100) by default;
- train: forward + backward of the mean cross-entropy over the S samples plus the KL,
  S in (4, 16) by default.

Repeats are interleaved (every case once per round, the order of the two methods alternating
between rounds) and the median per case is reported with the ratio loop / vectorized (> 1:
the vectorized forward is faster). Run from the repository root::

    python benchmarks/bench_sample_forward.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbb_lightning.bayes import ESTIMATORS, bayesianize, kl_divergence, sample_forward


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
    )


def vectorized(net: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    return sample_forward(net, x, num_samples)


def loop(net: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    return torch.stack([net(x) for _ in range(num_samples)])


def eval_step(
    method: Callable[[nn.Module, Tensor, int], Tensor], net: nn.Module, x: Tensor, s: int
) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            method(net, x, s)

    return run


def train_step(
    method: Callable[[nn.Module, Tensor, int], Tensor],
    net: nn.Module,
    x: Tensor,
    labels: Tensor,
    s: int,
) -> Callable[[], None]:
    def run() -> None:
        net.zero_grad(set_to_none=True)
        logits = method(net, x, s)  # (S, B, 10)
        nll = F.cross_entropy(logits.flatten(0, 1), labels.repeat(s))
        (nll + kl_divergence(net) / 60_000).backward()

    return run


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per case")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--samples", type=int, nargs="+", default=[1, 4, 16, 100], help="S for eval"
    )
    parser.add_argument("--train-samples", type=int, nargs="+", default=[4, 16], help="S for train")
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.batch, 784)
    labels = torch.randint(0, 10, (args.batch,))

    cases: list[tuple[str, str, int, Callable[[], None], Callable[[], None]]] = []
    for estimator in args.estimators:
        net = bayesianize(mlp(), estimator=estimator)
        net.eval()
        for s in args.samples:
            cases.append(
                (
                    estimator,
                    "eval",
                    s,
                    eval_step(vectorized, net, x, s),
                    eval_step(loop, net, x, s),
                )
            )
        train_net = bayesianize(mlp(), estimator=estimator)
        for s in args.train_samples:
            cases.append(
                (
                    estimator,
                    "train",
                    s,
                    train_step(vectorized, train_net, x, labels, s),
                    train_step(loop, train_net, x, labels, s),
                )
            )

    for *_, fast, slow in cases:  # warm-up: allocator, kernels, lazy imports
        fast()
        slow()
    times: dict[int, tuple[list[float], list[float]]] = {i: ([], []) for i in range(len(cases))}
    for round_ in range(args.repeats):
        for i, (*_, fast, slow) in enumerate(cases):
            if round_ % 2:
                times[i][1].append(timed(slow))
                times[i][0].append(timed(fast))
            else:
                times[i][0].append(timed(fast))
                times[i][1].append(timed(slow))

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP 784-400-400-10, "
        f"batch {args.batch}, median of {args.repeats} interleaved rounds (ms)"
    )
    header = f"{'estimator':<20}{'mode':<7}{'S':>5}{'vectorized':>12}{'loop':>10}{'loop/vec':>10}"
    print(header)
    print("-" * len(header))
    for i, (estimator, mode, s, _, _) in enumerate(cases):
        fast = statistics.median(times[i][0]) * 1e3
        slow = statistics.median(times[i][1]) * 1e3
        print(f"{estimator:<20}{mode:<7}{s:>5}{fast:>12.2f}{slow:>10.2f}{slow / fast:>9.2f}x")


if __name__ == "__main__":
    main()
