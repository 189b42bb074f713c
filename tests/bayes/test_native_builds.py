"""The native kernels as built for the other instruction sets this CPU runs: AVX2 (8 lanes, with
its own bit-field code for the exponent and mantissa of sigma) and portable code.

`native.kernels()` builds only the widest set torch uses here, so without these tests the code
that users of other CPUs run would never execute in CI. Each build is checked against
independent references, as `test_native.py` checks the default one: N(0, 1) moments, fair
signs that are exactly the bits of Philox4x32-10, float64 softplus, sigmoid, sum log sigma and
KL, the default build's gradients, and local reparameterization's pre-activations and their
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from bbb_lightning.bayes import native

F32_ULP = 2.0**-23
CAPABILITY = torch.backends.cpu.get_cpu_capability()
NO_AVX2 = pytest.mark.skipif(CAPABILITY not in ("AVX2", "AVX512"), reason=f"{CAPABILITY} CPU")


@pytest.fixture(scope="module", params=[pytest.param("AVX2", marks=NO_AVX2), "portable"])
def build(request: pytest.FixtureRequest) -> ModuleType:
    if native.kernels() is None:
        pytest.skip("native kernels could not be built here (no compiler?)")
    default = CAPABILITY if CAPABILITY in ("AVX2", "AVX512") else "portable"
    if request.param == default:
        pytest.skip("the default build, tested by test_native.py")
    return native.build(request.param)


def standard_normal_ok(values: torch.Tensor) -> None:
    values = values.double().reshape(-1)
    se = 1 / math.sqrt(values.numel())
    assert abs(float(values.mean())) < 5 * se
    assert abs(float(values.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((values**4).mean()) - 3) < 5 * math.sqrt(96) * se
    assert abs(float((values[1:] * values[:-1]).mean())) < 5 * se


def test_normals_signs_and_one_pass_draws(build: ModuleType) -> None:
    n = 200_003
    standard_normal_ok(build.normal_(torch.empty(n), 123))
    signs = build.random_signs_(torch.empty(n), 321)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(signs.double().mean())) < 5 / math.sqrt(n)
    mu, sigma = torch.randn(n), torch.rand(n) + 0.1
    draws = build.scaled_normal_(torch.empty(2, n), sigma, mu, 7)
    standard_normal_ok((draws - mu) / sigma)


def test_the_generator_is_philox4x32_10_on_8_lanes(
    build: ModuleType, philox_signs: Callable[[int, int, int], torch.Tensor]
) -> None:
    seed = 0x7EDCBA9876543210
    expected = philox_signs(seed, 8, 3)
    assert torch.equal(build.random_signs_(torch.empty(len(expected) - 5), seed), expected[:-5])


def test_softplus_sigmoid_and_sum_log_sigma_match_float64(build: ModuleType) -> None:
    torch.manual_seed(13)
    rho = torch.cat([torch.linspace(-80, 40, 100_001), torch.randn(300_001) * 4 - 3])
    rho[::7] = -60.0  # small-rho lanes next to ordinary ones
    rho64 = rho.double()
    for min_scale in (0.0, 1e-3):
        sigma, dsigma, log_sum = build.softplus_scale(rho, min_scale, True)
        ref = F.softplus(rho64) + min_scale
        normal = ref > 1e-37
        assert torch.allclose(sigma.double()[normal], ref[normal], rtol=3 * F32_ULP, atol=0)
        assert torch.allclose(dsigma.double(), torch.sigmoid(rho64), rtol=4 * F32_ULP, atol=1e-44)
        tiny = (rho64 < -20) & (min_scale == 0)
        ref_log_sum = float(torch.where(tiny, rho64 - 0.5 * ref, ref.log()).sum())
        assert abs(log_sum - ref_log_sum) < 1e-6 * abs(ref_log_sum)


def test_the_joint_node_matches_float64_and_the_default_build(build: ModuleType) -> None:
    torch.manual_seed(14)
    mu = torch.randn(123, 457) * 0.3
    rho = torch.empty(123, 457).uniform_(-8, 3)
    loc, scale = 0.1, 0.7
    variance, _, kl = build.sample_with_kl(mu, rho, 2, [], 5, 0.0, loc, scale)  # no noise
    sigma64 = F.softplus(rho.double())
    assert torch.allclose(variance.double(), sigma64.square(), rtol=6 * F32_ULP, atol=1e-44)
    kl64 = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu.double(), sigma64), torch.distributions.Normal(loc, scale)
    ).sum()
    assert math.isclose(float(kl), float(kl64), rel_tol=1e-6)
    grad = torch.randn(123, 457)
    args = (grad, torch.empty(0), mu, rho, 2, 0.37, 0.37 / scale**2, loc, 0.0, True, True)
    got_mu, got_rho = build.sample_with_kl_backward(*args)
    expected_mu, expected_rho = native.kernels().sample_with_kl_backward(*args)
    for got, expected in ((got_mu, expected_mu), (got_rho, expected_rho)):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_local_noise_and_its_gradient_match_float64(build: ModuleType) -> None:
    torch.manual_seed(15)
    mean, variance = torch.randn(3, 1001), torch.rand(3, 1001) * 2
    variance[:, ::9] = 0.0
    out, eps = build.local_noise(mean, variance, [4], 17, 1e-12, True)
    standard_normal_ok(eps)
    std64 = variance.double().clamp_min(1e-12).sqrt()
    assert torch.allclose(out.double(), mean.double() + std64 * eps.double(), rtol=1e-6, atol=1e-6)
    grad = torch.randn(4, 3, 1001)
    grad_mean, grad_variance = build.local_noise_backward(grad, eps, variance, 1e-12)
    assert torch.allclose(grad_mean.double(), grad.double().sum(0), rtol=1e-5, atol=1e-5)
    expected = torch.where(
        variance.double() > 0, (grad.double() * eps.double()).sum(0) / (2 * std64), 0.0
    )
    assert torch.allclose(grad_variance.double(), expected, rtol=1e-5, atol=1e-5)
