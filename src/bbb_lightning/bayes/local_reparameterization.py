"""Local reparameterization's pre-activations (Kingma, Salimans and Welling 2015).

For a mean-field Gaussian posterior over the weights of an affine map, the pre-activation of
unit j for input x is Gaussian, b_j ~ N(m_j, v_j) with m = x mu + mu_b and
v = x^2 sigma^2 + sigma_b^2, so it is sampled directly instead of the weights:

    b = m + sqrt(max(v, v_min)) * eps,    eps ~ N(0, I),

with fresh eps per row (and per sample). v_min = 1e-12 keeps the gradient of the square root
finite where v = 0 (an input row of zeros, e.g. a dead ReLU layer). The gradients, with
G = dL/db summed over the S samples that share one m and v (the first layer under
:func:`~bbb_lightning.bayes.sample_forward`):

    dL/dm = sum_s G_s,    dL/dv = sum_s G_s eps_s / (2 sqrt(v))  where v >= v_min, else 0.

On contiguous float32 CPU tensors both directions are one pass of a native kernel each
(:func:`bbb_lightning.bayes.native.local_noise`), which draws eps as it writes b; in torch ops
they are a draw, a clamp, a square root, a multiply-add and their backward passes.

For a linear map, :func:`linear_moments` computes m and v in one autograd node whose backward
takes the input's gradient as one product plus one scaled product and one elementwise pass,

    dL/dx = dL/dm mu + 2 x * (dL/dv sigma^2),

where autograd, through ``x.square()``, spends four more passes over the activations (and
keeps x and x^2 alike).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import native
from .mixed_precision import autocast_inputs

__all__ = ["MIN_VARIANCE", "linear_moments", "sample_preactivations"]

MIN_VARIANCE = 1e-12
_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


class _SamplePreactivations(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, mean: Tensor, variance: Tensor, sample_shape: tuple[int, ...]) -> Tensor:
        out, eps = native.local_noise(mean, variance, sample_shape, MIN_VARIANCE, keep=True)
        ctx.save_for_backward(eps, variance)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        eps, variance = ctx.saved_tensors
        grad_mean, grad_variance = native.local_noise_backward(grad, eps, variance, MIN_VARIANCE)
        if grad_mean.numel() == 0:  # one sample: dL/dm = G
            grad_mean = grad.reshape(variance.shape)
        return grad_mean, grad_variance, None


def sample_preactivations(
    mean: Tensor, variance: Tensor, sample_shape: tuple[int, ...] = ()
) -> Tensor:
    """b = mean + sqrt(max(variance, 1e-12)) eps, eps ~ N(0, I) of shape
    ``sample_shape + mean.shape``: S samples of the pre-activations whose mean and variance are
    given (of one shape), differentiable in both.

    Example:
        >>> mean, variance = torch.zeros(4, 3), torch.full((4, 3), 4.0)
        >>> b = sample_preactivations(mean, variance, (1000,))
        >>> b.shape, abs(float(b.std()) - 2.0) < 0.1
        (torch.Size([1000, 4, 3]), True)

    float16 and bfloat16 moments (from a linear map under mixed precision) are sampled in
    float32 and the result cast back: v_min is below float16's smallest normal number, and the
    square root's gradient near it needs float32's range.
    """
    if mean.dtype in _REDUCED_PRECISION or variance.dtype in _REDUCED_PRECISION:
        dtype = torch.promote_types(mean.dtype, variance.dtype)
        return sample_preactivations(mean.float(), variance.float(), sample_shape).to(dtype)
    if native.serves(mean, variance):
        if torch.is_grad_enabled() and (mean.requires_grad or variance.requires_grad):
            return _SamplePreactivations.apply(mean, variance, tuple(sample_shape))
        out, _ = native.local_noise(mean, variance, tuple(sample_shape), MIN_VARIANCE, keep=False)
        return out
    noise = native.standard_normal((*sample_shape, *mean.shape), like=mean)
    if torch.is_grad_enabled():
        return torch.addcmul(mean, variance.clamp_min(MIN_VARIANCE).sqrt(), noise)
    return noise.mul_(variance.clamp_min(MIN_VARIANCE).sqrt()).add_(mean)


class _LinearMoments(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        mu: Tensor,
        weight_variance: Tensor,
        bias_mean: Tensor | None,
        bias_variance: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        x_sq = x.square()
        ctx.save_for_backward(x, x_sq, mu, weight_variance)
        ctx.has_bias = (bias_mean is not None, bias_variance is not None)
        return F.linear(x, mu, bias_mean), F.linear(x_sq, weight_variance, bias_variance)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_mean: Tensor, grad_variance: Tensor) -> tuple[Tensor | None, ...]:
        x, x_sq, mu, weight_variance = ctx.saved_tensors
        input_shape, rows = x.shape, (-1, x.shape[-1])
        x, x_sq = x.reshape(rows), x_sq.reshape(rows)
        grad_mean = grad_mean.reshape(-1, mu.shape[0])
        grad_variance = grad_variance.reshape(-1, mu.shape[0])
        need = ctx.needs_input_grad
        grad_x = None
        if need[0]:  # 2 x * (G_v sigma^2) + G_m mu, the factor 2 in the product's beta
            grad_x = torch.mm(grad_variance, weight_variance).mul_(x)
            grad_x = grad_x.addmm_(grad_mean, mu, beta=2.0).reshape(input_shape)
        grad_mu = torch.mm(grad_mean.t(), x) if need[1] else None
        grad_weight_variance = torch.mm(grad_variance.t(), x_sq) if need[2] else None
        grad_bias_mean = grad_mean.sum(0) if ctx.has_bias[0] and need[3] else None
        grad_bias_variance = grad_variance.sum(0) if ctx.has_bias[1] and need[4] else None
        return grad_x, grad_mu, grad_weight_variance, grad_bias_mean, grad_bias_variance


def linear_moments(
    x: Tensor,
    mu: Tensor,
    weight_variance: Tensor,
    bias_mean: Tensor | None = None,
    bias_variance: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The mean and variance of the pre-activations of a linear map with independent Gaussian
    weights: m = x mu^T + bias_mean, v = x^2 (sigma^2)^T + bias_variance, for ``x`` of shape
    (*, in), ``mu`` and ``weight_variance`` of shape (out, in). One autograd node.

    Example:
        >>> x, mu = torch.ones(2, 3), torch.zeros(4, 3)
        >>> mean, variance = linear_moments(x, mu, torch.full((4, 3), 0.5))
        >>> mean.shape, variance[0].tolist()
        (torch.Size([2, 4]), [1.5, 1.5, 1.5, 1.5])
    """
    tensors = (x, mu, weight_variance, bias_mean, bias_variance)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if recorded and native.active():  # the fused node is not traceable by torch.compile/func
        return _LinearMoments.apply(*autocast_inputs(*tensors))
    return F.linear(x, mu, bias_mean), F.linear(x.square(), weight_variance, bias_variance)
