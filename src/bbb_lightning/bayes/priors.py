"""Priors p(w) over the weights of a Bayesian network.

A prior is an ``nn.Module`` whose hyperparameters are buffers, so they follow ``.to(device,
dtype)`` and land in ``state_dict``. It exposes its density as a ``torch.distributions``
object (:meth:`Prior.distribution`), which is what :func:`bbb_lightning.bayes.kl_divergence`
hands to ``torch.distributions.kl_divergence``: a prior with a registered closed-form KL
against the posterior gets it, every other prior gets the Monte Carlo estimate.

To add a prior, subclass :class:`Prior` and implement :meth:`Prior.distribution`; if the KL
against :class:`torch.distributions.Normal` has a closed form, register it with
``torch.distributions.kl.register_kl``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Laplace,
    MixtureSameFamily,
    Normal,
)

__all__ = [
    "EmpiricalPrior",
    "GaussianPrior",
    "LaplacePrior",
    "Prior",
    "ScaleMixtureNormal",
    "ScaleMixturePrior",
]


# A prior's density divides by scale^2 in float32: below 1e-19 the square underflows to zero
# (NaN at w = loc), above 1e19 it overflows to inf.
SCALE_RANGE = (1e-19, 1e19)
# pi is kept in float32, which rounds any pi within 2^-24 of 1 to 1, losing the second
# component; far below the smallest normal float32 it loses its digits.
PI_RANGE = (1e-30, 1.0 - 2.0**-24)


def _check_scale(name: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ValueError(f"prior {name} must be a finite number > 0, got {value!r}")
    low, high = SCALE_RANGE
    if not low <= value <= high:
        raise ValueError(
            f"prior {name} must be in [{low:g}, {high:g}] (its square must be a normal float32), "
            f"got {value!r}"
        )


def _as_buffer(value: float | Tensor) -> Tensor:
    return value.detach().clone() if isinstance(value, Tensor) else torch.tensor(float(value))


class Prior(nn.Module):
    """Base class: a prior density over one weight tensor, elementwise independent."""

    def distribution(self) -> Distribution:
        """The prior as a ``torch.distributions`` object, broadcastable to the weight."""
        raise NotImplementedError

    def log_prob(self, weight: Tensor) -> Tensor:
        """Elementwise log p(w)."""
        return self.distribution().log_prob(weight)

    def for_parameter(self, initial_value: Tensor) -> Prior:
        """The prior to use for one parameter whose initial (e.g. pretrained) value is given.

        Fixed priors are shared and return ``self``; data-dependent priors such as
        :class:`EmpiricalPrior` return a new prior built from ``initial_value``.
        """
        return self


class GaussianPrior(Prior):
    """p(w) = N(w; loc, scale^2), elementwise.

    Example:
        >>> GaussianPrior(0.0, 1.0).log_prob(torch.zeros(2))
        tensor([-0.9189, -0.9189])
    """

    loc: Tensor
    scale: Tensor

    def __init__(self, loc: float | Tensor = 0.0, scale: float | Tensor = 1.0) -> None:
        super().__init__()
        if not isinstance(scale, Tensor):
            _check_scale("scale", scale)
        elif not bool(((scale >= SCALE_RANGE[0]) & (scale <= SCALE_RANGE[1])).all()):
            raise ValueError(
                f"prior scale must be in [{SCALE_RANGE[0]:g}, {SCALE_RANGE[1]:g}] everywhere "
                "(finite, > 0, and its square a normal float32)"
            )
        if not bool(torch.isfinite(torch.as_tensor(loc)).all()):
            raise ValueError(f"prior loc must be finite, got {loc!r}")
        self.register_buffer("loc", _as_buffer(loc))
        self.register_buffer("scale", _as_buffer(scale))

    def distribution(self) -> Normal:
        return Normal(self.loc, self.scale, validate_args=False)

    def extra_repr(self) -> str:
        if self.loc.dim() == 0:
            return f"loc={self.loc.item():g}, scale={self.scale.item():g}"
        return f"loc=<tensor {tuple(self.loc.shape)}>, scale={self.scale.flatten()[0].item():g}"


class LaplacePrior(Prior):
    """p(w) = Laplace(w; loc, scale) = exp(-|w - loc| / scale) / (2 scale), elementwise.

    The KL from a Gaussian posterior has a closed form in torch's registry.
    """

    loc: Tensor
    scale: Tensor

    def __init__(self, loc: float = 0.0, scale: float = 1.0) -> None:
        super().__init__()
        _check_scale("scale", scale)
        if not (isinstance(loc, int | float) and math.isfinite(loc)):
            raise ValueError(f"prior loc must be a finite number, got {loc!r}")
        self.register_buffer("loc", torch.tensor(float(loc)))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def distribution(self) -> Laplace:
        return Laplace(self.loc, self.scale, validate_args=False)

    def extra_repr(self) -> str:
        return f"loc={self.loc.item():g}, scale={self.scale.item():g}"


class ScaleMixtureNormal(MixtureSameFamily):
    """The scale mixture pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2) (Blundell et al. 2015, eq. 7).

    ``log_prob`` is a log-sum-exp over the two components, so it is finite for any finite w,
    including weights many sigma1 out in the tails where both densities underflow.
    """

    def __init__(self, pi: Tensor, sigma1: Tensor, sigma2: Tensor) -> None:
        # Logits log(pi), log(1 - pi) rather than probs: Categorical clamps probs to
        # [eps, 1 - eps] (1.2e-7 in float32), which would change a weight below eps.
        logits = torch.stack([pi.log(), torch.log1p(-pi)])
        mixture = Categorical(logits=logits, validate_args=False)
        components = Normal(
            torch.zeros_like(sigma1).expand(2), torch.stack([sigma1, sigma2]), validate_args=False
        )
        super().__init__(mixture, components, validate_args=False)


class ScaleMixturePrior(Prior):
    """Blundell's scale mixture prior, p(w) = pi N(w; 0, sigma1^2) + (1 - pi) N(w; 0, sigma2^2).

    Typically sigma1 > sigma2 and sigma2 << 1: a heavy tail plus a spike at zero. The paper's
    best MNIST settings include pi = 1/2, -log sigma1 = 0, -log sigma2 = 6. No closed-form KL
    exists against a Gaussian posterior, so the KL is estimated by Monte Carlo.

    Example:
        >>> prior = ScaleMixturePrior(pi=0.5, sigma1=1.0, sigma2=math.exp(-6))
        >>> bool(torch.isfinite(prior.log_prob(torch.tensor([0.0, 50.0, -1e3]))).all())
        True
    """

    pi: Tensor
    sigma1: Tensor
    sigma2: Tensor

    def __init__(self, pi: float = 0.5, sigma1: float = 1.0, sigma2: float = math.exp(-6)) -> None:
        super().__init__()
        if not (isinstance(pi, int | float) and 0 < pi < 1):
            raise ValueError(f"prior pi (mixture weight) must be in (0, 1), got {pi!r}")
        if not PI_RANGE[0] <= pi <= PI_RANGE[1]:
            raise ValueError(
                f"prior pi (mixture weight) must be in [{PI_RANGE[0]:g}, 1 - 2^-24] (float32 "
                f"rounds a pi closer to 0 or 1 and loses a component), got {pi!r}"
            )
        _check_scale("sigma1", sigma1)
        _check_scale("sigma2", sigma2)
        self.register_buffer("pi", torch.tensor(float(pi)))
        self.register_buffer("sigma1", torch.tensor(float(sigma1)))
        self.register_buffer("sigma2", torch.tensor(float(sigma2)))

    def distribution(self) -> ScaleMixtureNormal:
        return ScaleMixtureNormal(self.pi, self.sigma1, self.sigma2)

    def extra_repr(self) -> str:
        return (
            f"pi={self.pi.item():g}, sigma1={self.sigma1.item():g}, sigma2={self.sigma2.item():g}"
        )


class EmpiricalPrior(Prior):
    """A Gaussian prior centred on each parameter's initial value: p(w) = N(w; w0, scale^2).

    With a pretrained network this is the MOPED-style empirical prior (Krishnan et al. 2020):
    the prior keeps the posterior near the weights it started from. Each parameter gets its
    own :class:`GaussianPrior` whose ``loc`` buffer is a copy of w0.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        _check_scale("scale", scale)
        self.scale = float(scale)

    def for_parameter(self, initial_value: Tensor) -> GaussianPrior:
        loc = initial_value.detach().clone()
        return GaussianPrior(loc, torch.full((), self.scale, dtype=loc.dtype, device=loc.device))

    def distribution(self) -> Distribution:
        raise RuntimeError(
            "EmpiricalPrior has no density of its own; bayesianize() gives each parameter "
            "a GaussianPrior centred on its initial value"
        )

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"
