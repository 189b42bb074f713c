"""The native CPU kernels (bbb_lightning.bayes.native) against independent references.

Normals: moments and a Kolmogorov-Smirnov distance against N(0, 1) (torch.distributions),
with bounds of several standard errors for the sample size; random signs: their mean and
lagged products against 0, with the same bounds. Softplus, sigmoid, sum log sigma,
the KL's rho-gradient and the joint draw-and-KL node: float64 torch ops, torch.distributions'
KL and autograd, to a few float32 ulps.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from bbb_lightning.bayes import (
    MeanFieldNormal,
    bayesianize,
    gaussian_ops,
    kl_divergence,
    native,
    sample_forward_with_kl,
)
from bbb_lightning.bayes.gaussian_ops import ScaleValues, gaussian_kl
from bbb_lightning.bayes.priors import GaussianPrior

needs_native = pytest.mark.skipif(
    native.kernels() is None, reason="native kernels could not be built here (no compiler?)"
)
F32_ULP = 2.0**-23


def draws_on_one_and_two_threads(seed: int, draw: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    """``draw()`` right after ``torch.manual_seed(seed)``, on 1 and then on 2 intra-op threads
    (the autouse fixture of conftest.py restores the thread count after the test)."""
    draws = []
    for count in (1, 2):
        torch.set_num_threads(count)
        torch.manual_seed(seed)
        draws.append(draw())
    return draws


@needs_native
def test_normals_match_the_standard_normal() -> None:
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of any block: the tail is drawn too
    eps = native.standard_normal((n,), torch.zeros(1)).double()
    assert eps.shape == (n,) and bool(torch.isfinite(eps).all())
    se = 1 / math.sqrt(n)
    assert abs(float(eps.mean())) < 5 * se
    assert abs(float(eps.var()) - 1) < 5 * math.sqrt(2) * se  # var of eps^2 is 2
    assert abs(float((eps**3).mean())) < 5 * math.sqrt(15) * se
    assert abs(float((eps**4).mean()) - 3) < 5 * math.sqrt(96) * se
    # Kolmogorov-Smirnov: P(sqrt(n) D > 1.95) < 0.001.
    sorted_eps, _ = eps.sort()
    cdf = Normal(0.0, 1.0).cdf(sorted_eps)
    grid = torch.arange(1, n + 1, dtype=torch.float64) / n
    distance = torch.maximum(grid - cdf, cdf - (grid - 1 / n)).max()
    assert float(distance) * math.sqrt(n) < 1.95


@needs_native
def test_normals_are_uncorrelated_across_neighbours_and_calls() -> None:
    torch.manual_seed(1)
    n = 400_000
    a = native.standard_normal((n,), torch.zeros(1)).double()
    b = native.standard_normal((n,), torch.zeros(1)).double()
    bound = 5 / math.sqrt(n)
    for lag in (1, 2, 8, 16, 32, 64):  # within and across lanes and Philox blocks
        assert abs(float((a[lag:] * a[:-lag]).mean())) < bound
    assert abs(float((a * b).mean())) < bound


@needs_native
def test_normals_follow_the_torch_seed_and_not_the_thread_count() -> None:
    one_thread, two_threads = draws_on_one_and_two_threads(
        3, lambda: native.standard_normal((3, 70_001), torch.zeros(1))
    )
    assert torch.equal(one_thread, two_threads)
    assert not torch.equal(one_thread, native.standard_normal((3, 70_001), torch.zeros(1)))


@needs_native
def test_local_noise_follows_the_torch_seed_and_not_the_thread_count() -> None:
    mean, variance = torch.randn(70, 1001), torch.rand(70, 1001)

    def draw() -> torch.Tensor:
        return native.local_noise(mean, variance, (3,), 1e-12, False)[0]

    one_thread, two_threads = draws_on_one_and_two_threads(4, draw)
    assert torch.equal(one_thread, two_threads)
    assert not torch.equal(one_thread, draw())


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (2, 3, 5)])
def test_standard_normal_shapes_and_fallback_dtypes(shape: tuple[int, ...]) -> None:
    for like in (torch.zeros(1), torch.zeros(1, dtype=torch.float64)):
        eps = native.standard_normal(shape, like)
        assert eps.shape == shape and eps.dtype == like.dtype


@needs_native
def test_random_signs_are_fair_uncorrelated_and_thread_independent() -> None:
    """Each sign is one bit of a Philox word: fair, uncorrelated within a word (lag 1), across
    words and lanes (lags 32, 512) and across Philox calls (lag 2048 at 16 lanes); as the
    normals, a function of the torch seed and not of the thread count."""
    n = 1_000_003
    one_thread, two_threads = draws_on_one_and_two_threads(
        4, lambda: native.random_signs((n,), torch.zeros(1))
    )
    assert torch.equal(one_thread, two_threads)
    signs = one_thread.double()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    bound = 5 / math.sqrt(n)  # each product is +-1 with variance 1
    assert abs(float(signs.mean())) < bound
    for lag in (1, 7, 31, 32, 33, 512, 2048):
        assert abs(float((signs[lag:] * signs[:-lag]).mean())) < bound
    again = native.random_signs((n,), torch.zeros(1)).double()
    assert abs(float((signs * again).mean())) < bound


@pytest.mark.parametrize("shape", [(0,), (1,), (33,), (2, 3, 700)])
def test_random_signs_shapes_and_fallback_dtypes(shape: tuple[int, ...]) -> None:
    for like in (torch.zeros(1), torch.zeros(1, dtype=torch.float64)):
        signs = native.random_signs(shape, like)
        assert signs.shape == shape and signs.dtype == like.dtype
        assert bool((signs.abs() == 1).all())


def reference_scale(rho: torch.Tensor, min_scale: float) -> tuple[torch.Tensor, ...]:
    rho64 = rho.double()
    sigma = F.softplus(rho64) + min_scale
    # log sigma where sigma underflows in float32: rho - sigma / 2 (see gaussian_ops)
    log_sigma = torch.where((rho64 < -20) & (min_scale == 0), rho64 - 0.5 * sigma, sigma.log())
    return sigma, torch.sigmoid(rho64), log_sigma.sum()


@needs_native
@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
def test_softplus_scale_matches_float64(min_scale: float) -> None:
    rho = torch.cat([torch.linspace(-80, 40, 100_001), torch.tensor([-200.0, 0.0, 20.0, 21.0])])
    sigma, dsigma, log_sum = native.softplus_scale(rho, min_scale, log_sum=True)
    ref_sigma, ref_dsigma, ref_log_sum = reference_scale(rho, min_scale)
    normal = ref_sigma > 1e-37  # float32 normal range; below it only absolute accuracy
    # sigma: under 2 ulps measured (the kernels' log1p on [0, 1]), held to 3 here.
    assert torch.allclose(sigma.double()[normal], ref_sigma[normal], rtol=3 * F32_ULP, atol=0)
    assert torch.allclose(sigma.double(), ref_sigma, rtol=3 * F32_ULP, atol=1e-44)
    assert torch.allclose(dsigma.double(), ref_dsigma, rtol=4 * F32_ULP, atol=1e-44)
    # Each log carries at most a few ulps of its own magnitude.
    tolerance = 8 * F32_ULP * float(reference_scale(rho, min_scale)[2].abs()) + 1e-3
    assert abs(log_sum - float(ref_log_sum)) < tolerance
    assert native.softplus_scale(rho, min_scale, log_sum=False)[2] == 0.0


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_sum_log_sigma_over_millions_of_weights_matches_float64(threads: int) -> None:
    """Millions of terms (the per-lane sums of exponents are flushed many times), small-rho
    lanes mixed into most vectors, a partial last vector."""
    torch.manual_seed(12)
    rho = torch.randn(3_000_001) * 4 - 3
    rho[::7] = -60.0  # sigma ~ 1e-26: the small-rho form, next to ordinary lanes
    torch.set_num_threads(threads)  # restored by the autouse fixture of conftest.py
    log_sum = native.softplus_scale(rho, 0.0, log_sum=True)[2]
    reference = float(reference_scale(rho, 0.0)[2])
    # float32 sigma to 3 ulps, each log to a few ulps of its own magnitude: far below 1e-6
    assert abs(log_sum - reference) < 1e-6 * abs(reference)


@needs_native
@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
def test_kl_rho_grad_matches_autograd_in_float64(min_scale: float) -> None:
    rho = torch.cat([torch.linspace(-60, 30, 50_001), torch.tensor([-120.0])])
    sigma, dsigma, _ = native.softplus_scale(rho, min_scale, log_sum=False)
    weight, grad = 0.37, 0.8  # w = g / s^2 with s^2 = g / w
    got = native.kl_rho_grad(rho, sigma, dsigma, weight, grad, min_scale)
    rho64 = rho.double().requires_grad_()
    sigma64 = F.softplus(rho64) + min_scale
    log_sigma = torch.where((rho64 < -20) & (min_scale == 0), rho64 - 0.5 * sigma64, sigma64.log())
    (weight * sigma64.square().sum() / 2 - grad * log_sigma.sum()).backward()
    expected = rho64.grad
    assert torch.isfinite(got).all()
    assert torch.allclose(
        got.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max())
    )


@needs_native
def test_the_layers_use_the_kernels_and_match_the_float64_kl() -> None:
    torch.manual_seed(4)
    q = MeanFieldNormal(torch.randn(300, 200) * 0.1, GaussianPrior(0.0, 0.5), rho_init=(-6, 2))
    values = q.scale_values()
    assert values.native
    prior = q.prior.distribution()
    kl = gaussian_kl(q.mu, q.rho, values, prior.loc, prior.scale)
    expected = torch.distributions.kl_divergence(
        Normal(q.mu.double(), F.softplus(q.rho.double())), Normal(0.0, 0.5)
    ).sum()
    assert math.isclose(float(kl.detach()), float(expected.detach()), rel_tol=1e-5)
    kl.backward()
    mu64 = q.mu.detach().double().requires_grad_()
    rho64 = q.rho.detach().double().requires_grad_()
    torch.distributions.kl_divergence(
        Normal(mu64, F.softplus(rho64)), Normal(0.0, 0.5)
    ).sum().backward()
    assert torch.allclose(q.rho.grad.double(), rho64.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(q.mu.grad.double(), mu64.grad, rtol=1e-5, atol=1e-7)


@needs_native
@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_the_profiler_sees_every_native_call_of_a_training_step(estimator: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    net = bayesianize(torch.nn.Sequential(torch.nn.Linear(6, 5)), estimator=estimator)
    x = torch.randn(4, 6)

    def step() -> None:
        out, kl = sample_forward_with_kl(net, x, 1)
        (out.square().sum() + kl).backward()

    step()  # outside the profiler
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = [event.name for event in prof.events() if event.name.startswith("bbb_lightning::")]
    # weight and bias: one joint forward and one joint backward each; local reparameterization
    # also draws its pre-activations (and takes their gradient) natively, flipout its input and
    # output signs
    expected = {"bbb_lightning::sample_with_kl": 2, "bbb_lightning::sample_with_kl_backward": 2}
    if estimator == "local":
        expected |= {"bbb_lightning::local_noise": 1, "bbb_lightning::local_noise_backward": 1}
    if estimator == "flipout":
        expected["bbb_lightning::random_signs_"] = 2
    assert {name: names.count(name) for name in set(names)} == expected


def test_float64_keeps_the_torch_ops() -> None:
    rho = torch.zeros(3, dtype=torch.float64)
    assert not ScaleValues(rho, 0.0).native


def run_python(code: str, env_value: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, native.ENV_VAR: env_value}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_the_environment_variable_turns_the_kernels_off() -> None:
    code = (
        "import torch; from bbb_lightning.bayes import native, bayesianize, kl_divergence;"
        "net = bayesianize(torch.nn.Linear(4, 3));"
        "loss = net(torch.randn(5, 4)).sum() + kl_divergence(net); loss.backward();"
        "print(native.status())"
    )
    result = run_python(code, "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch"


def test_a_bad_environment_value_is_a_one_line_error() -> None:
    result = run_python("from bbb_lightning.bayes import native; native.kernels()", "fast")
    assert result.returncode != 0
    assert "BBB_LIGHTNING_NATIVE must be 0 or 1" in result.stderr and "'fast'" in result.stderr


@needs_native
def test_a_lock_left_by_an_interrupted_build_does_not_block_the_next() -> None:
    """torch waits forever on its lock file if a build was killed after creating it; the
    build takes its own operating-system lock, so such a file is known stale and removed."""
    code = (
        "import torch; from bbb_lightning.bayes import native;"
        "isa = torch.backends.cpu.get_cpu_capability();"
        "stale = native.build_directory(isa) / 'lock'; stale.touch();"
        "native.build(isa); print(stale.exists())"
    )
    result = run_python(code, "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@needs_native
@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_training_steps_agree_with_and_without_the_kernels(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same data, same initial weights: after 30 steps the native and the torch-op paths reach
    the same loss to within the Monte Carlo spread (their noise streams differ)."""

    def train() -> float:
        torch.manual_seed(5)
        net = bayesianize(
            torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)),
            estimator=estimator,
        )
        x = torch.randn(256, 20)
        y = (x[:, 0] > 0).long()
        optimizer = torch.optim.Adam(net.parameters(), lr=0.01)
        for _ in range(60):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y) + kl_divergence(net) / 10_000
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return float(F.cross_entropy(net(x), y))

    with_kernels = train()
    monkeypatch.setattr(native, "kernels", lambda: None)
    assert native.status() == "torch"
    without = train()
    assert with_kernels < 0.3 and without < 0.3
    assert abs(with_kernels - without) < 0.1


