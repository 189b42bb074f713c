"""The mean-field Gaussian posterior's per-weight work, one autograd node per use of sigma.

With sigma = softplus(rho) + min_scale written in torch ops, every use of sigma (a weight
draw, a variance, the KL and its log sigma) evaluates softplus and its backward again, and
each of the dozen elementwise ops around it is one more pass over the weights and one more
graph node. On a CPU these passes, not the matrix products, are what a Bayesian training step
adds to a deterministic one. Here:

- sigma is computed once per forward, outside autograd (:class:`ScaleValues`); a KL evaluated
  after the forward, with rho unchanged, reuses it;
- each use of sigma is one :class:`torch.autograd.Function` whose backward applies the chain
  rule itself through d sigma / d rho = sigmoid(rho), which is computed at most once per
  forward, by the first backward that needs it;
- the Gaussian-prior KL is summed with dot products instead of elementwise terms;
- on contiguous float32 CPU tensors, sigma, sigmoid(rho) and sum log sigma come from one pass
  of a native kernel, and so does the KL's rho-gradient (:mod:`bbb_lightning.bayes.native`);
- there, against a Gaussian prior with scalar parameters, :func:`sample_with_kl` goes further:
  one node computes the forward's use of sigma and the KL together, in one pass over mu and
  rho, and its backward gives the gradients of both in one more pass (instead of two nodes,
  six passes and autograd adding their gradients), computing sigma and sigmoid(rho) again
  rather than keeping them (less memory traffic than storing and reading them back). That node
  is written in C++ (:func:`bbb_lightning.bayes.native.sample_with_kl_node`), so its forward
  and backward run no Python, and it serves several tensors at once: a layer's weight and bias
  are one node (:func:`~bbb_lightning.bayes.posteriors.joint_uses`). The KL goes into the
  step's :class:`~bbb_lightning.bayes.forward_pass.KLRecord`, where the loss picks it up.

This module is the CPU fast path: the posteriors use it only where
:func:`bbb_lightning.bayes.native.serves` their tensors, and
:mod:`bbb_lightning.bayes.functional` (the reference path, plain torch ops) otherwise; the
tests check every function here against that reference.

The functions (``eps`` ~ N(0, I) of shape ``sample_shape + mu.shape``; sums over the sample
dimensions in the gradients):

- :func:`draw`: w = mu + sigma * eps;  dL/dmu = sum_s G_s,  dL/drho = sum_s G_s eps_s sigmoid(rho)
- :func:`perturbation`: sigma * eps;  dL/drho as for :func:`draw`
- :func:`variance`: sigma^2;  dL/drho = 2 G sigma sigmoid(rho)
- :func:`sample_with_kl`: one of the three above and :func:`gaussian_kl`, for one or several
  tensors, from one node;
- :func:`gaussian_kl`: KL(N(mu, sigma^2) || N(m, s^2)) summed,
  sum_i [log s_i - log sigma_i + (sigma_i^2 + (mu_i - m_i)^2) / (2 s_i^2) - 1/2];
  dKL/dmu = (mu - m) / s^2,  dKL/drho = (sigma / s^2 - 1 / sigma) sigmoid(rho).

Where sigma underflows (rho < -20 with min_scale = 0), log sigma = rho - sigma / 2 and
sigmoid(rho) / sigma = 1 - sigma / 2, both exact to O(e^(2 rho)), so the KL and its gradient stay
finite for any finite rho (as :func:`~bbb_lightning.bayes.functional.log_softplus`).

None of these functions is twice differentiable (``once_differentiable``). Where autograd records
nothing (``torch.no_grad``, inference mode, or no input requiring a gradient) they compute the
same values without a Function.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .functional import TINY_RHO

__all__ = [
    "DRAW",
    "PERTURBATION",
    "VARIANCE",
    "ScaleValues",
    "draw",
    "fresh_draw",
    "gaussian_kl",
    "perturbation",
    "sample_with_kl",
    "variance",
]

# What sample_with_kl returns besides the KL: mu + sigma eps, sigma eps, or sigma^2.
DRAW, PERTURBATION, VARIANCE = 0, 1, 2


class ScaleValues:
    """sigma = softplus(rho) + min_scale for one version of ``rho``, as tensors outside autograd.

    ``dsigma`` = d sigma / d rho = sigmoid(rho) is computed on first use, or with sigma by
    the native kernel, which also sums log sigma when ``log_sum`` says a KL will follow.

    Example:
        >>> rho = torch.tensor([0.0, -30.0])
        >>> values = ScaleValues(rho, min_scale=0.0)
        >>> values.sigma, values.dsigma
        (tensor([6.9315e-01, 9.3576e-14]), tensor([5.0000e-01, 9.3576e-14]))
    """

    def __init__(self, rho: Tensor, min_scale: float, log_sum: bool = False) -> None:
        self.rho = rho
        self.min_scale = min_scale
        self._dsigma: Tensor | None = None
        self._log_sigma_sum: float | None = None
        self._tiny_mask: Tensor | bool | None = False  # False: not yet looked at
        self.native = native.serves(rho)
        if self.native:
            self.sigma, self._dsigma, total = native.softplus_scale(rho, min_scale, log_sum)
            self._log_sigma_sum = total if log_sum else None
            return
        with torch.no_grad():
            sigma = F.softplus(rho)
            self.sigma = sigma.add_(min_scale) if min_scale else sigma

    @property
    def dsigma(self) -> Tensor:
        if self._dsigma is None:
            with torch.no_grad():
                self._dsigma = torch.sigmoid(self.rho)
        return self._dsigma

    def _tiny(self) -> Tensor | None:
        """Where sigma needs the small-rho expansions; None if nowhere: sigma >= min_scale > 0,
        or on a CPU (where looking costs no device synchronisation) no rho is below -20."""
        if self._tiny_mask is False:
            rho = self.rho.detach()
            never = self.min_scale > 0 or rho.numel() == 0
            if never or (rho.device.type == "cpu" and bool(rho.min() >= TINY_RHO)):
                self._tiny_mask = None
            else:
                self._tiny_mask = rho < TINY_RHO
        return self._tiny_mask

    def log_sigma(self) -> Tensor:
        """log sigma, finite for any finite rho."""
        log_sigma = self.sigma.log()
        tiny = self._tiny()
        if tiny is None:
            return log_sigma
        return torch.where(tiny, self.rho.detach() - 0.5 * self.sigma, log_sigma)

    def log_sigma_sum(self) -> Tensor:
        """sum log sigma (a 0-dim tensor), finite for any finite rho."""
        if self._log_sigma_sum is None:
            return self.log_sigma().sum()
        return torch.tensor(self._log_sigma_sum, dtype=self.sigma.dtype)

    def sigma_minus_inverse(self, weight: Tensor, grad: Tensor) -> Tensor:
        """(weight sigma - grad / sigma) sigmoid(rho), finite for any finite rho: the gradient of
        weight sigma^2 / 2 - grad log sigma with respect to rho."""
        if self.native and weight.numel() == 1 and grad.numel() == 1:
            return native.kl_rho_grad(
                self.rho, self.sigma, self.dsigma, float(weight), float(grad), self.min_scale
            )
        tiny = self._tiny()
        sigma = self.sigma
        value = torch.mul(sigma, weight).addcdiv_(grad.expand_as(sigma), sigma, value=-1)
        value.mul_(self.dsigma)
        if tiny is None:
            return value
        # sigmoid(rho) / sigma = 1 - sigma / 2 + O(e^(2 rho)) where sigma underflows.
        small = (self.sigma * self.dsigma).mul_(weight).sub_((1.0 - 0.5 * self.sigma).mul_(grad))
        return torch.where(tiny, small, value)


def _draw_value(mu: Tensor | None, scale: ScaleValues, eps: Tensor) -> Tensor:
    return eps * scale.sigma if mu is None else torch.addcmul(mu, eps, scale.sigma)


def _kl_from_sums(
    count: int,
    log_prior_scale: float | Tensor,
    log_sigma_sum: float | Tensor,
    quadratic: float | Tensor,
) -> float | Tensor:
    """sum_i [log s_i - log sigma_i + (sigma_i^2 + (mu_i - m_i)^2) / (2 s_i^2) - 1/2] from
    sum log s, sum log sigma and ``quadratic`` = sum (sigma^2 + (mu - m)^2) / s^2 (floats or
    0-dim tensors)."""
    return log_prior_scale - log_sigma_sum + 0.5 * (quadratic - count)


def _gaussian_kl_value(mu: Tensor, scale: ScaleValues, loc: Tensor, prior_scale: Tensor) -> Tensor:
    sigma = scale.sigma
    count = mu.numel()
    inv_var = prior_scale.square().reciprocal()
    if inv_var.numel() == 1:
        diff = (mu - loc).reshape(-1)
        flat = sigma.reshape(-1)
        quadratic = (torch.dot(flat, flat) + torch.dot(diff, diff)) * inv_var.reshape(())
        log_prior_scale = prior_scale.log().reshape(()) * count
    else:
        quadratic = ((mu - loc).square_().add_(sigma.square()) * inv_var).sum()
        log_prior_scale = prior_scale.log().expand(mu.shape).sum()
    return _kl_from_sums(count, log_prior_scale, scale.log_sigma_sum(), quadratic)


def tracked(*tensors: Tensor | None) -> bool:
    """Whether autograd records an operation on these tensors (else: no Function overhead)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sum_to(tensor: Tensor, dims: int) -> Tensor:
    """Sum over the ``dims`` leading (sample) dimensions."""
    return tensor.sum(tuple(range(dims))) if dims else tensor


