"""MeanFieldNormal: sigma = softplus(rho) + min_scale, its initialisation and its closed-form KL."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from bbb_lightning.bayes import GaussianPrior, MeanFieldNormal, posterior_kl


def softplus_reference(rho: float) -> float:
    """log(1 + e^rho) in float64, written so that neither branch overflows nor cancels."""
    if rho > 0:
        return rho + math.log1p(math.exp(-rho))
    return math.log1p(math.exp(rho))


@pytest.mark.parametrize(
    ("dtype", "rtol"),
    # float32: a few ulps (eps = 1.2e-7). float64: F.softplus returns rho itself above rho = 20,
    # dropping log1p(e^-rho) < 2.1e-9, a relative error < 1.1e-10.
    [(torch.float32, 1e-6), (torch.float64, 2e-10)],
)
def test_scale_is_softplus_finite_and_positive(dtype: torch.dtype, rtol: float) -> None:
    rho = torch.linspace(-50, 50, 1001, dtype=dtype)
    q = MeanFieldNormal(torch.zeros(1001, dtype=dtype), GaussianPrior(), rho_init=0.0)
    with torch.no_grad():
        q.rho.copy_(rho)
    scale = q.scale.detach()
    assert scale.dtype == dtype
    assert torch.isfinite(scale).all()
    assert (scale > 0).all()
    # The reference sees exactly the rho values the posterior holds (converted exactly).
    reference = torch.tensor(
        [softplus_reference(r) for r in rho.double().tolist()], dtype=torch.float64
    )
    relative = (scale.double() - reference).abs() / reference
    assert relative.max().item() < rtol
    # log_scale is log(sigma) computed without going through an underflowing sigma.
    assert torch.allclose(q.log_scale.detach().double(), reference.log(), rtol=rtol, atol=rtol)


def test_log_scale_finite_with_finite_gradient_far_out() -> None:
    rho = torch.tensor([-500.0, -110.0, -60.0, -20.0, 0.0, 30.0, 500.0])
    q = MeanFieldNormal(torch.zeros(7), GaussianPrior(), rho_init=0.0)
    with torch.no_grad():
        q.rho.copy_(rho)
    q.log_scale.sum().backward()
    assert torch.isfinite(q.log_scale).all()
    assert torch.isfinite(q.rho.grad).all()
    # d log softplus(rho) / d rho = sigmoid(rho) / softplus(rho): 1 far left, 1/rho far right.
    assert q.rho.grad[0].item() == pytest.approx(1.0)
    assert q.rho.grad[-1].item() == pytest.approx(1 / 500, rel=1e-5)


def test_min_scale_is_a_floor() -> None:
    q = MeanFieldNormal(torch.zeros(5), GaussianPrior(), rho_init=0.0, min_scale=1e-3)
    with torch.no_grad():
        q.rho.copy_(torch.tensor([-50.0, -10.0, 0.0, 1.0, 10.0], dtype=torch.float32))
    expected = torch.tensor(
        [softplus_reference(r) + 1e-3 for r in q.rho.tolist()], dtype=torch.float64
    )
    assert (q.scale >= 1e-3).all()
    torch.testing.assert_close(q.scale.detach().double(), expected, rtol=1e-6, atol=0)
    assert torch.allclose(q.log_scale.detach().double(), expected.log(), rtol=1e-6)


def test_rho_init_constant() -> None:
    q = MeanFieldNormal(torch.randn(4, 6), GaussianPrior(), rho_init=-3.5)
    assert torch.equal(q.rho, torch.full((4, 6), -3.5))
    assert q.rho.requires_grad and q.mu.requires_grad


def test_rho_init_uniform_range() -> None:
    torch.manual_seed(0)
    q = MeanFieldNormal(torch.zeros(100, 100), GaussianPrior(), rho_init=(-6.0, -3.0))
    rho = q.rho.detach()
    assert (rho >= -6.0).all() and (rho <= -3.0).all()
    # 10^4 uniform draws cover the range: min/max within 1e-2 of the ends (P(miss) ~ e^-33).
    assert rho.min().item() < -5.99 and rho.max().item() > -3.01
    # Mean of U(-6, -3) is -4.5 with standard error (3 / sqrt 12) / 100 = 0.0087: 5 SE.
    assert abs(rho.mean().item() + 4.5) < 5 * 3 / math.sqrt(12) / 100
    # The default is U(-5, -4).
    default = MeanFieldNormal(torch.zeros(1000), GaussianPrior()).rho.detach()
    assert (default >= -5).all() and (default <= -4).all()


def test_initial_value_becomes_mu_as_a_copy() -> None:
    value = torch.randn(3, 2)
    q = MeanFieldNormal(value, GaussianPrior())
    assert torch.equal(q.mu, value)
    with torch.no_grad():
        q.mu.add_(1.0)
    assert not torch.equal(q.mu, value)


@pytest.mark.parametrize("rho_init", [(-3.0, -5.0), (1.0, 2.0, 3.0), (1.0,)])
def test_bad_rho_init_raises(rho_init: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="rho_init"):
        MeanFieldNormal(torch.zeros(3), GaussianPrior(), rho_init=rho_init)


def test_negative_min_scale_raises() -> None:
    with pytest.raises(ValueError, match=r"min_scale.*-0\.1"):
        MeanFieldNormal(torch.zeros(3), GaussianPrior(), min_scale=-0.1)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("rho_init", None),
        ("rho_init", "-5"),
        ("rho_init", ("-5", "-4")),
        ("rho_init", torch.tensor([-5.0, -4.0])),
        ("min_scale", None),
        ("min_scale", "0.1"),
    ],
)
def test_a_value_that_is_not_a_number_is_named(keyword: str, value: object) -> None:
    """Not a TypeError from deep inside (``'>=' not supported``, ``not iterable``)."""
    with pytest.raises(
        ValueError, match=f"posterior {keyword} must be .*, got {re.escape(repr(value))}"
    ):
        MeanFieldNormal(torch.zeros(3), GaussianPrior(), **{keyword: value})


def test_numpy_numbers_are_numbers() -> None:
    q = MeanFieldNormal(
        torch.zeros(3), GaussianPrior(), rho_init=np.float32(-3.0), min_scale=np.float64(0.5)
    )
    torch.testing.assert_close(q.scale, torch.full((3,), math.log1p(math.exp(-3.0)) + 0.5))


def test_scale_stays_positive_under_large_lr_sgd() -> None:
    """Large-lr SGD pushing the noise down: a raw ``Normal(loc, scale)`` parameter goes negative
    (the bug of a hand-written ``LinearVariationalNormal``); sigma = softplus(rho) cannot."""
    torch.manual_seed(0)
    lr, steps, shape = 2.0, 300, (1000,)
    target = torch.randn(shape)

    # The naive parametrization: scale is itself the trainable tensor.
    raw_scale = torch.full(shape, 0.5, requires_grad=True)
    naive = torch.optim.SGD([raw_scale], lr=lr)
    loss = ((target + raw_scale * torch.randn(shape) - target) ** 2).sum()
    loss.backward()
    naive.step()
    # scale <- scale (1 - 2 lr eps^2): negative wherever eps^2 > 1/4, i.e. for most entries.
    assert (raw_scale < 0).any()
    with pytest.raises(ValueError):
        Normal(target, raw_scale.detach(), validate_args=True)

    # Ours: the same objective (squared error of a draw; it only shrinks the noise).
    q = MeanFieldNormal(target, GaussianPrior(), rho_init=0.0)
    q.mu.requires_grad_(False)
    opt = torch.optim.SGD([q.rho], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((q.rsample() - target) ** 2).sum()
        loss.backward()
        opt.step()
        scale = q.scale.detach()
        assert torch.isfinite(scale).all() and (scale > 0).all()
        assert torch.isfinite(q.rho).all() and torch.isfinite(q.rho.grad).all()
    # The objective did shrink the noise substantially.
    assert q.scale.max().item() < 0.1


@pytest.mark.parametrize("prior_scale", [0.1, 1.0, 3.0])
def test_kl_agrees_with_torch_distributions_in_float64(prior_scale: float) -> None:
    generator = torch.Generator().manual_seed(1)
    mu = 2 * torch.randn(200, generator=generator, dtype=torch.float64)
    rho = -8 + 11 * torch.rand(200, generator=generator, dtype=torch.float64)  # U(-8, 3)
    # A float64 prior from the start: GaussianPrior(0.0, 0.1).double() would hold float32(0.1).
    prior = GaussianPrior(
        torch.tensor(0.0, dtype=torch.float64), torch.tensor(prior_scale, dtype=torch.float64)
    )
    q = MeanFieldNormal(mu, prior, rho_init=0.0)
    with torch.no_grad():
        q.rho.copy_(rho)
    ours = posterior_kl(q).item()

    reference = kl_divergence(
        Normal(mu, F.softplus(rho)), Normal(torch.zeros((), dtype=torch.float64), prior_scale)
    ).sum()
    assert ours == pytest.approx(reference.item(), rel=1e-6)

    # Closed form by hand: log(s / sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2.
    by_hand = 0.0
    for m, r in zip(mu.tolist(), rho.tolist(), strict=True):
        sigma = softplus_reference(r)
        by_hand += math.log(prior_scale / sigma) + (sigma**2 + m**2) / (2 * prior_scale**2) - 0.5
    assert ours == pytest.approx(by_hand, rel=1e-10)