def sample_with_kl_one(
    mu: torch.Tensor,
    rho: torch.Tensor,
    use: int,
    sample_shape: tuple[int, ...],
    min_scale: float,
    loc: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gaussian_ops.sample_with_kl for one tensor: (out, its KL)."""
    joint = gaussian_ops.sample_with_kl(
        [mu], [rho], use, list(sample_shape), [min_scale], [loc], [scale]
    )
    assert joint is not None
    return joint[0][0], joint[1][0]


@needs_native
def test_the_generator_is_philox4x32_10(
    philox: Callable[[tuple[int, int, int, int], tuple[int, int]], list[int]],
    philox_signs: Callable[[int, int, int], torch.Tensor],
) -> None:
    """The Python reference gives Random123's known answers, and the signs (one Philox bit
    each) are exactly that reference's bits for this build's lane count."""
    word = 0xFFFFFFFF
    assert philox((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox((word,) * 4, (word, word)) == [
        0x408F276D,
        0x41C83B0E,
        0xA20BC7C6,
        0x6D5451FD,
    ]
    lanes = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8
    seed = 0x0123456789ABCDEF
    expected = philox_signs(seed, lanes, 3)
    got = native.kernels().random_signs_(torch.empty(len(expected) - 7), seed)
    assert torch.equal(got, expected[: len(expected) - 7])


USES = {
    "draw": gaussian_ops.DRAW,
    "perturbation": gaussian_ops.PERTURBATION,
    "variance": gaussian_ops.VARIANCE,
}


def float64_reference(
    mu: torch.Tensor,
    rho: torch.Tensor,
    eps: torch.Tensor,
    use: str,
    min_scale: float,
    loc: float,
    scale: float,
    grad: torch.Tensor,
    kl_grad: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mu64, rho64, out64, kl64): the use of sigma (with the node's ``eps``) and the KL of
    torch.distributions in float64 torch ops, after the backward of <grad, out> + kl_grad KL
    (the gradients in ``mu64.grad`` and ``rho64.grad``)."""
    mu64 = mu.detach().double().requires_grad_()
    rho64 = rho.detach().double().requires_grad_()
    sigma64 = F.softplus(rho64) + min_scale
    if use == "draw":
        out64 = mu64 + sigma64 * eps
    elif use == "perturbation":
        out64 = sigma64 * eps
    else:
        out64 = sigma64.square()
    kl64 = torch.distributions.kl_divergence(Normal(mu64, sigma64), Normal(loc, scale)).sum()
    (torch.sum(grad.double() * out64) + kl_grad * kl64).backward()
    return mu64, rho64, out64.detach(), kl64.detach()


