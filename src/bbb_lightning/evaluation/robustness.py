"""Input gradients under posterior sampling, and FGSM / PGD attacks on a Bayesian classifier.

For a loss L(f(x; w), y) the input gradient depends on the weights. Under the posterior it is
a random variable; its expectation over draws w_s ~ q(w),

    E_q[∇_x L(f(x; w), y)] ~= (1/D) sum_s ∇_x L(f(x; w_s), y),

is what :func:`expected_input_gradient` returns (each draw is a plain network from
:func:`~bbb_lightning.bayes.sample_network`, so autograd on x works as for any network).

Attacks (L∞, each step clamped to the data range [lo, hi]):

- FGSM (Goodfellow et al. 2015): x' = clip(x + ε sign ∇_x L).
- PGD (Madry et al. 2018): ``steps`` steps of size α = ``step_size`` · ε / steps, each
  x ← clip(Π_ε(x + α sign ∇_x L)), from x (no random start, so results are deterministic
  for the deterministic networks).

against three models of the same posterior:

- ``mean``: the posterior-mean network.
- ``draw``: single posterior draws (each attacked and scored on its own, accuracy averaged).
- ``predictive``: the Monte Carlo predictive p̄(y | x) = (1/S) sum_s softmax(f(x; w_s)); the
  loss is -log p̄(y | x) with fresh draws at each step, so its gradient averages the draws'
  gradients (weighted by their likelihoods); accuracy is scored with fresh draws.

Classification only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bayes import posterior_mean_network, sample_forward, sample_network

__all__ = [
    "ATTACKS",
    "SETTINGS",
    "adversarial_accuracy",
    "cross_entropy_sum",
    "expected_input_gradient",
    "fgsm",
    "input_gradients",
    "pgd",
    "predictive_log_probs",
]

ATTACKS = ("fgsm", "pgd")
SETTINGS = ("mean", "draw", "predictive")

LossFn = Callable[[Tensor, Tensor], Tensor]
Bounds = tuple[float, float]


def cross_entropy_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy: each example's input gradient is then its own loss's gradient."""
    return F.cross_entropy(logits, targets, reduction="sum")


def input_gradients(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy_sum,
    num_draws: int = 10,
) -> Tensor:
    """∇_x L(f(x; w_s), y) for ``num_draws`` posterior draws: shape (D, *x.shape).

    With the default summed loss, row b of each gradient is d loss_b / d x_b.

    Example:
        >>> from bbb_lightning.bayes import bayesianize
        >>> net = bayesianize(nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
        >>> input_gradients(net, x, y, num_draws=4).shape
        torch.Size([4, 5, 3])
    """
    if not (isinstance(num_draws, int) and num_draws >= 1):
        raise ValueError(f"num_draws must be an integer >= 1, got {num_draws!r}")
    gradients = []
    for _ in range(num_draws):
        plain = sample_network(net)
        gradients.append(_gradient(lambda inputs, f=plain: loss_fn(f(inputs), y), x))
    return torch.stack(gradients)


def expected_input_gradient(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn = cross_entropy_sum,
    num_draws: int = 10,
) -> Tensor:
    """(1/D) sum_s ∇_x L(f(x; w_s), y), the Monte Carlo expectation over posterior draws."""
    return input_gradients(net, x, y, loss_fn, num_draws).mean(0)


def _gradient(loss_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_of(inputs), inputs)
    return gradient


def predictive_log_probs(net: nn.Module, x: Tensor, num_samples: int) -> Tensor:
    """log p̄(y | x) = log (1/S) sum_s softmax(f(x; w_s)), (B, C), differentiable in x."""
    log_probs = F.log_softmax(sample_forward(net, x, num_samples), dim=-1)
    return torch.logsumexp(log_probs, dim=0) - math.log(num_samples)


def fgsm(loss_of: Callable[[Tensor], Tensor], x: Tensor, epsilon: float, bounds: Bounds) -> Tensor:
    """One signed-gradient step of size ε that increases ``loss_of``, clamped to ``bounds``."""
    gradient = _gradient(loss_of, x)
    return (x + epsilon * gradient.sign()).clamp(*bounds).detach()


