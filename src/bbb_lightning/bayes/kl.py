"""KL(q || p) between the variational posterior and the prior of a Bayesian network.

"Closed form if registered, else Monte Carlo" (as in pyro): for each variational tensor we ask
``torch.distributions.kl_divergence(q, p)``, torch's one KL registry. A custom prior or posterior
joins it with ``torch.distributions.kl.register_kl``; this module registers the Gaussian
posterior (:class:`~bbb_lightning.bayes.posteriors.SoftplusNormal`) against Normal and Laplace
priors, written with log sigma so that the KL and its gradient stay finite where torch's generic
formulas (through sigma^2 and 1/sigma^2) overflow in float32 (sigma ~ 1e-22, rho ~ -50, one
big SGD step on rho away).

A posterior may compute its summed closed-form KL faster than through the registry
(:meth:`~bbb_lightning.bayes.posteriors.VariationalPosterior.fused_kl`): the Gaussian posterior
against a Gaussian prior does, where the native kernels serve its tensors, in one autograd node
(:mod:`bbb_lightning.bayes.gaussian_ops`); it is the same formula as the registered one. Where
the forward pass of the same step already computed that KL with its draw and wrote it into a
:class:`~bbb_lightning.bayes.forward_pass.KLRecord` (``record=``, as
:func:`~bbb_lightning.bayes.sample_forward_with_kl` passes it), it is used as is.

Without a closed form (e.g. Blundell's scale-mixture prior) the KL is estimated by Monte Carlo
at the weights w_s the recorded forward pass used (Blundell et al. 2015, eq. 2):

    KL(q || p) = -H(q) - E_q[log p(w)] ~= -H(q) - (1/S) sum_s log p(w_s).

Where q has a closed-form entropy (the Gaussian posterior does) it replaces the sampled
(1/S) sum_s log q(w_s): the expectation and the reparameterization gradients are the same
(log q(mu + sigma eps) = -eps^2/2 - log sigma - log(2 pi)/2, whose eps term has no gradient), and
nothing divides by an underflowed sigma^2. Otherwise log q(w_s) is sampled too. Without a
record, for layers that draw no weight (local reparameterization), for a tensor the pass did
not use, and for draws made without gradients when the KL wants them, a fresh draw serves
instead: an estimate as unbiased. A network that ``sample_forward`` runs as S calls (one with
parametrized tensors or a batch norm using its batch's statistics) records the draws of all S
calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Laplace, Normal, register_kl
from torch.distributions.kl import _dispatch_kl

from . import functional
from .forward_pass import KLRecord
from .posteriors import SoftplusNormal, VariationalPosterior, all_posteriors

__all__ = ["KL_REDUCTIONS", "kl_divergence", "look_up_closed_forms", "posterior_kl"]

KL_REDUCTIONS = ("sum", "mean")


@register_kl(SoftplusNormal, Normal)
def _kl_softplus_normal_normal(q: SoftplusNormal, p: Normal) -> Tensor:
    """KL(N(mu, sigma^2) || N(m, s^2)) = log s/sigma + (sigma^2 + (mu - m)^2) / 2 s^2 - 1/2."""
    return functional.gaussian_kl(q.loc, q.scale, q.log_scale, p.loc, p.scale)


@register_kl(SoftplusNormal, Laplace)
def _kl_softplus_normal_laplace(q: SoftplusNormal, p: Laplace) -> Tensor:
    """KL(N(mu, sigma^2) || Laplace(m, b)) = log 2b - H(q) + E|w - m| / b.

    E|w - m| = d erf(z) + sigma sqrt(2 / pi) exp(-z^2) with d = mu - m, z = d / (sigma sqrt 2);
    z is clipped to +-10 (erf = +-1, exp(-z^2) = 0 to float64 precision there).
    """
    d = q.loc - p.loc
    z = (d * torch.exp(-q.log_scale.clamp_min(-80.0)) / math.sqrt(2.0)).clamp(-10.0, 10.0)
    mean_abs = d * torch.erf(z) + q.scale * math.sqrt(2.0 / math.pi) * torch.exp(-z.square())
    return (2.0 * p.scale).log() - q.entropy() + mean_abs / p.scale


def posterior_kl(
    posterior: VariationalPosterior, monte_carlo: bool = False, record: KLRecord | None = None
) -> Tensor:
    """KL(q || p) of one tensor, summed over its elements.

    The closed form where one exists (the forward pass's from ``record``, the posterior's fused
    one, or torch's registry, in that order), else the Monte Carlo estimate at the draws in
    ``record`` (a fresh draw where it holds none).

    Args:
        posterior: q, with its prior p attached.
        monte_carlo: sample E_q[log p(w)] even where a closed-form KL exists.
        record: what the forward pass of the same step recorded, if anything.
    """
    if not monte_carlo:
        recorded = None if record is None else record.kls.get(posterior)
        if recorded is not None:
            return recorded
    p = posterior.prior.distribution()
    if not monte_carlo:
        fused = posterior.fused_kl(p)
        if fused is not None:
            return fused
    q = posterior.distribution()
    if not monte_carlo:
        registered = _registered_kl(type(q), type(p))
        if registered is not None:
            return registered(q, p).sum()
    weights = None if record is None else record.sample(posterior)
    if weights is None or _lacks_the_graph(weights, posterior):
        weights = posterior.rsample()
    num_draws = weights.numel() // posterior.mean.numel()
    cross_entropy = -p.log_prob(weights).sum() / num_draws
    try:
        return cross_entropy - q.entropy().sum()
    except NotImplementedError:
        return cross_entropy + q.log_prob(weights).sum() / num_draws


_REGISTERED: dict[tuple[type, type], Callable[[Distribution, Distribution], Tensor] | None] = {}


def _registered_kl(
    posterior: type[Distribution], prior: type[Distribution]
) -> Callable[[Distribution, Distribution], Tensor] | None:
    """The closed form torch's KL registry holds for these types (the most specific match, as
    ``torch.distributions.kl_divergence`` picks it), or None; memoized per pair of types, so
    that after the first step (eager, or a first compiled trace) only a dictionary is read."""
    key = (posterior, prior)
    if key not in _REGISTERED:
        found = _dispatch_kl(posterior, prior)
        _REGISTERED[key] = None if found is NotImplemented else found
    return _REGISTERED[key]


def look_up_closed_forms(net: nn.Module) -> None:
    """Find, eagerly, the registered closed form (or its absence) for every posterior/prior
    pair of ``net``, as :func:`posterior_kl` will ask. :func:`~bbb_lightning.bayes.bayesianize`
    calls it, so that a KL traced by ``torch.compile(fullgraph=True)`` only reads the memo
    (torch's own lookup, behind a lock and a ``min`` over a generator, cannot be traced)."""
    with torch.no_grad():
        for posterior in all_posteriors(net):
            try:
                q = posterior.distribution()
            except NotImplementedError:  # no distribution: the KL is its Monte Carlo estimate
                continue
            _registered_kl(type(q), type(posterior.prior.distribution()))


def _lacks_the_graph(weights: Tensor, posterior: VariationalPosterior) -> bool:
    """Whether ``weights`` were drawn without gradients (an evaluation forward) while the KL
    is wanted with them: log p(w) would then carry no gradient to mu and rho."""
    return (
        torch.is_grad_enabled()
        and not weights.requires_grad
        and any(parameter.requires_grad for parameter in posterior.parameters())
    )


def kl_divergence(
    net: nn.Module,
    reduction: str = "sum",
    monte_carlo: bool = False,
    record: KLRecord | None = None,
) -> Tensor:
    """KL(q || p) over all variational tensors of ``net``.

    Args:
        net: a network made Bayesian by :func:`~bbb_lightning.bayes.bayesianize`.
        reduction: ``"sum"`` is the KL of the ELBO. ``"mean"`` divides it by the number of
            variational weights: a common heuristic that down-weights the prior, not the ELBO.
        monte_carlo: use the Monte Carlo estimate for every tensor.
        record: what a forward pass of the same step recorded
            (:func:`~bbb_lightning.bayes.sample_forward_with_kl` passes it): its closed-form
            KLs and its draws for the Monte Carlo ones.

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
    terms: list[Tensor] = []
    count = 0
    for posterior in all_posteriors(net):
        terms.append(posterior_kl(posterior, monte_carlo, record))
        count += posterior.mean.numel()
    if not terms:
        raise ValueError("the network has no variational parameters; call bayesianize() first")
    total = _sum_of(terms)
    return total / count if reduction == "mean" else total


def _sum_of(terms: list[Tensor]) -> Tensor:
    """The sum of 0-dim tensors: one stack and one sum (two autograd nodes, not one per term)
    where they share a device, else added one by one."""
    if len(terms) == 1:
        return terms[0]
    device = terms[0].device
    if all(term.device == device for term in terms):
        return torch.stack(terms).sum()
    return sum(terms[1:], terms[0])