@needs_native
@pytest.mark.parametrize(
    ("use", "sample_shape"),
    [("draw", ()), ("draw", (3,)), ("perturbation", ()), ("perturbation", (3,)), ("variance", ())],
)
@pytest.mark.parametrize("min_scale", [0.0, 1e-3])
def test_sample_with_kl_matches_float64_autograd(
    use: str, sample_shape: tuple[int, ...], min_scale: float
) -> None:
    """Value and gradients of <G, out> + g KL against float64 torch ops and the KL of
    torch.distributions, with rho from -60 (sigma ~ 1e-26) to 3."""
    torch.manual_seed(6)
    shape = (123, 457)  # 56,211 weights: several parallel chunks and a partial last block
    mu = (torch.randn(shape) * 0.3).requires_grad_()
    rho = torch.empty(shape).uniform_(-8, 3)
    rho[0, :50] = torch.linspace(-60, -15, 50)  # where sigma underflows in float32 and below
    rho.requires_grad_()
    loc, scale, kl_grad = 0.1, 0.7, 0.37
    state = torch.get_rng_state()
    out, kl = sample_with_kl_one(mu, rho, USES[use], sample_shape, min_scale, loc, scale)
    torch.set_rng_state(state)  # the raw kernel draws the node's key again, and its eps
    eps = native.sample_with_kl(mu, rho, USES[use], sample_shape, min_scale, loc, scale)[1].double()
    grad = torch.randn(out.shape)
    (torch.sum(grad * out) + kl_grad * kl).backward()

    mu64, rho64, expected, kl64 = float64_reference(
        mu, rho, eps, use, min_scale, loc, scale, grad, kl_grad
    )

    assert out.shape == (*sample_shape, *shape)
    # float32 rounding of each term: a few ulps of |mu| + |sigma eps| (the sum may cancel). sigma
    # carries up to 3 ulps (test_softplus_scale_matches_float64), which sigma^2 doubles.
    mean = mu64.detach() if use == "draw" else torch.zeros((), dtype=torch.float64)
    size = mean.abs() + (expected - mean).abs()
    error = (out.detach().double() - expected).abs()
    ulps = 6 if use == "variance" else 4
    assert bool((error <= ulps * F32_ULP * size + 1e-44).all())
    # The KL is a sum of 56,211 terms of magnitude up to 60: a few ulps of the largest partial.
    assert math.isclose(float(kl.detach()), float(kl64), rel_tol=1e-6)
    for got, ref in ((mu.grad, mu64.grad), (rho.grad, rho64.grad)):
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@needs_native
@pytest.mark.parametrize("trained", ["mu", "rho"])
@pytest.mark.parametrize("use", list(USES))
def test_sample_with_kl_with_only_mu_or_only_rho_trained_matches_float64(
    trained: str, use: str
) -> None:
    """With only one of mu and rho requiring grad, the node's backward computes only that
    gradient, still that of float64 autograd, and leaves the other None."""
    torch.manual_seed(16)
    mu = (torch.randn(37, 53) * 0.3).requires_grad_(trained == "mu")
    rho = torch.empty(37, 53).uniform_(-8, 3).requires_grad_(trained == "rho")
    loc, scale, kl_grad = -0.2, 0.5, 1.7
    sample_shape = () if use == "variance" else (2,)
    state = torch.get_rng_state()
    out, kl = sample_with_kl_one(mu, rho, USES[use], sample_shape, 0.0, loc, scale)
    torch.set_rng_state(state)
    eps = native.sample_with_kl(mu, rho, USES[use], sample_shape, 0.0, loc, scale)[1].double()
    grad = torch.randn(out.shape)
    (torch.sum(grad * out) + kl_grad * kl).backward()

    mu64, rho64, _, _ = float64_reference(mu, rho, eps, use, 0.0, loc, scale, grad, kl_grad)
    got, ref = (mu.grad, mu64.grad) if trained == "mu" else (rho.grad, rho64.grad)
    assert (rho if trained == "mu" else mu).grad is None
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@needs_native
@pytest.mark.parametrize("use", list(USES))
def test_one_node_over_two_tensors_matches_float64_for_each(use: str) -> None:
    """A layer's weight and bias from one node, each with its own min_scale and prior: each
    value, KL and gradient is that of float64 autograd for that tensor alone, each tensor gets
    its own noise."""
    torch.manual_seed(17)
    shapes, min_scales, locs, scales = [(61, 33), (61,)], [0.0, 1e-3], [0.1, -0.3], [0.7, 2.0]
    mus = [(torch.randn(shape) * 0.3).requires_grad_() for shape in shapes]
    rhos = [torch.empty(shape).uniform_(-8, 3).requires_grad_() for shape in shapes]
    sample_shape = [] if use == "variance" else [2]
    state = torch.get_rng_state()
    joint = gaussian_ops.sample_with_kl(
        mus, rhos, USES[use], sample_shape, min_scales, locs, scales
    )
    assert joint is not None
    outs, kls = joint
    torch.set_rng_state(state)  # the node draws one key per tensor, in order
    eps = [
        native.sample_with_kl(mu, rho, USES[use], tuple(sample_shape), m, loc, scale)[1].double()
        for mu, rho, m, loc, scale in zip(mus, rhos, min_scales, locs, scales, strict=True)
    ]
    grads = [torch.randn(out.shape) for out in outs]
    kl_grads = [0.37, 1.9]
    terms = zip(grads, outs, kl_grads, kls, strict=True)
    loss = sum(torch.sum(grad * out) + weight * kl for grad, out, weight, kl in terms)
    loss.backward()
    if use != "variance":  # independent streams: the bias's noise is not the weight's first row
        assert not torch.equal(eps[1][:, :33], eps[0][:, 0, :])

    for t in range(2):
        mu64, rho64, expected, kl64 = float64_reference(
            mus[t], rhos[t], eps[t], use, min_scales[t], locs[t], scales[t], grads[t], kl_grads[t]
        )
        assert math.isclose(float(kls[t].detach()), float(kl64), rel_tol=1e-6)
        assert torch.allclose(outs[t].detach().double(), expected, rtol=1e-5, atol=1e-6)
        for got, ref in ((mus[t].grad, mu64.grad), (rhos[t].grad, rho64.grad)):
            assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


