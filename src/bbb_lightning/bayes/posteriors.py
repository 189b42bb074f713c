"""Variational posteriors q(w) over one weight tensor.

A posterior is an ``nn.Module`` that owns the trainable variational parameters of one tensor
of the network and the :class:`~bbb_lightning.bayes.priors.Prior` of that tensor. Calling it
(``posterior()``) draws w ~ q by reparameterization and, while the network's forward pass
records (:func:`~bbb_lightning.bayes.sample_forward_with_kl`), writes the draw into the step's
KL record, so that the Monte Carlo KL is evaluated at the weights used in the forward pass
(Blundell et al. 2015). It is also a valid ``torch.nn.utils.parametrize`` parametrization with
no original tensors, which is how any ``nn.Parameter`` of any module becomes variational while
the module's own ``forward`` stays untouched.

To add a posterior, subclass :class:`VariationalPosterior`: implement ``distribution``,
``mean``, ``rsample`` and ``set_mean_``; pass the class (or a ``functools.partial`` of it) as
``posterior=`` to :func:`~bbb_lightning.bayes.bayesianize` (docs/extending.md; the radial
posterior of :mod:`bbb_lightning.bayes.radial` is one).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, Normal

from . import functional, gaussian_ops, native
from .arguments import is_real
from .forward_pass import ForwardPass
from .priors import GaussianPrior, Prior

__all__ = [
    "MeanFieldNormal",
    "PosteriorFactory",
    "SoftplusNormal",
    "VariationalPosterior",
    "all_posteriors",
    "check_min_scale",
    "draws_as_mean_field_normal",
    "initial_rho",
    "joint_uses",
    "named_posteriors",
    "posterior_scales",
    "signal_to_noise",
]


class SoftplusNormal(Normal):
    """N(loc, scale^2) that also knows log(scale) computed stably from rho.

    Its closed-form KLs against ``Normal`` and ``Laplace`` priors are registered in torch's KL
    registry (:mod:`bbb_lightning.bayes.kl`) and use ``log_scale`` instead of log(scale^2), and
    so does :meth:`entropy`: all stay finite where sigma^2 underflows.
    """

    def __init__(self, loc: Tensor, scale: Tensor, log_scale: Callable[[], Tensor]) -> None:
        super().__init__(loc, scale, validate_args=False)
        self._log_scale = log_scale
        self._log_scale_value: Tensor | None = None

    @property
    def log_scale(self) -> Tensor:
        """log sigma, computed once (not ``functools.cached_property``: its lock cannot be
        traced by ``torch.compile``)."""
        if self._log_scale_value is None:
            self._log_scale_value = self._log_scale()
        return self._log_scale_value

    def entropy(self) -> Tensor:
        return functional.gaussian_entropy(self.log_scale)


class VariationalPosterior(nn.Module):
    """Base class: q(w) for one tensor, with its prior p(w) attached as ``self.prior``.

    A subclass implements :meth:`distribution`, :attr:`mean`, :meth:`rsample` and
    :meth:`set_mean_`; everything else (the KL by torch's registry or by Monte Carlo, sampling,
    freezing, histograms of :attr:`stddev`) follows from those. ``frozen`` (set by
    :func:`~bbb_lightning.bayes.freeze`) makes ``forward`` return the mean instead of a draw.
    ``forward_pass`` is the network's :class:`~bbb_lightning.bayes.forward_pass.ForwardPass`:
    a draw made while it records is written into the step's KL record.
    """

    def __init__(self, prior: Prior) -> None:
        super().__init__()
        self.prior = prior
        self.frozen = False
        self.forward_pass = ForwardPass()

    def distribution(self) -> Distribution:
        """q(w) as a ``torch.distributions`` object with the tensor's shape as batch shape."""
        raise NotImplementedError

    @property
    def mean(self) -> Tensor:
        """E_q[w], the tensor's shape."""
        raise NotImplementedError

    @property
    def stddev(self) -> Tensor:
        """The marginal standard deviation of each weight under q (the distribution's)."""
        return self.distribution().stddev

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        """A reparameterized draw of shape ``sample_shape + mean.shape``."""
        raise NotImplementedError

    def fused_kl(self, prior: Distribution) -> Tensor | None:
        """KL(q || p) summed over the tensor by a faster route than torch's KL registry, or
        None where there is none (the default); it must agree with the registered closed form."""
        return None

    def forward(self) -> Tensor:
        """The weight for one forward pass: a draw from q (recorded for the KL when the forward
        pass records), or the mean if frozen. Within one forward pass of the network it is
        drawn once, so a tensor tied under several names (one posterior parametrizing each)
        has one value in the pass; outside a pass every call draws anew."""
        if self.frozen:
            return self.mean
        draws = self.forward_pass.draws
        if draws is not None and (key := (id(self), "draw")) in draws:
            return draws[key]
        weight = self.rsample()
        record = self.forward_pass.record
        if record is not None:
            record.add_sample(self, weight)
        if draws is not None:
            draws[key] = weight
        return weight

    def right_inverse(self, value: Tensor) -> tuple[()]:
        """``module.weight = value`` on a parametrized module sets the posterior mean."""
        self.set_mean_(value)
        return ()

    def set_mean_(self, value: Tensor) -> None:
        """Overwrite the posterior mean in place (e.g. with pretrained weights)."""
        raise NotImplementedError

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Posteriors pickled by earlier versions remembered their last draw, and had no
        # forward pass of their own.
        for legacy in ("last_sample", "_last_sample", "_last_perturbation"):
            state.pop(legacy, None)
        state.setdefault("forward_pass", ForwardPass())
        super().__setstate__(state)