def pgd(
    loss_of: Callable[[Tensor], Tensor],
    x: Tensor,
    epsilon: float,
    bounds: Bounds,
    steps: int = 10,
    step_size: float = 2.5,
) -> Tensor:
    """Projected gradient ascent on ``loss_of`` in the L∞ ball of radius ε around x.

    Each of the ``steps`` steps moves by α = step_size · ε / steps along the gradient's sign,
    projects onto the ball and clamps to ``bounds``.
    """
    alpha = step_size * epsilon / steps
    adversarial = x.detach().clone()
    for _ in range(steps):
        gradient = _gradient(loss_of, adversarial)
        adversarial = adversarial + alpha * gradient.sign()
        adversarial = torch.minimum(torch.maximum(adversarial, x - epsilon), x + epsilon)
        adversarial = adversarial.clamp(*bounds).detach()
    return adversarial


def _attack(
    method: str,
    loss_of: Callable[[Tensor], Tensor],
    x: Tensor,
    epsilon: float,
    bounds: Bounds,
    steps: int,
    step_size: float,
) -> Tensor:
    if epsilon == 0:
        return x
    if method == "fgsm":
        return fgsm(loss_of, x, epsilon, bounds)
    return pgd(loss_of, x, epsilon, bounds, steps, step_size)


def _accuracy(logits_or_log_probs: Tensor, y: Tensor) -> float:
    return (logits_or_log_probs.argmax(-1) == y).float().mean().item()


def adversarial_accuracy(
    net: nn.Module,
    x: Tensor,
    y: Tensor,
    epsilons: Sequence[float],
    method: str = "fgsm",
    setting: str = "mean",
    bounds: Bounds = (-math.inf, math.inf),
    num_samples: int = 10,
    num_draws: int = 3,
    steps: int = 10,
    step_size: float = 2.5,
) -> list[float]:
    """Accuracy on adversarial examples for each ε, for one attack and one setting.

    Args:
        net: the Bayesian network (posterior).
        x, y: clean inputs and class indices.
        epsilons: L∞ radii, in the input's units.
        method: ``fgsm`` or ``pgd``.
        setting: ``mean``, ``draw`` or ``predictive`` (see the module docstring).
        bounds: the data range each adversarial input is clamped to.
        num_samples: S of the predictive (per attack step and for scoring).
        num_draws: how many single draws are attacked and averaged (``draw``).
        steps, step_size: PGD iterations and step size factor (α = step_size · ε / steps).
    """
    if method not in ATTACKS:
        raise ValueError(f"attack method must be one of {', '.join(ATTACKS)}; got {method!r}")
    if setting not in SETTINGS:
        raise ValueError(f"attack setting must be one of {', '.join(SETTINGS)}; got {setting!r}")

    def attack(loss_of: Callable[[Tensor], Tensor], epsilon: float) -> Tensor:
        return _attack(method, loss_of, x, epsilon, bounds, steps, step_size)

    with torch.no_grad():
        if setting == "predictive":

            def loss_of(inputs: Tensor) -> Tensor:
                return F.nll_loss(
                    predictive_log_probs(net, inputs, num_samples), y, reduction="sum"
                )

            return [
                _accuracy(predictive_log_probs(net, attack(loss_of, eps), num_samples), y)
                for eps in epsilons
            ]
        plain_nets = (
            [posterior_mean_network(net)]
            if setting == "mean"
            else [sample_network(net) for _ in range(num_draws)]
        )
        accuracies = torch.zeros(len(epsilons), dtype=torch.float64)
        for plain in plain_nets:
            plain.eval()
            for index, eps in enumerate(epsilons):
                adversarial = attack(lambda inputs, f=plain: cross_entropy_sum(f(inputs), y), eps)
                accuracies[index] += _accuracy(plain(adversarial), y)
        return (accuracies / len(plain_nets)).tolist()
