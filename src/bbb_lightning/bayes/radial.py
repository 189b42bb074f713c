"""The radial posterior of Farquhar, Osborne and Gal 2020 ("Radial Bayesian Neural Networks").

A mean-field Gaussian in D dimensions puts almost all its mass on a thin shell at radius
~ sqrt(D) sigma from the mean, far from where the mean's good solution lies; the radial
posterior keeps the direction of the Gaussian noise and draws its radius from N(0, 1):

    w = mu + sigma * r * eps / |eps|,    eps ~ N(0, I_D),  r ~ N(0, 1),

over one whole tensor (D = its number of elements; one r per tensor and draw). Each weight then
has mean mu_i and variance sigma_i^2 / D. Its entropy is, exactly,

    H(q) = sum_i log sigma_i + c(D),
    c(D) = log(2 pi) / 2 + 1/2 - log 2 + log S(D) - (D - 1) (gamma + log 2) / 2,

where S(D) = 2 pi^(D/2) / Gamma(D/2) is the area of the unit sphere in R^D and gamma Euler's
constant (the density of z = r eps / |eps| is 2 phi(|z|) / (S(D) |z|^(D-1))). The KL against
any prior has no closed form, so :func:`~bbb_lightning.bayes.kl_divergence` estimates it by
Monte Carlo, KL ~= -H(q) - (1/S) sum_s log p(w_s), at the forward pass's draws; only the log
sigma term carries a gradient, so the paper's "entropy up to a constant" is the same objective.

It is written as any user's posterior would be (docs/extending.md): one class, no knowledge of
the layers' fast paths, selected with ``posterior=radial``. Its layers take weight
reparameterization (local reparameterization and flipout need a Gaussian posterior).

Example:
    >>> from bbb_lightning.bayes.priors import GaussianPrior
    >>> q = RadialPosterior(torch.zeros(100), GaussianPrior(), rho_init=0.5413)
    >>> w = q.rsample((2,))
    >>> w.shape, round(float(q.stddev[0]) * 10, 4)  # sigma / sqrt(D), softplus(0.5413) = 1
    (torch.Size([2, 100]), 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from . import functional
from .posteriors import RhoInit, VariationalPosterior, check_min_scale, initial_rho
from .priors import Prior

__all__ = ["Radial", "RadialPosterior", "radial_entropy_constant"]

_EULER_GAMMA = 0.5772156649015329


def radial_entropy_constant(dimension: int) -> float:
    """c(D) of the module docstring: the entropy of z = r eps / |eps| in R^D."""
    log_sphere_area = (
        math.log(2.0) + 0.5 * dimension * math.log(math.pi) - math.lgamma(dimension / 2)
    )
    return (
        0.5 * math.log(2.0 * math.pi)
        + 0.5
        - math.log(2.0)
        + log_sphere_area
        - 0.5 * (dimension - 1) * (_EULER_GAMMA + math.log(2.0))
    )


class Radial(Distribution):
    """The radial distribution over one tensor: its event is the whole tensor (shape of
    ``loc``), since the radius r couples every element."""

    arg_constraints: ClassVar[dict[str, constraints.Constraint]] = {
        "loc": constraints.real,
        "scale": constraints.positive,
    }
    has_rsample = True

    def __init__(self, loc: Tensor, scale: Tensor, log_scale: Tensor) -> None:
        self.loc, self.scale, self.log_scale = loc, scale, log_scale
        super().__init__(batch_shape=(), event_shape=loc.shape, validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        return self.scale.square() / max(1, self.loc.numel())

    @property
    def stddev(self) -> Tensor:
        return self.scale / math.sqrt(max(1, self.loc.numel()))

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = (*sample_shape, *self.loc.shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        event_dims = tuple(range(len(sample_shape), len(shape)))
        direction = eps / eps.square().sum(event_dims, keepdim=True).sqrt()
        radius = torch.randn(
            (*sample_shape, *[1] * self.loc.dim()), dtype=self.loc.dtype, device=self.loc.device
        )
        return self.loc + self.scale * radius * direction

    def entropy(self) -> Tensor:
        return self.log_scale.sum() + radial_entropy_constant(max(1, self.loc.numel()))


class RadialPosterior(VariationalPosterior):
    """q(w) radial (module docstring), sigma = softplus(rho) + min_scale.

    Args:
        initial_value: becomes mu.
        prior: p(w) for this tensor.
        rho_init: a constant, or ``(low, high)`` for rho ~ U(low, high). The default U(-5, -4)
            is the Gaussian posterior's; a radial draw moves each weight by about
            sigma / sqrt(D), so a larger sigma is affordable.
        min_scale: floor added to sigma (default 0).
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
        self.rho = nn.Parameter(initial_rho(self.mu, rho_init))

    @property
    def scale(self) -> Tensor:
        """sigma = softplus(rho) + min_scale, per weight."""
        return functional.scale(self.rho, self.min_scale)

    @property
    def mean(self) -> Tensor:
        return self.mu

    def distribution(self) -> Radial:
        return Radial(self.mu, self.scale, functional.log_scale(self.rho, self.min_scale))

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.distribution().rsample(sample_shape)

    def set_mean_(self, value: Tensor) -> None:
        with torch.no_grad():
            self.mu.copy_(value)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.mu.shape)}, min_scale={self.min_scale:g}"