class PosteriorFactory(Protocol):
    """Builds the posterior of one tensor; a :class:`VariationalPosterior` class qualifies."""

    def __call__(self, initial_value: Tensor, prior: Prior) -> VariationalPosterior: ...


RhoInit = float | Sequence[float]


def check_min_scale(min_scale: float) -> float:
    """``min_scale`` as a float, or a one-line error naming it and what is allowed."""
    if not (is_real(min_scale) and min_scale >= 0 and math.isfinite(min_scale)):
        raise ValueError(f"posterior min_scale must be a finite number >= 0, got {min_scale!r}")
    return float(min_scale)


def initial_rho(like: Tensor, rho_init: RhoInit) -> Tensor:
    """A tensor shaped like ``like`` filled from ``rho_init``: a constant, or ``(low, high)``
    for U(low, high); a one-line error naming the value for anything else."""
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
    rho = torch.empty_like(like)
    with torch.no_grad():
        if number:
            return rho.fill_(float(rho_init))
        if len(values) == 2 and values[0] <= values[1]:
            return rho.uniform_(float(values[0]), float(values[1]))
    raise ValueError(f"posterior rho_init must be {allowed}, got {rho_init!r}")


class MeanFieldNormal(VariationalPosterior):
    """Mean-field Gaussian q(w) = N(mu, sigma^2), sigma = softplus(rho) + min_scale.

    ``softplus`` is ``torch.nn.functional.softplus`` (linear above rho = 20, exp below), so
    sigma is finite for any finite rho and strictly positive for rho > -87 in float32
    (rho in [-50, 50] gives sigma in [2e-22, 50]). ``min_scale`` is an optional floor.

    The math is that of :mod:`bbb_lightning.bayes.functional` (the reference path). Where the
    native CPU kernels serve the tensors (:func:`bbb_lightning.bayes.native.serves`) the draws,
    sigma^2 and the KL take the fused fast path of :mod:`bbb_lightning.bayes.gaussian_ops`
    instead, with the same values; a subclass that redefines how it draws or its scale
    (:attr:`scale`, :attr:`log_scale`, :meth:`distribution`, :meth:`rsample`, ...) always takes
    the reference path, so its draws and its distribution agree.

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
        self.min_scale = check_min_scale(min_scale)
        self.mu = nn.Parameter(initial_value.detach().clone())
        self.rho_init = rho_init
        self.rho = nn.Parameter(initial_rho(self.mu, rho_init))

    def reset_rho(self) -> None:
        """Re-initialise rho from ``rho_init`` (constant or uniform range)."""
        with torch.no_grad():
            self.rho.copy_(initial_rho(self.rho, self.rho_init))

    @property
    def scale(self) -> Tensor:
        """sigma = softplus(rho) + min_scale > 0 (:func:`~bbb_lightning.bayes.functional.scale`)."""
        return functional.scale(self.rho, self.min_scale)

    @property
    def log_scale(self) -> Tensor:
        """log sigma, finite with a finite gradient for any finite rho
        (:func:`~bbb_lightning.bayes.functional.log_scale`)."""
        return functional.log_scale(self.rho, self.min_scale)

    @property
    def mean(self) -> Tensor:
        return self.mu

    @property
    def stddev(self) -> Tensor:
        return self.scale

    def distribution(self) -> SoftplusNormal:
        return SoftplusNormal(self.mu, self.scale, lambda: self.log_scale)

    # -- the fast path (bbb_lightning.bayes.gaussian_ops), where the native kernels serve -----
    def fast(self) -> bool:
        """Whether the fused fast path stands in for the reference path now: the class draws
        as MeanFieldNormal itself does and :func:`~bbb_lightning.bayes.native.serves` mu and
        rho."""
        parameters = self.__dict__["_parameters"]  # past Module.__getattr__: every step
        served = native.serves(parameters.get("mu"), parameters.get("rho"))
        return served and draws_as_mean_field_normal(type(self))

    def scale_values(self) -> gaussian_ops.ScaleValues:
        """sigma outside autograd, for the fast path (when a KL follows, the native pass also
        sums log sigma)."""
        return gaussian_ops.ScaleValues(self.rho, self.min_scale, gaussian_ops.tracked(self.rho))

    def _scalar_gaussian_prior(self) -> tuple[float, float] | None:
        """(loc, scale) if the prior is a constant scalar ``GaussianPrior``, else None. (Fast
        path only: the ``.item()`` calls would break a ``torch.compile`` graph.)"""
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

        ``scale_values`` (fast path): sigma as :meth:`scale_values` returned it, for a caller
        that makes several draws from an unchanged rho."""
        if scale_values is None:
            if not self.fast():
                return functional.gaussian_sample(self.mu, self.scale, sample_shape)
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
            if not self.fast():
                return functional.gaussian_sample(None, self.scale, sample_shape)
            joint = self._with_kl(gaussian_ops.PERTURBATION, sample_shape)
            if joint is not None:
                return joint
            scale_values = self.scale_values()
        return gaussian_ops.fresh_draw(None, self.rho, scale_values, tuple(sample_shape))

    def variance(self) -> Tensor:
        """sigma^2, differentiable in rho (local reparameterization)."""
        if not self.fast():
            return self.scale.square()
        joint = self._with_kl(gaussian_ops.VARIANCE)
        if joint is not None:
            return joint
        return gaussian_ops.variance(self.rho, self.scale_values())

    def fused_kl(self, prior: Distribution) -> Tensor | None:
        """The closed-form KL against a ``Normal`` prior with constant parameters, summed: by
        the fast path (:func:`~bbb_lightning.bayes.gaussian_ops.gaussian_kl`) where it serves,
        else the reference :func:`~bbb_lightning.bayes.functional.gaussian_kl` (the registered
        formula, without the registry's dispatch); None for any other prior."""
        if type(prior) is not Normal or prior.loc.requires_grad or prior.scale.requires_grad:
            return None
        if not self.fast():
            kl = functional.gaussian_kl(self.mu, self.scale, self.log_scale, prior.loc, prior.scale)
            return kl.sum()
        values = self.scale_values()
        return gaussian_ops.gaussian_kl(self.mu, self.rho, values, prior.loc, prior.scale)

    def set_mean_(self, value: Tensor) -> None:
        with torch.no_grad():
            self.mu.copy_(value)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mu.shape)}, min_scale={self.min_scale:g}"


