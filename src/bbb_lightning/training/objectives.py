"""Likelihoods, the predictive distribution, and the minibatch negative ELBO with KL weighting.

Notation: minibatch i of M per epoch (i = 1..M; with gradient accumulation, optimizer step i
of M), B examples in it, N in the training set, S Monte Carlo samples w_s ~ q(w). The
per-minibatch objective (Blundell et al. 2015, eq. 8-9) is

    F_i = NLL_i + kl_weight_i * KL(q || p),
    NLL_i = -(1/S) sum_s sum_b log p(y_b | x_b, w_s),

and we minimise F_i / B (per example, so that curves and learning rates compare across batch
sizes). ``kl_weight_i = beta * warmup(t) * pi_i`` with

- ``uniform``:   pi_i = 1 / M                        (Graves 2011)
- ``minibatch``: pi_i = 2^(M-i) / (2^M - 1)          (Blundell 2015; sum_i pi_i = 1, early
  minibatches of an epoch carry most of the KL, later ones almost none)
- ``warmup(t) = min(1, t / warmup_steps)`` at optimizer step t (1 when warmup_steps = 0).

Both weightings put exactly one KL into an epoch, so with beta = 1 the epoch's sum of F_i is an
unbiased estimate of the negative ELBO. ``reduction="mean"`` (KL divided by the number of
weights) is a common heuristic that is not the ELBO.

The predictive distribution averages the S sampled likelihoods (probabilities, not logits):
p(y | x) ~= (1/S) sum_s p(y | x, w_s), so its NLL is a log-mean-exp over samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bayes.arguments import is_integer, is_real
from ..bayes.kl import KL_REDUCTIONS

__all__ = [
    "KL_WEIGHTINGS",
    "CategoricalLikelihood",
    "GaussianLikelihood",
    "KLTerm",
    "Likelihood",
    "log_mean_exp",
]

KL_WEIGHTINGS = ("uniform", "minibatch")
NOISE_MODELS = ("fixed", "homoscedastic", "heteroscedastic")
_NO_IGNORED_CLASS = torch.iinfo(torch.int64).min  # cross_entropy's ignore_index: none


def log_mean_exp(values: Tensor, dim: int = 0) -> Tensor:
    """log((1/S) sum_s exp(values_s)) along ``dim``, computed stably."""
    return torch.logsumexp(values, dim=dim) - math.log(values.shape[dim])


class Likelihood(nn.Module):
    """p(y | f(x; w)) for one network output f; learnable noise lives here, not in the net."""

    task: str
    num_outputs: int
    """How many outputs the network needs."""

    def log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """log p(y | f) per example: outputs (..., B, out) -> (..., B)."""
        raise NotImplementedError

    def check_outputs(self, outputs: Tensor) -> None:
        """A ValueError unless ``outputs`` end in ``num_outputs`` values per example."""
        if outputs.dim() < 2 or outputs.shape[-1] != self.num_outputs:
            raise ValueError(
                f"network outputs of shape {tuple(outputs.shape)} do not fit the {self.task} "
                f"likelihood: it needs (B, num_outputs) per sample, num_outputs={self.num_outputs}"
            )

    def _check_targets(self, targets: Tensor, expected: tuple[int, ...], what: str) -> None:
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"{self.task} targets of shape {tuple(targets.shape)} do not fit a batch of "
                f"{expected[0]}: the likelihood needs shape {expected} ({what})"
            )

    def expected_nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The ELBO's data term as the loss uses it: sum_b (1/S) sum_s -log p(y_b | f_s,b), the
        Monte Carlo estimate of sum_b E_q[-log p(y_b | x_b, w)] from S posterior samples, for
        outputs of shape (S, B, out). A 0-dim tensor."""
        return -self.log_prob(outputs, targets).mean(0).sum()

    def predictive_nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """-log (1/S) sum_s p(y | f_s) per example, for outputs of shape (S, B, out)."""
        return -log_mean_exp(self.log_prob(outputs, targets), dim=0)