@needs_native
@pytest.mark.parametrize("use", list(USES))
def test_the_kl_of_a_million_equal_terms_keeps_float64_accuracy(use: str) -> None:
    """Sums of equal terms round the same way at every float addition: sigma = min_scale and
    mu - m equal everywhere, with a prior as narrow as sigma so that the sums of sigma^2 and
    (mu - m)^2 carry the KL (0.5 per weight)."""
    n = 1_000_003
    mu = torch.full((n,), 2e-3, requires_grad=True)
    rho = torch.full((n,), -60.0, requires_grad=True)  # sigma = min_scale + e^-60
    _, kl = sample_with_kl_one(mu, rho, USES[use], (), 1e-3, 1e-3, 1e-3)
    kl64 = n * (0.5 * (1e-6 + 1e-6) / 1e-6 - 0.5)  # log(s / sigma) = 0
    # float32(1e-3) and float32(2e-3) alone move each term by 1.0e-7 of itself; summing a
    # million of them adds at most as much again
    assert math.isclose(float(kl.detach()), kl64, rel_tol=2e-7)


@needs_native
def test_sample_with_kl_draws_independent_standard_normals_per_sample() -> None:
    torch.manual_seed(7)
    n = 200_003
    mu = torch.zeros(n, requires_grad=True)
    rho = torch.full((n,), math.log(math.e - 1), requires_grad=True)  # sigma = 1: out = eps
    out, _ = sample_with_kl_one(mu, rho, gaussian_ops.DRAW, (4,), 0.0, 0.0, 1.0)
    eps = out.detach().double()
    se = 1 / math.sqrt(n)
    for row in eps:
        assert abs(float(row.mean())) < 5 * se
        assert abs(float(row.var()) - 1) < 5 * math.sqrt(2) * se
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(float((eps[a] * eps[b]).mean())) < 5 * se
    draws = draws_on_one_and_two_threads(
        8, lambda: sample_with_kl_one(mu, rho, 0, (2,), 0.0, 0.0, 1.0)[0]
    )
    assert torch.equal(draws[0], draws[1])