_DRAWING_MEMBERS = (
    "forward",
    "rsample",
    "perturbation",
    "variance",
    "scale",
    "log_scale",
    "distribution",
    "fast",
    "fused_kl",
    "_with_kl",
)


@cache
def draws_as_mean_field_normal(posterior: type) -> bool:
    """Whether a posterior of this class draws as MeanFieldNormal itself does, so that the
    fast path may stand in for its draws, variance and KL: not a class without them, or a
    subclass that defines any of them (or its scale) anew."""
    return issubclass(posterior, MeanFieldNormal) and all(
        getattr(posterior, name) is getattr(MeanFieldNormal, name) for name in _DRAWING_MEMBERS
    )


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

    Where the forward pass records (:class:`~bbb_lightning.bayes.forward_pass.KLRecord`), each
    KL goes into the record. Returns None where the node does not apply to all of them: the
    native backend not active, a prior other than a constant scalar ``GaussianPrior``, nothing
    recorded by autograd, or tensors the kernels do not serve. The caller records the draws.
    """
    if not native.active():
        return None
    mus, rhos, min_scales, locs, scales = [], [], [], [], []
    for posterior in posteriors:
        prior = posterior._scalar_gaussian_prior()
        if prior is None:
            return None
        parameters = posterior.__dict__["_parameters"]  # past Module.__getattr__: every step
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
    outs, kls = joint
    record = posteriors[0].forward_pass.record
    if record is not None:
        for posterior, kl in zip(posteriors, kls, strict=True):
            record.add_kl(posterior, kl)
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


def _stddevs(net: nn.Module) -> dict[str, tuple[VariationalPosterior, Tensor]]:
    """(posterior, marginal stddev) by tensor name; a posterior whose distribution has no
    ``stddev`` is left out with a warning naming its class (never silently)."""
    found = {}
    for name, q in named_posteriors(net):
        try:
            found[name] = (q, q.stddev.detach())
        except (NotImplementedError, AttributeError):
            warnings.warn(
                f"{type(q).__name__} (tensor {name!r}) has no stddev: it is left out of the "
                "sigma and signal-to-noise statistics (define VariationalPosterior.stddev)",
                RuntimeWarning,
                stacklevel=3,
            )
    return found


def signal_to_noise(net: nn.Module) -> dict[str, Tensor]:
    """Per-weight signal-to-noise ratio |E_q[w]| / stddev_q(w) of every posterior (detached).

    Blundell et al. 2015 (section 5.2) prune the weights with the lowest ratio.
    """
    return {name: (q.mean.abs().detach() / sd) for name, (q, sd) in _stddevs(net).items()}


def posterior_scales(net: nn.Module) -> dict[str, Tensor]:
    """Per-weight marginal stddev (sigma) of every posterior (detached), e.g. for histograms."""
    return {name: sd for name, (_, sd) in _stddevs(net).items()}
