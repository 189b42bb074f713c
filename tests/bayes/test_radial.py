"""The radial posterior (Farquhar et al. 2020) against independent references: its entropy
against the Gaussian one (D = 1) and a float64 quadrature of its density, its draws against
their closed-form moments, its Monte Carlo KL against the closed-form expectation, and the
statistics (sigma, SNR) and estimator checks that every posterior meets.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from bbb_lightning.bayes import (
    MeanFieldNormal,
    RadialPosterior,
    VariationalPosterior,
    bayesianize,
    kl_divergence,
    posterior_kl,
    posterior_scales,
    sample_forward_with_kl,
    signal_to_noise,
)
from bbb_lightning.bayes.forward_pass import KLRecord
from bbb_lightning.bayes.priors import GaussianPrior
from bbb_lightning.bayes.radial import radial_entropy_constant
from bbb_lightning.evaluation.pruning import prune_by_snr

F64 = torch.float64


def quadrature_entropy(dimension: int) -> float:
    """-E log p(z) for z = r eps / |eps| in R^D, from its density 2 phi(rho) / (S rho^(D-1)),
    integrated over the radius rho (float64 trapezoid in t = log rho on [-40, log 12], where the
    integrand is smooth)."""
    t = torch.linspace(-40.0, math.log(12.0), 2_000_001, dtype=F64)
    rho = t.exp()
    phi = torch.exp(-0.5 * rho**2) / math.sqrt(2 * math.pi)
    area = 2 * math.pi ** (dimension / 2) / math.gamma(dimension / 2)
    log_density = torch.log(2 * phi) - math.log(area) - (dimension - 1) * torch.log(rho)
    return float(torch.trapezoid(-2 * phi * log_density * rho, t))


def test_the_entropy_constant_is_exact() -> None:
    assert radial_entropy_constant(1) == pytest.approx(0.5 * math.log(2 * math.pi * math.e))
    for dimension in (2, 3, 10):
        assert radial_entropy_constant(dimension) == pytest.approx(
            quadrature_entropy(dimension), abs=1e-6
        )


def radial(dimension: int = 5, rho: float = -1.0) -> RadialPosterior:
    torch.manual_seed(0)
    q = RadialPosterior(torch.linspace(-1, 1, dimension), GaussianPrior(), rho_init=rho).double()
    with torch.no_grad():
        q.rho.add_(torch.linspace(-0.5, 0.5, dimension, dtype=F64))
    return q


def test_draws_have_the_closed_form_moments_and_radius() -> None:
    q = radial()
    n = 40_000
    w = q.rsample((n,)).detach()
    mu, sigma = q.mu.detach(), q.scale.detach()
    variance = sigma**2 / 5
    assert ((w.mean(0) - mu).abs() <= 5 * (variance / n).sqrt()).all()
    # Var of a variance estimate: (E z^4 - var^2) / n, with E z^4 = 3 sigma^4 / (D (D + 2))
    fourth = 3 * sigma**4 / (5 * 7)
    assert ((w.var(0) - variance).abs() <= 5 * ((fourth - variance**2) / n).sqrt()).all()
    radius = ((w - mu) / sigma).norm(dim=1)  # |r|, half-normal
    assert abs(float(radius.mean()) - math.sqrt(2 / math.pi)) < 5 * math.sqrt((1 - 2 / math.pi) / n)
    torch.testing.assert_close(q.stddev, sigma / math.sqrt(5))


def test_the_monte_carlo_kl_converges_to_the_closed_form_expectation() -> None:
    """KL = -H(q) - E_q log p(w); for p = N(0, 1), E_q log p = sum -log(2 pi)/2 - (mu^2 +
    sigma^2 / D) / 2 in closed form."""
    q = radial()
    n = 20_000
    record = KLRecord()
    draws = q.rsample((n,))  # with their graph: the KL's gradient flows through them
    record.add_sample(q, draws)
    estimate = float(posterior_kl(q, record=record))
    mu, sigma = q.mu.detach(), q.scale.detach()
    entropy = float(sigma.log().sum()) + radial_entropy_constant(5)
    expected_log_p = float((-0.5 * math.log(2 * math.pi) - 0.5 * (mu**2 + sigma**2 / 5)).sum())
    reference = -entropy - expected_log_p
    per_draw = 0.5 * draws.detach().square().sum(1)  # the part of -log p(w) that varies
    assert abs(estimate - reference) < 5 * float(per_draw.std()) / math.sqrt(n)


def test_a_radial_network_trains_and_its_statistics_work() -> None:
    torch.manual_seed(1)
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)), posterior=RadialPosterior
    )
    x = torch.randn(128, 3)
    y = x.sum(1, keepdim=True)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(150):
        out, kl = sample_forward_with_kl(net, x, 2)
        loss = (out - y).square().mean() + kl / 10_000
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]
    q = net[0].weight_posterior
    scales = posterior_scales(net)
    torch.testing.assert_close(scales["0.weight"], (q.scale / math.sqrt(48)).detach())
    snr = signal_to_noise(net)
    torch.testing.assert_close(snr["0.weight"], (q.mu.abs() / q.stddev).detach())
    assert set(snr) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert torch.isfinite(kl_divergence(net))
    pruned = prune_by_snr(net, 0.5)  # half of the 48 + 16 + 16 + 1 weights, by radial SNR
    assert sum(int((p == 0).sum()) for p in pruned.parameters()) == round(0.5 * 81)


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_the_gaussian_only_estimators_refuse_it(estimator: str) -> None:
    with pytest.raises(TypeError, match="needs a Gaussian"):
        bayesianize(nn.Sequential(nn.Linear(3, 2)), posterior=RadialPosterior, estimator=estimator)


class ExpScale(MeanFieldNormal):
    """A subclass that changes sigma to exp(rho)."""

    @property
    def scale(self) -> Tensor:
        return self.rho.exp()

    @property
    def log_scale(self) -> Tensor:
        return self.rho


def test_a_subclass_that_changes_the_scale_draws_with_it() -> None:
    """float32, where the native kernels serve MeanFieldNormal itself: the subclass must still
    draw (in a layer and alone) with its own sigma, the one its distribution reports."""
    torch.manual_seed(2)
    net = bayesianize(nn.Sequential(nn.Linear(1, 2000, bias=False)), posterior=ExpScale)
    q = net[0].weight_posterior
    with torch.no_grad():
        q.mu.zero_()
        q.rho.fill_(0.5)  # exp: 1.65; softplus would give 0.97
        out = net(torch.ones(1, 1))
        alone = q.rsample((1000,))
    for draws in (out.reshape(-1), alone.reshape(-1)):
        n = draws.numel()
        std = float(draws.double().std())
        assert abs(std - math.exp(0.5)) < 5 * math.exp(0.5) / math.sqrt(2 * n)
    torch.testing.assert_close(q.distribution().stddev, q.scale)


class NoStddev(VariationalPosterior):
    """A posterior whose distribution has no stddev (a point mass, for the test)."""

    def __init__(self, initial_value: Tensor, prior: GaussianPrior) -> None:
        super().__init__(prior)
        self.mu = nn.Parameter(initial_value.detach().clone())

    @property
    def mean(self) -> Tensor:
        return self.mu

    def distribution(self) -> torch.distributions.Distribution:
        raise NotImplementedError

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        return self.mu.expand(*sample_shape, *self.mu.shape)


def test_a_posterior_without_stddev_is_named_not_skipped_silently() -> None:
    net = bayesianize(nn.Sequential(nn.Linear(2, 2)), posterior=NoStddev)
    with pytest.warns(RuntimeWarning, match=r"NoStddev \(tensor '0.weight'\) has no stddev"):
        assert posterior_scales(net) == {}
