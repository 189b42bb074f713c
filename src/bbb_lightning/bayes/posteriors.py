"""Variational posteriors q(w) over one weight tensor.

A posterior is an ``nn.Module`` that owns the trainable variational parameters of one tensor
of the network and the :class:`~bbb_lightning.bayes.priors.Prior` of that tensor. Calling it
(``posterior()``) draws w ~ q by reparameterization and remembers the draw, so that the Monte
Carlo KL can be evaluated at the weights used in the forward pass (Blundell et al. 2015). It is
also a valid ``torch.nn.utils.parametrize`` parametrization with no original tensors, which is
how any ``nn.Parameter`` of any module becomes variational while the module's own ``forward``
stays untouched.

To add a posterior, subclass :class:`VariationalPosterior`: implement ``distribution``,
``mean`` and ``rsample``; pass the class (or a ``functools.partial`` of it) as ``posterior=``
to :func:`~bbb_lightning.bayes.bayesianize`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence
from functools import cached_property
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from . import gaussian_ops
from ._arguments import is_real
from .priors import GaussianPrior, Prior

__all__ = [
    "MeanFieldNormal",
    "PosteriorFactory",
    "SoftplusNormal",
    "VariationalPosterior",
    "all_posteriors",
    "joint_uses",
    "log_softplus",
    "named_posteriors",
    "posterior_scales",
    "signal_to_noise",
]


def log_softplus(rho: Tensor) -> Tensor:
    """log softplus(rho), finite with a finite gradient for any finite rho.

    ``softplus(rho).log()`` is not: in float32 softplus(rho) underflows below rho ~ -103 (and
    sigma^2 below rho ~ -50). For rho < -20, log softplus(rho) = rho - exp(rho) / 2 + O(exp(2 rho)).
    """
    # Both branches are evaluated: clamp each to its side so that neither overflows (a NaN in
    # the unused branch would still poison the gradient of torch.where).
    tiny = rho - 0.5 * rho.clamp_max(-20).exp()
    return torch.where(rho < -20, tiny, F.softplus(rho.clamp_min(-20)).log())


class SoftplusNormal(Normal):
    """N(loc, scale^2) that also knows log(scale) computed stably from rho.

    Its closed-form KLs against ``Normal`` and ``Laplace`` priors are registered in torch's KL
    registry (:mod:`bbb_lightning.bayes.kl`) and use ``log_scale`` instead of log(scale^2), and
    so does :meth:`entropy`: all stay finite where sigma^2 underflows.
    """

    def __init__(self, loc: Tensor, scale: Tensor, log_scale: Callable[[], Tensor]) -> None:
        super().__init__(loc, scale, validate_args=False)
        self._log_scale = log_scale

    @cached_property
    def log_scale(self) -> Tensor:
        return self._log_scale()

    def entropy(self) -> Tensor:
        return 0.5 * math.log(2.0 * math.pi * math.e) + self.log_scale


class VariationalPosterior(nn.Module):
    """Base class: q(w) for one tensor, with its prior p(w) attached as ``self.prior``.

    ``frozen`` (set by :func:`~bbb_lightning.bayes.freeze`) makes ``forward`` return the mean
    instead of a draw.
    """

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior
        self.frozen = False
        self._last_sample: Tensor | None = None
        self._last_perturbation: Tensor | None = None

    def distribution(self) -> Distribution:
        """q(w) as a ``torch.distributions`` object with the tensor's shape as batch shape."""
        raise NotImplementedError

    @property
    def mean(self) -> Tensor:
        """E_q[w], the tensor's shape."""
        raise NotImplementedError

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        """A reparameterized draw of shape ``sample_shape + mean.shape``."""
        raise NotImplementedError

    def kl_from_forward(self) -> Tensor | None:
        """The summed KL(q || p) that the last forward computed with its draw, while it is
        still that of the current parameters and prior, else None (the default): asked first,
        before the prior's distribution is built. It must agree with the registered closed form."""
        return None

    def fused_kl(self, prior: Distribution) -> Tensor | None:
        """KL(q || p) summed over the tensor by a faster route than torch's KL registry, or
        None where there is none (the default); it must agree with the registered closed form."""
        return None

    @property
    def last_sample(self) -> Tensor | None:
        """The weights w_s the last forward pass used, shape ``sample_shape + mean.shape``, for
        the Monte Carlo KL; None where it drew none (local reparameterization)."""
        if self._last_perturbation is not None:
            return self.mean + self._last_perturbation
        return self._last_sample

    @last_sample.setter
    def last_sample(self, sample: Tensor | None) -> None:
        self._remember(sample, None)

    def remember_sample(self, sample: Tensor) -> None:
        """``last_sample = sample``, without Module.__setattr__ (a layer that drew its weight
        and bias together does this every step)."""
        self._remember(sample, None)

    def forget_last_sample(self) -> None:
        """``last_sample = None``, without Module.__setattr__ (the KL does this every step)."""
        self._remember(None, None)

    def remember_perturbation(self, perturbation: Tensor) -> None:
        """Remember mean + ``perturbation`` (flipout's draw) as :attr:`last_sample` without
        computing it: only the Monte Carlo KL needs it, and it is a pass over S x the weights."""
        self._remember(None, perturbation)

    def _remember(self, sample: Tensor | None, perturbation: Tensor | None) -> None:
        # Plain attributes, written past Module.__setattr__ (microseconds per call, every step).
        self.__dict__.update(_last_sample=sample, _last_perturbation=perturbation)

    def forward(self) -> Tensor:
        """The weight for one forward pass: a draw from q (remembered), or the mean if frozen."""
        if self.frozen:
            return self.mean
        weight = self.rsample()
        self._remember(weight, None)
        return weight

    def right_inverse(self, value: Tensor) -> tuple[()]:
        """``module.weight = value`` on a parametrized module sets the posterior mean."""
        self.set_mean_(value)
        return ()

    def set_mean_(self, value: Tensor) -> None:
        """Overwrite the posterior mean in place (e.g. with pretrained weights)."""
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        # The remembered draw is part of an autograd graph: it cannot be deep-copied or pickled.
        return {**self.__dict__, "_last_sample": None, "_last_perturbation": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state.pop("last_sample", None)  # the attribute of earlier versions, now a property
        super().__setstate__({**state, "_last_sample": None, "_last_perturbation": None})


class PosteriorFactory(Protocol):
    """Builds the posterior of one tensor; a :class:`VariationalPosterior` class qualifies."""

    def __call__(self, initial_value: Tensor, prior: Prior) -> VariationalPosterior: ...


RhoInit = float | Sequence[float]


class MeanFieldNormal(VariationalPosterior):
    """Mean-field Gaussian q(w) = N(mu, sigma^2), sigma = softplus(rho) + min_scale.

    ``softplus`` is ``torch.nn.functional.softplus`` (linear above rho = 20, exp below), so
    sigma is finite for any finite rho and strictly positive for rho > -87 in float32
    (rho in [-50, 50] gives sigma in [2e-22, 50]). ``min_scale`` is an optional floor.

    Args:
        initial_value: becomes mu, so a pretrained network starts where it was.
        prior: p(w) for this tensor.
        rho_init: a constant, or ``(low, high)`` for rho ~ U(low, high). The default
            U(-5, -4) (sigma between 0.0067 and 0.018) trains well on MNIST.
        min_scale: floor added to sigma (default 0).

    Example:
        >>> from bbb_lightning.bayes.priors import GaussianPrior
        >>> q = MeanFieldNormal(torch.zeros(3), GaussianPrior(), rho_init=0.0)
        >>> q.scale
        tensor([0.6931, 0.6931, 0.6931], grad_fn=<SoftplusBackward0>)
    """

    def __init__(
        self,
        initial_value: Tensor,
        prior: Prior,
        rho_init: RhoInit = (-5.0, -4.0),
        min_scale: float = 0.0,
    ) -> None:
        super().__init__(prior)
        if not (is_real(min_scale) and min_scale >= 0 and math.isfinite(min_scale)):
            raise ValueError(f"posterior min_scale must be a finite number >= 0, got {min_scale!r}")
        self.mu = nn.Parameter(initial_value.detach().clone())
        self.rho = nn.Parameter(torch.empty_like(self.mu))
        self.min_scale = float(min_scale)
        self.rho_init = rho_init
        self._scale_values: gaussian_ops.ScaleValues | None = None
        self._kl_slot: gaussian_ops.KLSlot | None = None
        self.reset_rho()

    def reset_rho(self) -> None:
        """Re-initialise rho from ``rho_init`` (constant or uniform range)."""
        rho_init = self.rho_init
        allowed = "a number or [low, high] with low <= high"
        number = is_real(rho_init)
        values = [rho_init] if number else rho_init
        if not (
            (number or (isinstance(values, Sequence) and not isinstance(values, str | bytes)))
            and all(is_real(v) for v in values)
        ):
            raise ValueError(f"posterior rho_init must be {allowed}, got {rho_init!r}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"posterior rho_init must be finite, got {rho_init!r}")
        with torch.no_grad():
            if number:
                self.rho.fill_(float(rho_init))
            elif len(values) == 2 and values[0] <= values[1]:
                self.rho.uniform_(float(values[0]), float(values[1]))
            else:
                raise ValueError(f"posterior rho_init must be {allowed}, got {rho_init!r}")

    @property
    def scale(self) -> Tensor:
        """sigma = softplus(rho) + min_scale > 0."""
        scale = F.softplus(self.rho)
        return scale + self.min_scale if self.min_scale else scale

    @property
    def log_scale(self) -> Tensor:
        """log sigma, finite with a finite gradient for any finite rho (:func:`log_softplus`)."""
        return self.scale.log() if self.min_scale else log_softplus(self.rho)

    @property
    def mean(self) -> Tensor:
        return self.mu

    def distribution(self) -> SoftplusNormal:
        return SoftplusNormal(self.mu, self.scale, lambda: self.log_scale)

    # -- the fast path (bbb_lightning.bayes.gaussian_ops) used by the layers and the KL --------
    def scale_values(self, reuse: bool = False) -> gaussian_ops.ScaleValues:
        """sigma outside autograd. Each forward computes it afresh (``reuse=False``); the KL
        reuses the last forward's while rho is the same tensor, unmodified since."""
        values = self._scale_values
        if not (reuse and values is not None and values.matches(self.rho)):
            # When the forward is recorded, a KL follows: the native pass also sums log sigma.
            log_sum = gaussian_ops.tracked(self.rho)
            values = gaussian_ops.ScaleValues(self.rho, self.min_scale, log_sum=log_sum)
            self.__dict__["_scale_values"] = values  # a plain attribute: skip Module.__setattr__
        return values

    def _scalar_gaussian_prior(self) -> tuple[float, float] | None:
        """(loc, scale) if the prior is a constant scalar ``GaussianPrior``, else None."""
        prior = self._modules["prior"]  # past Module.__getattr__: this runs every step
        if type(prior) is not GaussianPrior:
            return None
        loc, scale = prior._buffers["loc"], prior._buffers["scale"]
        if loc.dim() or scale.dim() or loc.requires_grad or scale.requires_grad:
            return None
        return loc.item(), scale.item()

    def _with_kl(self, use: int, sample_shape: Sequence[int] = ()) -> Tensor | None:
        """The forward's use of sigma from the node that also computes the KL against a scalar
        Gaussian prior (:func:`joint_uses`); None where that node does not apply."""
        drawn = joint_uses((self,), use, sample_shape)
        return None if drawn is None else drawn[0]

    def rsample(
        self,
        sample_shape: Sequence[int] = (),
        scale_values: gaussian_ops.ScaleValues | None = None,
    ) -> Tensor:
        """mu + sigma * eps, eps ~ N(0, I) of shape ``sample_shape + mu.shape``.

        ``scale_values``: sigma as :meth:`scale_values` returned it, for a caller that makes
        several draws from an unchanged rho (without it, each call computes sigma afresh)."""
        if scale_values is None:
            joint = self._with_kl(gaussian_ops.DRAW, sample_shape)
            if joint is not None:
                return joint
            scale_values = self.scale_values()
        return gaussian_ops.fresh_draw(self.mu, self.rho, scale_values, tuple(sample_shape))

    def perturbation(
        self,
        sample_shape: Sequence[int] = (),
        scale_values: gaussian_ops.ScaleValues | None = None,
    ) -> Tensor:
        """sigma * eps: a draw minus mu (flipout's shared perturbation); ``scale_values`` as in
        :meth:`rsample`."""
        if scale_values is None:
            joint = self._with_kl(gaussian_ops.PERTURBATION, sample_shape)
            if joint is not None:
                return joint
            scale_values = self.scale_values()
        return gaussian_ops.fresh_draw(None, self.rho, scale_values, tuple(sample_shape))

    def variance(self) -> Tensor:
        """sigma^2, differentiable in rho (local reparameterization)."""
        joint = self._with_kl(gaussian_ops.VARIANCE)
        if joint is not None:
            return joint
        return gaussian_ops.variance(self.rho, self.scale_values())

    def kl_from_forward(self) -> Tensor | None:
        """The KL against a scalar Gaussian prior that the last forward's node computed
        (:meth:`_with_kl`), while mu, rho and the prior are unchanged since and that node's
        backward has not run: the same value, from the same autograd node."""
        slot = self.__dict__.get("_kl_slot")  # absent in a posterior pickled by an older version
        if slot is None or not torch.is_grad_enabled():
            return None
        prior = self._scalar_gaussian_prior()
        return None if prior is None else slot.get(self.mu, self.rho, *prior)

    def fused_kl(self, prior: Distribution) -> Tensor | None:
        """The closed-form KL against a ``Normal`` prior with constant parameters, summed
        (:func:`~bbb_lightning.bayes.gaussian_ops.gaussian_kl`); None for any other prior."""
        if type(prior) is not Normal or prior.loc.requires_grad or prior.scale.requires_grad:
            return None
        values = self.scale_values(reuse=True)
        return gaussian_ops.gaussian_kl(self.mu, self.rho, values, prior.loc, prior.scale)

    def _apply(self, fn: Any, recurse: bool = True) -> MeanFieldNormal:
        # .to(), .double(), ...: sigma and the KL must be recomputed
        self._scale_values = self._kl_slot = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_scale_values": None, "_kl_slot": None}

    def set_mean_(self, value: Tensor) -> None:
        with torch.no_grad():
            self.mu.copy_(value)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mu.shape)}, min_scale={self.min_scale:g}"


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.([^.]+)\.0$")