class CategoricalLikelihood(Likelihood):
    """p(y | f) = softmax(f)_y, f the logits of ``num_classes`` classes."""

    task = "classification"

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if not (is_integer(num_classes) and num_classes >= 2):
            raise ValueError(f"likelihood num_classes must be an integer >= 2, got {num_classes!r}")
        self.num_classes = self.num_outputs = int(num_classes)

    def log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """log softmax(f)_y: outputs (..., B, C), targets (B,) integer class indices of any
        integer dtype (int64, int32, uint8, ...)."""
        self._check_class_indices(outputs, targets)
        log_probs = F.log_softmax(outputs, dim=-1)
        index = targets.long().expand(*outputs.shape[:-1]).unsqueeze(-1)
        return log_probs.gather(-1, index).squeeze(-1)

    def expected_nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sum_b (1/S) sum_s -log softmax(f_s,b)_y_b for outputs (S, B, C): one fused
        cross-entropy over the S B rows (two autograd nodes instead of six). A subclass that
        redefines :meth:`log_prob` gets the generic mean of its ``log_prob`` instead."""
        if outputs.dim() != 3 or type(self).log_prob is not CategoricalLikelihood.log_prob:
            return super().expected_nll(outputs, targets)
        self._check_class_indices(outputs, targets)
        samples = outputs.shape[0]
        rows = targets.long().expand(samples, -1).reshape(-1)
        total = F.cross_entropy(
            outputs.reshape(-1, outputs.shape[-1]),
            rows,
            reduction="sum",
            # no class index is skipped (the default skips -100, which on a GPU, where the
            # range is not checked here, would silently drop such an example from the loss)
            ignore_index=_NO_IGNORED_CLASS,
        )
        return total / samples

    def _check_class_indices(self, outputs: Tensor, targets: Tensor) -> None:
        """A ValueError unless ``targets`` are one class index in [0, C) per example."""
        self.check_outputs(outputs)
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                f"classification targets of dtype {targets.dtype} are not class indices: an "
                "integer dtype (e.g. torch.int64) is needed"
            )
        self._check_targets(targets, tuple(outputs.shape[-2:-1]), "one class index per example")
        # gather() and cross_entropy would fail with 'out of bounds'; checked on the CPU only,
        # where it costs no device synchronisation (a GPU stops at its device-side assert)
        if targets.device.type != "cpu" or not targets.numel():
            return
        low, high = (int(bound) for bound in torch.aminmax(targets))
        if low < 0 or high >= self.num_classes:
            raise ValueError(
                f"classification targets from {low} to {high} "
                f"are not all class indices in [0, {self.num_classes}) "
                f"(num_classes={self.num_classes})"
            )

    @staticmethod
    def predictive_probs(outputs: Tensor) -> Tensor:
        """(1/S) sum_s softmax(f_s): outputs (S, B, C) -> (B, C)."""
        return F.softmax(outputs, dim=-1).mean(dim=0)


class GaussianLikelihood(Likelihood):
    """p(y | f) = N(y; mean(f), sigma^2), elementwise over the ``target_dim`` target dimensions.

    Noise models: ``fixed`` (sigma = ``noise_std``), ``homoscedastic`` (one learned sigma per
    target dimension, initialised at ``noise_std``), ``heteroscedastic`` (the network outputs
    mean and a raw scale per dimension; sigma = softplus(raw) + ``min_std``).
    """

    task = "regression"

    def __init__(
        self,
        target_dim: int = 1,
        noise: str = "homoscedastic",
        noise_std: float = 0.1,
        min_std: float = 1e-4,
    ) -> None:
        super().__init__()
        if not (is_integer(target_dim) and target_dim >= 1):
            raise ValueError(f"likelihood target_dim must be an integer >= 1, got {target_dim!r}")
        target_dim = int(target_dim)
        if noise not in NOISE_MODELS:
            raise ValueError(
                f"likelihood noise must be one of {', '.join(NOISE_MODELS)}; got {noise!r}"
            )
        if not (is_real(min_std) and math.isfinite(min_std) and min_std >= 0):
            raise ValueError(f"likelihood min_std must be a finite number >= 0, got {min_std!r}")
        if not (is_real(noise_std) and math.isfinite(noise_std) and noise_std > min_std):
            raise ValueError(
                f"likelihood noise_std must be a finite number > min_std={min_std!r}, "
                f"got {noise_std!r}"
            )
        self.noise = noise
        self.min_std = float(min_std)
        self.target_dim = target_dim
        self.num_outputs = 2 * target_dim if noise == "heteroscedastic" else target_dim
        # softplus^-1(s) = log(e^s - 1) = s + log(1 - e^-s) of s = noise_std - min_std (the
        # second form does not overflow for s > 709): sigma = softplus(raw) + min_std = noise_std
        excess = float(noise_std) - self.min_std
        raw = torch.full((target_dim,), excess + math.log(-math.expm1(-excess)))
        if noise == "homoscedastic":
            self.raw_std = nn.Parameter(raw)
        else:
            self.register_buffer("raw_std", raw)

    def mean_and_std(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted mean and noise sigma, each of the target's shape."""
        self.check_outputs(outputs)
        if self.noise == "heteroscedastic":
            mean, raw = outputs.chunk(2, dim=-1)
            return mean, F.softplus(raw) + self.min_std
        return outputs, (F.softplus(self.raw_std) + self.min_std).expand_as(outputs)

    def log_prob(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """sum_d log N(y_d; mean_d, sigma_d^2): outputs (..., B, num_outputs), targets
        (B, target_dim)."""
        mean, std = self.mean_and_std(outputs)
        expected = (outputs.shape[-2], self.target_dim)
        self._check_targets(targets, expected, f"target_dim={self.target_dim} values per example")
        log_density = -0.5 * ((targets - mean) / std) ** 2 - std.log() - 0.5 * math.log(2 * math.pi)
        return log_density.sum(dim=-1)

    def predictive_moments(self, outputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, epistemic and aleatoric variance of the predictive mixture over S samples.

        mean = (1/S) sum_s m_s; epistemic = Var_s(m_s); aleatoric = (1/S) sum_s sigma_s^2;
        the predictive variance is their sum (law of total variance).
        """
        mean, std = self.mean_and_std(outputs)
        return mean.mean(0), mean.var(0, unbiased=False), std.square().mean(0)


@dataclass(frozen=True)
class KLTerm:
    """How the KL enters each minibatch's loss: kl_weight_i = scale * warmup(t) * pi_i.

    ``reduction`` and ``monte_carlo`` are passed on to
    :func:`bbb_lightning.bayes.kl_divergence` (``monte_carlo`` forces the sampled estimate
    even where a closed form exists).

    Example:
        >>> w = KLTerm(weighting="minibatch")
        >>> [round(w.weight(i, num_batches=3, step=0), 4) for i in range(3)]
        [0.5714, 0.2857, 0.1429]
    """

    weighting: str = "uniform"
    reduction: str = "sum"
    scale: float = 1.0
    warmup_steps: int = 0
    monte_carlo: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in KL_WEIGHTINGS:
            raise ValueError(
                f"kl.weighting must be one of {', '.join(KL_WEIGHTINGS)}; got {self.weighting!r}"
            )
        if self.reduction not in KL_REDUCTIONS:
            raise ValueError(
                f"kl.reduction must be one of {', '.join(KL_REDUCTIONS)}; got {self.reduction!r}"
            )
        scale, warmup_steps = self.scale, self.warmup_steps
        if not (is_real(scale) and math.isfinite(scale) and scale >= 0):
            raise ValueError(f"kl.scale must be a finite number >= 0, got {scale!r}")
        # (inf made the KL weight 0 for ever, nan turned the warm-up off)
        if not (is_integer(warmup_steps) and warmup_steps >= 0):
            raise ValueError(f"kl.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if self.monte_carlo is not None and not isinstance(self.monte_carlo, bool):
            raise ValueError(f"kl.monte_carlo must be true or false, got {self.monte_carlo!r}")

    def minibatch_share(self, batch_index: int, num_batches: int) -> float:
        """pi_i for the 0-based ``batch_index`` (i = batch_index + 1) of ``num_batches``."""
        if self.weighting == "uniform":
            return 1.0 / num_batches
        # 2^(M-i) / (2^M - 1) = 2^-i / (1 - 2^-M), without overflow for large M.
        return math.ldexp(1.0, -(batch_index + 1)) / -math.expm1(-num_batches * math.log(2))

    def warmup(self, step: int) -> float:
        """Linear warm-up factor min(1, t / warmup_steps), t the optimizer steps taken before
        this one (0 at the first, whose KL weight is then 0)."""
        return 1.0 if self.warmup_steps == 0 else min(1.0, step / self.warmup_steps)

    def weight(self, batch_index: int, num_batches: int, step: int) -> float:
        """The multiplier of KL(q || p) in the loss of this minibatch."""
        return self.scale * self.warmup(step) * self.minibatch_share(batch_index, num_batches)
