"""Local reparameterization's pre-activations and moments against float64 references: the
native one-pass draw and its one-pass gradient, the torch-op fallback, and the fused moments of
a linear map against autograd through ``x.square()``."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bbb_lightning.bayes import native
from bbb_lightning.bayes.local_reparameterization import (
    MIN_VARIANCE,
    linear_moments,
    sample_preactivations,
)

needs_native = pytest.mark.skipif(
    native.kernels() is None, reason="native kernels could not be built here (no compiler?)"
)


def mean_and_variance(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    mean = torch.randn(shape, dtype=dtype)
    variance = torch.rand(shape, dtype=dtype) * 3
    variance.view(-1)[::11] = 0.0  # clamped: the gradient must be 0 there, and finite
    return mean.requires_grad_(), variance.requires_grad_()


@needs_native
@pytest.mark.parametrize("sample_shape", [(), (1,), (4,)])
def test_native_draws_and_gradients_match_float64_with_the_same_noise(
    sample_shape: tuple[int, ...],
) -> None:
    torch.manual_seed(0)
    mean, variance = mean_and_variance((37, 129), torch.float32)
    state = torch.get_rng_state()
    out = sample_preactivations(mean, variance, sample_shape)
    grad = torch.randn(out.shape)
    out.backward(grad)
    torch.set_rng_state(state)  # the same key: the noise the draw used, kept this time
    again, eps = native.local_noise(mean, variance, sample_shape, MIN_VARIANCE, True)
    assert torch.equal(again, out) and eps.shape == (*sample_shape, 37, 129)

    mean64 = mean.detach().double().requires_grad_()
    variance64 = variance.detach().double().requires_grad_()
    reference = mean64 + variance64.clamp_min(MIN_VARIANCE).sqrt() * eps.double()
    reference.backward(grad.double())
    assert torch.allclose(out.double(), reference, rtol=1e-6, atol=1e-6)
    assert torch.allclose(mean.grad.double(), mean64.grad, rtol=1e-6, atol=1e-6)
    # the variance's gradient sums S terms G eps / (2 std); float32 rounding of each term
    terms = (grad.double() * eps.double()).abs().sum(tuple(range(len(sample_shape))))
    bound = 1e-6 * terms / (2 * variance64.detach().clamp_min(MIN_VARIANCE).sqrt()) + 1e-12
    assert torch.all((variance.grad.double() - variance64.grad).abs() <= bound)
    assert torch.all(variance.grad.view(-1)[::11] == 0)


@needs_native
def test_an_empty_batch_trains_through_local_reparameterization() -> None:
    """No rows: the native backward has no element to sum over (it divided by zero and killed
    the process with SIGFPE); run in a child process so that a regression fails this test only."""
    code = (
        "import torch; from torch import nn;"
        "from bbb_lightning.bayes import bayesianize, sample_forward;"
        "from bbb_lightning.bayes.local_reparameterization import sample_preactivations;"
        "mean = torch.zeros(0, 3, requires_grad=True);"
        "variance = torch.zeros(0, 3, requires_grad=True);"
        "out = sample_preactivations(mean, variance, (4,)); out.sum().backward();"
        "assert out.shape == (4, 0, 3) and mean.grad.shape == variance.grad.shape == (0, 3);"
        "net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2));"
        "net = bayesianize(net, estimator='local');"
        "[sample_forward(net, torch.zeros(0, 3), s).sum().backward() for s in (1, 3)];"
        "print('ok')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("samples", [1, 3])
def test_standardised_draws_are_independent_standard_normals(
    dtype: torch.dtype, samples: int
) -> None:
    """float32 takes the native kernel (where built), float64 the torch ops: both must give
    (b - m) / sqrt(v) ~ N(0, 1), independent across samples; 5 standard errors."""
    torch.manual_seed(1)
    mean = torch.randn(200, 500, dtype=dtype)
    variance = torch.rand(200, 500, dtype=dtype) + 0.1
    with torch.no_grad():
        out = sample_preactivations(mean, variance, (samples,))
    z = ((out - mean) / variance.sqrt()).double()
    se = 1 / math.sqrt(z.numel())
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(96) * se
    if samples > 1:
        assert abs(float((z[0] * z[1]).mean())) < 5 * math.sqrt(samples) * se


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
@pytest.mark.parametrize("bias", ["both", "mean only", "none"])
def test_linear_moments_and_their_gradients_match_autograd(
    shape: tuple[int, ...], bias: str
) -> None:
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weight_variance = torch.rand(4, 5, dtype=torch.float64).requires_grad_()
    bias_mean = torch.randn(4, dtype=torch.float64, requires_grad=True) if bias != "none" else None
    bias_variance = torch.rand(4, dtype=torch.float64).requires_grad_() if bias == "both" else None
    inputs = (x, mu, weight_variance, bias_mean, bias_variance)

    mean, variance = linear_moments(*inputs)
    torch.testing.assert_close(mean, F.linear(x, mu, bias_mean))
    torch.testing.assert_close(variance, F.linear(x.square(), weight_variance, bias_variance))
    assert torch.autograd.gradcheck(lambda *t: linear_moments(*t), inputs)


def test_linear_moments_skip_gradients_nobody_needs() -> None:
    x = torch.randn(3, 5)  # the first layer's input: no gradient
    mu = torch.randn(4, 5, requires_grad=True)
    weight_variance = torch.rand(4, 5, requires_grad=True)
    mean, variance = linear_moments(x, mu, weight_variance)
    (mean.sum() + variance.sum()).backward()
    torch.testing.assert_close(mu.grad, x.sum(0).expand(4, 5))
    torch.testing.assert_close(weight_variance.grad, x.square().sum(0).expand(4, 5))
    assert x.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_moments_under_autocast_run_in_its_dtype_and_match_float64(
    dtype: torch.dtype,
) -> None:
    """Mixed precision: the moments and their backward in autocast's dtype, the gradients of the
    float32 inputs in float32. Reference: float64 from the inputs rounded to that dtype, as
    autocast rounds them. Each result element passes through at most four roundings of unit
    roundoff u (the incoming gradient, a product, a multiply, a multiply-add), so the
    norm-relative error is below 4u; the bound is 8u."""
    torch.manual_seed(3)
    x = torch.randn(64, 50, requires_grad=True)
    mu = (0.1 * torch.randn(30, 50)).requires_grad_()
    weight_variance = (0.01 * torch.rand(30, 50)).requires_grad_()
    bias_mean = torch.randn(30, requires_grad=True)
    bias_variance = (0.01 * torch.rand(30)).requires_grad_()
    inputs = (x, mu, weight_variance, bias_mean, bias_variance)
    grad_mean, grad_variance = torch.randn(64, 30), torch.randn(64, 30)
    with torch.autocast("cpu", dtype=dtype):
        mean, variance = linear_moments(*inputs)
    assert mean.dtype == variance.dtype == dtype
    (mean.float() * grad_mean + variance.float() * grad_variance).sum().backward()

    rounded = [t.detach().to(dtype).double().requires_grad_() for t in inputs]
    x64, mu64, var64, bias_mean64, bias_var64 = rounded
    mean64 = F.linear(x64, mu64, bias_mean64)
    variance64 = F.linear(x64.square(), var64, bias_var64)
    (mean64 * grad_mean.double() + variance64 * grad_variance.double()).sum().backward()

    bound = 8 * torch.finfo(dtype).eps / 2
    for got, want in [(mean, mean64), (variance, variance64)] + [
        (t.grad, r.grad) for t, r in zip(inputs, rounded, strict=True)
    ]:
        assert got.dtype in (dtype, torch.float32)
        assert float((got.detach().double() - want).norm() / want.norm()) < bound
    assert all(t.grad.dtype == torch.float32 for t in inputs)


def test_reduced_precision_moments_are_sampled_in_float32() -> None:
    """float16 cannot hold v_min: its pre-activations are drawn in float32 and cast back, so a
    zero variance still has a zero (not an infinite) gradient."""
    torch.manual_seed(4)
    mean = torch.zeros(200, 50, dtype=torch.float16, requires_grad=True)
    variance = torch.full((200, 50), 1e-2, dtype=torch.float16)
    variance[:, 0] = 0.0
    variance.requires_grad_()
    out = sample_preactivations(mean, variance, (2,))
    assert out.dtype == torch.float16 and out.shape == (2, 200, 50)
    out.backward(torch.ones_like(out))
    assert bool(variance.grad.isfinite().all()) and bool((variance.grad[:, 0] == 0).all())
    z = (out[:, :, 1:].double() / 0.1).flatten()  # ~ N(0, 1) up to float16 rounding of v
    assert abs(float(z.std()) - 1) < 5 * math.sqrt(2 / z.numel()) + 1e-3