def _tensor_name(module_path: str) -> str:
    """``'a.parametrizations.weight.0'`` or ``'a.weight_posterior'`` -> ``'a.weight'``."""
    match = _PARAMETRIZED.match(module_path)
    if match:
        owner, tensor = match.groups()
        return f"{owner}.{tensor}" if owner else tensor
    return module_path.removesuffix("_posterior")


def joint_uses(
    posteriors: Sequence[MeanFieldNormal], use: int, sample_shape: Sequence[int] = ()
) -> list[Tensor] | None:
    """One use of sigma for each of several Gaussian posteriors (a layer's weight and bias),
    together with their KLs against scalar Gaussian priors, from one autograd node
    (:func:`~bbb_lightning.bayes.gaussian_ops.sample_with_kl`): mu + sigma eps
    (``gaussian_ops.DRAW``), sigma eps (``PERTURBATION``) or sigma^2 (``VARIANCE``), eps ~ N(0, I)
    of shape ``sample_shape + mu.shape`` drawn independently for each posterior.

    Each posterior keeps its KL for :meth:`~MeanFieldNormal.kl_from_forward`. Returns None, and
    keeps no KL, where the node does not apply to all of them: a prior other than a constant
    scalar ``GaussianPrior``, nothing recorded by autograd, or tensors the native kernels do not
    serve. The caller remembers the draws (:meth:`VariationalPosterior.forward` does).
    """
    # Past Module.__getattr__ and __setattr__ (microseconds per tensor, every step).
    mus, rhos, min_scales, locs, scales = [], [], [], [], []
    for posterior in posteriors:
        attributes = posterior.__dict__
        attributes["_kl_slot"] = None
        prior = posterior._scalar_gaussian_prior()
        if prior is None:
            return None
        parameters = attributes["_parameters"]
        mu, rho = parameters.get("mu"), parameters.get("rho")
        mus.append(posterior.mu if mu is None else mu)  # mu or rho replaced by a plain tensor
        rhos.append(posterior.rho if rho is None else rho)
        min_scales.append(posterior.min_scale)
        locs.append(prior[0])
        scales.append(prior[1])
    joint = gaussian_ops.sample_with_kl(
        mus, rhos, use, list(sample_shape), min_scales, locs, scales
    )
    if joint is None:
        return None
    outs, slots = joint
    for posterior, slot in zip(posteriors, slots, strict=True):
        posterior.__dict__["_kl_slot"] = slot
    return outs