@needs_native
@pytest.mark.parametrize("with_mean", [True, False])
def test_scaled_normal_draws_mu_plus_sigma_times_independent_normals(with_mean: bool) -> None:
    torch.manual_seed(10)
    n = 100_003  # a partial last block
    mu = torch.randn(n) * 3
    sigma = torch.rand(n) * 2 + 0.1
    out = native.scaled_normal((4,), sigma, mu if with_mean else None)
    assert out.shape == (4, n)
    eps = ((out - mu) if with_mean else out).double() / sigma.double()
    se = 1 / math.sqrt(n)
    for row in eps:  # each sample standard normal, after removing mu and sigma
        assert abs(float(row.mean())) < 5 * se
        assert abs(float(row.var()) - 1) < 5 * math.sqrt(2) * se
        assert abs(float((row**4).mean()) - 3) < 5 * math.sqrt(96) * se
    for a in range(4):
        for b in range(a + 1, 4):
            assert abs(float((eps[a] * eps[b]).mean())) < 5 * se
    for lag in (1, 16, 64):
        assert abs(float((eps[0, lag:] * eps[0, :-lag]).mean())) < 5 * se
    draws = draws_on_one_and_two_threads(11, lambda: native.scaled_normal((3,), sigma, mu))
    assert torch.equal(draws[0], draws[1])


