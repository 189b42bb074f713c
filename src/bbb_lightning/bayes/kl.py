"""KL(q || p) between the variational posterior and the prior of a Bayesian network.

"Closed form if registered, else Monte Carlo" (as in pyro): for each variational tensor we ask
``torch.distributions.kl_divergence(q, p)``; torch's registry knows Normal-Normal and
Normal-Laplace, and a custom pair joins it through ``torch.distributions.kl.register_kl``.
When no closed form is registered (e.g. Blundell's scale-mixture prior), the KL is estimated
by Monte Carlo at the weights w_s used in the last forward pass (Blundell et al. 2015, eq. 2):

    KL(q || p) ~= (1/S) sum_s [log q(w_s) - log p(w_s)],

which is unbiased and differentiable through the reparameterization w_s = mu + sigma eps_s.
Layers that draw no weight (local reparameterization) or a tensor not used since the last
KL get a fresh draw instead.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributions import kl_divergence as distribution_kl

from .posteriors import VariationalPosterior, named_posteriors

__all__ = ["KL_REDUCTIONS", "kl_divergence", "posterior_kl"]

KL_REDUCTIONS = ("sum", "mean")


def posterior_kl(posterior: VariationalPosterior, monte_carlo: bool = False) -> Tensor:
    """KL(q || p) of one tensor, summed over its elements.

    Args:
        posterior: q, with its prior p attached.
        monte_carlo: force the Monte Carlo estimate even where a closed form exists.
    """
    q = posterior.distribution()
    p = posterior.prior.distribution()
    if not monte_carlo:
        try:
            return distribution_kl(q, p).sum()
        except NotImplementedError:
            pass
    weights = posterior.last_sample
    if weights is None:
        weights = posterior.rsample()
    num_draws = weights.numel() // posterior.mean.numel()
    return (q.log_prob(weights) - p.log_prob(weights)).sum() / num_draws


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
