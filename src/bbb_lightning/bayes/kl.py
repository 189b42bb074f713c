"""KL(q || p) between the variational posterior and the prior of a Bayesian network.

"Closed form if registered, else Monte Carlo" (as in pyro): for each variational tensor we ask
``torch.distributions.kl_divergence(q, p)``; torch's registry knows Normal-Normal and
Normal-Laplace, and a custom pair joins it through ``torch.distributions.kl.register_kl``.
For a :class:`MeanFieldNormal` posterior those two pairs are computed here instead, written with
log sigma, so that the KL and its gradient stay finite for tiny sigma in float32.
When no closed form is registered (e.g. Blundell's scale-mixture prior), the KL is estimated
by Monte Carlo at the weights w_s used in the last forward pass (Blundell et al. 2015, eq. 2):

    KL(q || p) ~= (1/S) sum_s [log q(w_s) - log p(w_s)],

which is unbiased and differentiable through the reparameterization w_s = mu + sigma eps_s.
For a :class:`MeanFieldNormal` posterior the log q term is replaced by its exact expectation,
-H(q): same expectation and same gradients in exact arithmetic (see :func:`posterior_kl`),
and no division by an underflowed sigma^2.
Layers that draw no weight (local reparameterization) or a tensor not used since the last
KL get a fresh draw instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import Laplace, Normal
from torch.distributions import kl_divergence as distribution_kl

from .posteriors import MeanFieldNormal, VariationalPosterior, named_posteriors

__all__ = ["KL_REDUCTIONS", "kl_divergence", "posterior_kl"]

KL_REDUCTIONS = ("sum", "mean")


def posterior_kl(posterior: VariationalPosterior, monte_carlo: bool = False) -> Tensor:
    """KL(q || p) of one tensor, summed over its elements.

    Args:
        posterior: q, with its prior p attached.
        monte_carlo: force the Monte Carlo estimate even where a closed form exists.
    """
    p = posterior.prior.distribution()
    if not monte_carlo and isinstance(posterior, MeanFieldNormal) and type(p) in _STABLE_KL:
        return _STABLE_KL[type(p)](posterior, p).sum()
    q = posterior.distribution()
    if not monte_carlo:
        try:
            return distribution_kl(q, p).sum()
        except NotImplementedError:
            pass
    weights = posterior.last_sample
    if weights is None:
        weights = posterior.rsample()
    num_draws = weights.numel() // posterior.mean.numel()
    cross_entropy = -p.log_prob(weights).sum() / num_draws
    if isinstance(posterior, MeanFieldNormal):
        # E_q[log q] = -H(q) in closed form (with log sigma): log q(mu + sigma eps) =
        # -eps^2/2 - log sigma - log(2 pi)/2 differs from -H(q) by a term with zero gradient, so
        # the gradients are those of eq. 2, the expectation is the same, and it stays finite
        # where log q(w) would divide by an underflowed sigma^2.
        neg_entropy = -(posterior.log_scale + 0.5 * math.log(2.0 * math.pi * math.e))
        return neg_entropy.sum() + cross_entropy
    return q.log_prob(weights).sum() / num_draws + cross_entropy


# torch's closed forms go through sigma^2 and 1/sigma^2, so in float32 their KL or its gradient
# turns inf or NaN once sigma ~ 1e-22 (rho ~ -50, reachable after one big SGD step on rho).
# The same closed forms written with log sigma (MeanFieldNormal.log_scale) stay finite.
def _normal_normal_kl(q: MeanFieldNormal, p: Normal) -> Tensor:
    """KL(N(mu, sigma^2) || N(m, s^2)) = log s/sigma + (sigma^2 + (mu - m)^2) / 2 s^2 - 1/2."""
    mean_term = (q.scale.square() + (q.mu - p.loc).square()) / (2 * p.scale.square())
    return p.scale.log() - q.log_scale + mean_term - 0.5


def _normal_laplace_kl(q: MeanFieldNormal, p: Laplace) -> Tensor:
    """KL(N(mu, sigma^2) || Laplace(m, b)) = log 2b - log sigma - log(2 pi e) / 2 + E|w - m| / b.

    E|w - m| = d erf(z) + sigma sqrt(2 / pi) exp(-z^2) with d = mu - m, z = d / (sigma sqrt 2);
    z is clipped to +-10 (erf = +-1, exp(-z^2) = 0 to float64 precision there).
    """
    d = q.mu - p.loc
    z = (d * torch.exp(-q.log_scale.clamp_min(-80.0)) / math.sqrt(2.0)).clamp(-10.0, 10.0)
    mean_abs = d * torch.erf(z) + q.scale * math.sqrt(2.0 / math.pi) * torch.exp(-z.square())
    entropy = 0.5 * math.log(2.0 * math.pi * math.e) + q.log_scale
    return (2.0 * p.scale).log() - entropy + mean_abs / p.scale


_STABLE_KL: dict[type, Callable[[MeanFieldNormal, Any], Tensor]] = {
    Normal: _normal_normal_kl,
    Laplace: _normal_laplace_kl,
}


def kl_divergence(net: nn.Module, reduction: str = "sum", monte_carlo: bool = False) -> Tensor:
    """KL(q || p) over all variational tensors of ``net``.

    Args:
        net: a network made Bayesian by :func:`~bbb_lightning.bayes.bayesianize`.
        reduction: ``"sum"`` is the KL of the ELBO. ``"mean"`` divides it by the number of
            variational weights: a common heuristic that down-weights the prior, not the ELBO.
        monte_carlo: use the Monte Carlo estimate for every tensor.

    Example:
        >>> import torch
        >>> from bbb_lightning.bayes import bayesianize
        >>> from bbb_lightning.bayes.priors import GaussianPrior
        >>> from bbb_lightning.bayes.posteriors import MeanFieldNormal
        >>> from functools import partial
        >>> net = bayesianize(nn.Linear(2, 1), prior=GaussianPrior(0.0, 1.0),
        ...                   posterior=partial(MeanFieldNormal, rho_init=0.5413))
        >>> with torch.no_grad():
        ...     _ = net.parametrizations.weight[0].mu.zero_()
        ...     _ = net.parametrizations.bias[0].mu.zero_()
        >>> round(kl_divergence(net).item(), 4)  # 3 x KL(N(0, 1) || N(0, 1)) at sigma = 1
        0.0
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(
            f"kl reduction must be one of {', '.join(KL_REDUCTIONS)}; got {reduction!r}"
        )
    total: Tensor | None = None
    count = 0
    for _, posterior in named_posteriors(net):
        term = posterior_kl(posterior, monte_carlo)
        total = term if total is None else total + term
        count += posterior.mean.numel()
    if total is None:
        raise ValueError("the network has no variational parameters; call bayesianize() first")
    return total / count if reduction == "mean" else total