@needs_native
def test_a_draw_without_gradients_takes_the_one_pass_kernel() -> None:
    from torch.profiler import ProfilerActivity, profile

    q = MeanFieldNormal(torch.full((50, 40), 2.0), GaussianPrior())
    with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
        draws = q.rsample((3,))
        perturbations = q.perturbation((3,))
    names = [event.name for event in prof.events() if event.name.startswith("bbb_lightning::")]
    assert names.count("bbb_lightning::scaled_normal_") == 2
    assert "bbb_lightning::normal_" not in names  # no separate eps
    # mu + sigma eps and sigma eps, sigma = softplus(U(-5, -4)) in 0.0067 to 0.018
    for value, mean in ((draws, 2.0), (perturbations, 0.0)):
        assert value.shape == (3, 50, 40) and value.grad_fn is None
        assert abs(float(value.mean()) - mean) < 0.002
        assert 0.005 < float(value.std()) < 0.02


@needs_native
@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_the_layer_kl_comes_from_the_forward_node(estimator: str) -> None:
    """sample_forward_with_kl takes each tensor's KL from the node that drew it; without the
    record, kl_divergence computes the same value afresh, and sees an update of mu."""
    torch.manual_seed(9)
    net = bayesianize(
        torch.nn.Sequential(torch.nn.Linear(30, 20)),
        prior=GaussianPrior(0.0, 0.5),
        estimator=estimator,
    )
    out, kl = sample_forward_with_kl(net, torch.randn(8, 30), 1)
    ((stack, _),) = kl.grad_fn.next_functions  # kl_divergence sums the terms by one stack
    assert (kl.grad_fn.name(), stack.name()) == ("SumBackward0", "StackBackward0")
    nodes = {fn.name() for fn, _ in stack.next_functions if fn is not None}
    # both tensors' KLs come from their draw's node: no separate KL node
    assert nodes == {"torch::autograd::CppNode<(anonymous namespace)::SampleWithKLNode>"}
    expected = sum(
        torch.distributions.kl_divergence(
            Normal(q.mu.double(), F.softplus(q.rho.double())), Normal(0.0, 0.5)
        ).sum()
        for q in (net[0].weight_posterior, net[0].bias_posterior)
    )
    assert math.isclose(float(kl.detach()), float(expected.detach()), rel_tol=1e-6)
    (out.square().sum() + kl).backward()
    # Without a record the KL is computed afresh, and can be differentiated again.
    again = kl_divergence(net)
    assert math.isclose(float(again.detach()), float(kl.detach()), rel_tol=1e-6)
    again.backward()
    with torch.no_grad():
        net[0].weight_posterior.mu.add_(0.1)  # a new version of mu: not the forward's KL
    moved = kl_divergence(net)
    assert float(moved.detach()) > float(kl.detach())