class _Draw(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, mu: Tensor | None, rho: Tensor, scale: ScaleValues, eps: Tensor
    ) -> Tensor:
        ctx.save_for_backward(rho, eps)  # rho: autograd checks it was not modified in place
        ctx.scale = scale
        ctx.sample_dims = eps.dim() - rho.dim()
        return _draw_value(mu, scale, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        _, eps = ctx.saved_tensors
        grad_mu = _sum_to(grad, ctx.sample_dims) if ctx.needs_input_grad[0] else None
        grad_rho = None
        if ctx.needs_input_grad[1]:
            grad_rho = _sum_to(grad * eps, ctx.sample_dims).mul_(ctx.scale.dsigma)
        return grad_mu, grad_rho, None, None


class _Variance(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rho: Tensor, scale: ScaleValues) -> Tensor:
        ctx.save_for_backward(rho)
        ctx.scale = scale
        return scale.sigma.square()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        _ = ctx.saved_tensors  # unpacking checks that rho was not modified in place
        scale = ctx.scale
        return (grad * scale.sigma).mul_(scale.dsigma).mul_(2.0), None


class _GaussianKL(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, mu: Tensor, rho: Tensor, scale: ScaleValues, loc: Tensor, prior_scale: Tensor
    ) -> Tensor:
        ctx.save_for_backward(mu, rho, loc, prior_scale)
        ctx.scale = scale
        return _gaussian_kl_value(mu, scale, loc, prior_scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        mu, _, loc, prior_scale = ctx.saved_tensors
        weight = grad / prior_scale.square()  # g / s^2
        grad_mu = (mu - loc).mul_(weight) if ctx.needs_input_grad[0] else None
        grad_rho = None
        if ctx.needs_input_grad[1]:
            grad_rho = ctx.scale.sigma_minus_inverse(weight, grad)
        return grad_mu, grad_rho, None, None, None


def draw(mu: Tensor, rho: Tensor, scale: ScaleValues, eps: Tensor) -> Tensor:
    """w = mu + sigma * eps, differentiable in mu and rho; ``scale`` holds sigma of ``rho``."""
    if tracked(mu, rho):
        return _Draw.apply(mu, rho, scale, eps)
    return _draw_value(mu, scale, eps)


def perturbation(rho: Tensor, scale: ScaleValues, eps: Tensor) -> Tensor:
    """sigma * eps (a draw minus its mean, as flipout needs), differentiable in rho."""
    if tracked(rho):
        return _Draw.apply(None, rho, scale, eps)
    return _draw_value(None, scale, eps)


def fresh_draw(
    mu: Tensor | None, rho: Tensor, scale: ScaleValues, sample_shape: tuple[int, ...]
) -> Tensor:
    """mu + sigma * eps (sigma * eps where ``mu`` is None) with a fresh eps ~ N(0, I) of shape
    ``sample_shape + rho.shape``: :func:`draw` or :func:`perturbation` where autograd records;
    without it, on tensors the native kernels apply to, one pass that never stores eps
    (:func:`bbb_lightning.bayes.native.scaled_normal`)."""
    if not tracked(mu, rho) and native.serves(scale.sigma, mu):
        return native.scaled_normal(sample_shape, scale.sigma, mu)
    eps = native.standard_normal((*sample_shape, *rho.shape), like=rho)
    return perturbation(rho, scale, eps) if mu is None else draw(mu, rho, scale, eps)


def variance(rho: Tensor, scale: ScaleValues) -> Tensor:
    """sigma^2, differentiable in rho (for local reparameterization)."""
    return _Variance.apply(rho, scale) if tracked(rho) else scale.sigma.square()


def gaussian_kl(
    mu: Tensor, rho: Tensor, scale: ScaleValues, loc: Tensor, prior_scale: Tensor
) -> Tensor:
    """KL(N(mu, sigma^2) || N(loc, prior_scale^2)) summed over the tensor (a 0-dim tensor).

    ``loc`` and ``prior_scale`` broadcast to ``mu`` and are constants (no gradient).
    """
    if tracked(mu, rho):
        return _GaussianKL.apply(mu, rho, scale, loc, prior_scale)
    return _gaussian_kl_value(mu, scale, loc, prior_scale)


def sample_with_kl(
    mus: list[Tensor],
    rhos: list[Tensor],
    use: int,
    sample_shape: list[int],
    min_scales: list[float],
    locs: list[float],
    scales: list[float],
) -> tuple[list[Tensor], list[Tensor]] | None:
    """One use of sigma and KL(N(mu, sigma^2) || N(loc, scale^2)) summed, for each tensor t
    (``mus[t]``, ``rhos[t]``, ``min_scales[t]``, ``locs[t]``, ``scales[t]``), from one node.

    ``use`` is :data:`DRAW` (mu + sigma eps), :data:`PERTURBATION` (sigma eps) or
    :data:`VARIANCE` (sigma^2, no ``sample_shape``); eps ~ N(0, I) of shape
    ``sample_shape + mu.shape``. Returns those tensors and the KLs (0-dim tensors), or None where
    the node does not apply: the native kernels do not serve now, autograd records nothing, or a
    tensor is not a contiguous float32 CPU tensor
    (:func:`bbb_lightning.bayes.native.sample_with_kl_node`).
    """
    if not native.active() or native.kernels() is None:
        return None
    joint = native.sample_with_kl_node(mus, rhos, use, sample_shape, min_scales, locs, scales)
    if joint is None:
        return None
    outs, kls, _ = joint
    return outs, kls
