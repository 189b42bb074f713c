"""The reference path: the mean-field Gaussian posterior's math in plain torch ops.

These functions are the definition of what every faster route computes (the CPU kernels of
:mod:`bbb_lightning.bayes.native`, the fused autograd nodes of
:mod:`bbb_lightning.bayes.gaussian_ops`): each is written once, differentiable by autograd,
and traceable by ``torch.compile`` and ``torch.func``. Tests compare the fast routes against
them.

For q(w) = N(mu, sigma^2) with sigma = softplus(rho) + min_scale and a prior N(m, s^2):

- :func:`scale`: sigma = softplus(rho) + min_scale;
- :func:`log_softplus` / :func:`log_scale`: log sigma, finite with a finite gradient for any
  finite rho (softplus(rho) underflows in float32 below rho ~ -103);
- :func:`gaussian_kl`: KL(q || p) = log s - log sigma + (sigma^2 + (mu - m)^2) / (2 s^2) - 1/2,
  elementwise;
- :func:`gaussian_sample`: w = mu + sigma * eps, eps ~ N(0, I) (weight reparameterization);
- :func:`gaussian_entropy`: H(q) = log sigma + log(2 pi e) / 2, elementwise.

Example:
    >>> rho = torch.tensor([0.0, -60.0])
    >>> scale(rho)
    tensor([6.9315e-01, 8.7565e-27])
    >>> log_scale(rho)
    tensor([ -0.3665, -60.0000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TINY_RHO",
    "gaussian_entropy",
    "gaussian_kl",
    "gaussian_sample",
    "log_scale",
    "log_softplus",
    "scale",
]

# Below this rho softplus(rho) = e^rho (1 + O(e^rho)), a few ulps from underflow in float32:
# log softplus(rho) uses its expansion rho - e^rho / 2 there.
TINY_RHO = -20.0


def scale(rho: Tensor, min_scale: float = 0.0) -> Tensor:
    """sigma = softplus(rho) + min_scale, > 0 for rho > -87 in float32 (or any min_scale > 0)."""
    sigma = F.softplus(rho)
    return sigma + min_scale if min_scale else sigma


def log_softplus(rho: Tensor) -> Tensor:
    """log softplus(rho), finite with a finite gradient for any finite rho.

    For rho < -20, log softplus(rho) = rho - exp(rho) / 2 + O(exp(2 rho)). Both branches are
    evaluated, each clamped to its side so that neither overflows (a NaN in the unused branch
    would still poison the gradient of ``torch.where``).
    """
    tiny = rho - 0.5 * rho.clamp_max(TINY_RHO).exp()
    return torch.where(rho < TINY_RHO, tiny, F.softplus(rho.clamp_min(TINY_RHO)).log())


def log_scale(rho: Tensor, min_scale: float = 0.0) -> Tensor:
    """log sigma for sigma = softplus(rho) + min_scale, finite for any finite rho."""
    return scale(rho, min_scale).log() if min_scale else log_softplus(rho)


def gaussian_kl(
    mu: Tensor, sigma: Tensor, log_sigma: Tensor, loc: Tensor, prior_scale: Tensor
) -> Tensor:
    """KL(N(mu, sigma^2) || N(loc, prior_scale^2)) elementwise (broadcast), written with
    ``log_sigma`` rather than log(sigma^2), so that it stays finite where sigma^2 underflows."""
    mean_term = (sigma.square() + (mu - loc).square()) / (2 * prior_scale.square())
    return prior_scale.log() - log_sigma + mean_term - 0.5


def gaussian_sample(mu: Tensor | None, sigma: Tensor, sample_shape: Sequence[int] = ()) -> Tensor:
    """mu + sigma * eps with eps ~ N(0, I) of shape ``sample_shape + sigma.shape``; sigma * eps
    (a draw minus its mean, flipout's perturbation) where ``mu`` is None."""
    eps = torch.randn((*sample_shape, *sigma.shape), dtype=sigma.dtype, device=sigma.device)
    return eps * sigma if mu is None else mu + sigma * eps


def gaussian_entropy(log_sigma: Tensor) -> Tensor:
    """H(N(mu, sigma^2)) = log sigma + log(2 pi e) / 2, elementwise."""
    return log_sigma + 0.5 * math.log(2.0 * math.pi * math.e)