@needs_native
def test_the_joint_node_refuses_a_second_derivative_as_once_differentiable_does() -> None:
    """Gradients taken with create_graph=True: first derivatives as usual (equal to those of a
    plain backward); differentiating them again raises instead of treating them as constants."""
    torch.manual_seed(3)
    mu = torch.randn(40, requires_grad=True)
    rho = torch.full((40,), -3.0, requires_grad=True)
    x = torch.randn(40, requires_grad=True)
    state = torch.get_rng_state()
    out, kl = sample_with_kl_one(mu, rho, gaussian_ops.DRAW, (), 0.0, 0.0, 1.0)
    grads = torch.autograd.grad((out * x).sum() + kl, (mu, rho), create_graph=True)
    torch.set_rng_state(state)  # the same eps
    out, kl = sample_with_kl_one(mu, rho, gaussian_ops.DRAW, (), 0.0, 0.0, 1.0)
    plain = torch.autograd.grad((out * x.detach()).sum() + kl, (mu, rho))
    for got, want in zip(grads, plain, strict=True):
        assert got.requires_grad and torch.equal(got.detach(), want)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grads[1].sum().backward()


@needs_native
def test_an_overflowing_kl_is_inf_from_the_forward_node_as_from_the_torch_ops() -> None:
    """sum sigma^2 beyond float32 (rho ~ 2e19): inf either way, not NaN from the node's
    compensated sum (inf - inf)."""
    q = MeanFieldNormal(torch.zeros(1), GaussianPrior(), rho_init=2e19)
    assert math.isinf(float(kl_divergence(q)))  # no forward: the torch ops
    q()
    assert math.isinf(float(kl_divergence(q)))  # the KL of the forward's native node


@needs_native
def test_a_cached_build_loads_without_announcing_a_compilation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    native.kernels()  # compiled, or loaded from the cache, once
    with caplog.at_level(logging.DEBUG, logger="bbb_lightning.bayes.native"):
        native.build(torch.backends.cpu.get_cpu_capability())
    assert [record.levelname for record in caplog.records] == ["DEBUG"]
    assert "loading native kernels" in caplog.records[0].message