def all_posteriors(net: nn.Module) -> Iterator[VariationalPosterior]:
    """Every posterior of ``net`` (``net`` itself included), in the order of
    :func:`named_posteriors`, without building the names: the loss walks them every step."""
    seen: set[int] = set()
    pending = [net]
    while pending:
        module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, VariationalPosterior):
            yield module
        pending.extend(child for child in reversed(module._modules.values()) if child is not None)


def named_posteriors(net: nn.Module) -> Iterator[tuple[str, VariationalPosterior]]:
    """``(tensor name, posterior)`` for every variational tensor of ``net``.

    The name is the one the tensor had in the deterministic network (``'0.weight'``,
    ``'norm.bias'``, ``'scale'``), whether it lives in a Bayesian layer or a parametrization.
    """
    for path, module in net.named_modules():
        if isinstance(module, VariationalPosterior):
            yield _tensor_name(path), module


def signal_to_noise(net: nn.Module) -> dict[str, Tensor]:
    """Per-weight signal-to-noise ratio |mu| / sigma of every Gaussian posterior (detached).

    Blundell et al. 2015 (section 5.2) prune the weights with the lowest ratio.
    """
    return {
        name: (q.mu.abs() / q.scale).detach()
        for name, q in named_posteriors(net)
        if isinstance(q, MeanFieldNormal)
    }


def posterior_scales(net: nn.Module) -> dict[str, Tensor]:
    """Per-weight sigma of every Gaussian posterior (detached), e.g. for histograms."""
    return {
        name: q.scale.detach()
        for name, q in named_posteriors(net)
        if isinstance(q, MeanFieldNormal)
    }
