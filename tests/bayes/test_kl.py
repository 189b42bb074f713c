"""KL(q || p): closed forms against independent references, Monte Carlo convergence, reductions."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Laplace, Normal
from torch.distributions import kl_divergence as torch_kl

from bbb_lightning.bayes import (
    GaussianPrior,
    LaplacePrior,
    MeanFieldNormal,
    ScaleMixturePrior,
    bayesianize,
    kl_divergence,
    named_posteriors,
    posterior_kl,
    sample_forward,
)
from bbb_lightning.bayes.forward_pass import KLRecord
from bbb_lightning.bayes.priors import Prior

F64 = torch.float64
LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def f64(value: float) -> Tensor:
    """A float64 scalar (torch.distributions would turn a Python float into float32)."""
    return torch.tensor(value, dtype=F64)


def softplus64(rho: Tensor) -> Tensor:
    """softplus written out in float64 (log1p(exp(rho)), stable on both sides)."""
    rho = rho.double()
    return rho.clamp_min(0) + torch.log1p(torch.exp(-rho.abs()))


def small_net(
    prior: Prior, estimator: str = "reparameterization", middle: nn.Module | None = None
) -> nn.Module:
    """Linear + ``middle`` (default LayerNorm, parametrized) + Linear in float64 with random mu
    and rho."""
    torch.manual_seed(0)
    net = bayesianize(
        nn.Sequential(nn.Linear(4, 3), middle or nn.LayerNorm(3), nn.Linear(3, 2)),
        prior=prior,
        estimator=estimator,
    ).double()
    with torch.no_grad():
        for _, q in named_posteriors(net):
            q.mu.normal_(0.0, 0.5)
            q.rho.uniform_(-4.0, 1.0)
    return net


def test_closed_form_gaussian_prior_matches_torch_and_hand() -> None:
    prior = GaussianPrior(torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64))
    net = small_net(prior)
    ours = kl_divergence(net)

    reference = 0.0
    by_hand = 0.0
    for _, q in named_posteriors(net):
        mu, sigma = q.mu.detach().double(), softplus64(q.rho.detach())
        reference += torch_kl(Normal(mu, sigma), Normal(f64(0.3), f64(0.7))).sum().item()
        for m, s in zip(mu.flatten().tolist(), sigma.flatten().tolist(), strict=True):
            by_hand += math.log(0.7 / s) + (s**2 + (m - 0.3) ** 2) / (2 * 0.7**2) - 0.5
    assert ours.item() == pytest.approx(reference, rel=1e-10)
    assert ours.item() == pytest.approx(by_hand, rel=1e-10)


def normal_laplace_kl_by_hand(m: float, s: float, loc: float, b: float) -> float:
    """KL(N(m, s^2) || Laplace(loc, b)) = -H(N) + log 2b + E|w - loc| / b."""
    d = m - loc
    mean_abs = s * math.sqrt(2 / math.pi) * math.exp(-(d**2) / (2 * s**2)) + d * math.erf(
        d / (s * math.sqrt(2))
    )
    return -0.5 * math.log(2 * math.pi * math.e * s**2) + math.log(2 * b) + mean_abs / b


def test_closed_form_laplace_prior_matches_torch_and_hand() -> None:
    net = small_net(LaplacePrior(0.0, 0.5))
    ours = kl_divergence(net)

    reference = 0.0
    by_hand = 0.0
    for _, q in named_posteriors(net):
        mu, sigma = q.mu.detach().double(), softplus64(q.rho.detach())
        reference += torch_kl(Normal(mu, sigma), Laplace(f64(0.0), f64(0.5))).sum().item()
        for m, s in zip(mu.flatten().tolist(), sigma.flatten().tolist(), strict=True):
            by_hand += normal_laplace_kl_by_hand(m, s, 0.0, 0.5)
    assert ours.item() == pytest.approx(reference, rel=1e-10)
    assert ours.item() == pytest.approx(by_hand, rel=1e-10)


@pytest.mark.parametrize(
    "prior", [GaussianPrior(0.1, 0.5), LaplacePrior(0.1, 0.5)], ids=["gaussian", "laplace"]
)
def test_closed_form_finite_for_tiny_sigma_in_float32(prior: Prior) -> None:
    """torch's own Normal-Normal / Normal-Laplace formulas give inf or NaN here (sigma^2 and
    1/sigma^2 under/overflow in float32 from rho ~ -50); the KL is ~ -rho, its gradient -1."""
    rho = torch.tensor([-30.0, -50.0, -60.0, -90.0, -110.0, -500.0])
    q = MeanFieldNormal(torch.tensor([0.3, 0.1, -0.2, 0.3, 0.1, 0.3]), prior, rho_init=0.0)
    with torch.no_grad():
        q.rho.copy_(rho)
    kl = posterior_kl(q)
    kl.backward()
    assert torch.isfinite(kl)
    assert torch.isfinite(q.rho.grad).all() and torch.isfinite(q.mu.grad).all()
    # d KL / d rho = (d KL / d log sigma) (d log sigma / d rho) -> -1 as sigma -> 0.
    torch.testing.assert_close(q.rho.grad, torch.full((6,), -1.0))
    # The value against float64 by hand, with log sigma = rho (exact to e^rho here).
    if isinstance(prior, GaussianPrior):
        terms = [
            math.log(0.5) - r + (m - 0.1) ** 2 / (2 * 0.25) - 0.5
            for m, r in zip(q.mu.tolist(), rho.tolist(), strict=True)
        ]
    else:
        terms = [
            -0.5 * math.log(2 * math.pi * math.e) - r + math.log(1.0) + abs(m - 0.1) / 0.5
            for m, r in zip(q.mu.tolist(), rho.tolist(), strict=True)
        ]
    assert kl.item() == pytest.approx(sum(terms), rel=1e-6)


def quadrature_kl(mu: Tensor, sigma: Tensor, log_p: Callable[[Tensor], Tensor]) -> float:
    """KL(N(mu, sigma^2) || p) = int phi(z) [log q - log p](mu + sigma z) dz, elementwise,
    by the trapezoid rule on z in [-12, 12] (24001 points; phi(12) ~ 1e-32) in float64."""
    z = torch.linspace(-12, 12, 24001, dtype=F64)
    phi = torch.exp(-0.5 * z**2 - LOG_SQRT_2PI)
    total = 0.0
    for m, s in zip(mu.flatten().tolist(), sigma.flatten().tolist(), strict=True):
        w = m + s * z
        log_q = -0.5 * z**2 - math.log(s) - LOG_SQRT_2PI
        total += torch.trapezoid(phi * (log_q - log_p(w)), z).item()
    return total


def mixture_log_density(w: Tensor, pi: float, sigma1: float, sigma2: float) -> Tensor:
    """log(pi N(w; 0, s1^2) + (1 - pi) N(w; 0, s2^2)), written out (no torch.distributions)."""
    a = math.log(pi) - 0.5 * (w / sigma1) ** 2 - math.log(sigma1) - LOG_SQRT_2PI
    b = math.log(1 - pi) - 0.5 * (w / sigma2) ** 2 - math.log(sigma2) - LOG_SQRT_2PI
    return torch.logaddexp(a, b)


def gaussian_log_density(w: Tensor, loc: float, scale: float) -> Tensor:
    return -0.5 * ((w - loc) / scale) ** 2 - math.log(scale) - LOG_SQRT_2PI


def mc_posterior(prior: Prior) -> MeanFieldNormal:
    """A float64 posterior over a (2, 3) tensor with sigma from 1e-3 to 1."""
    mu = torch.tensor([[-0.5, -0.1, 0.0], [0.02, 0.3, 0.8]], dtype=F64)
    sigma = torch.tensor([[1e-3, 1e-2, 0.05], [0.2, 0.5, 1.0]], dtype=F64)
    q = MeanFieldNormal(mu, prior, rho_init=0.0).double()
    with torch.no_grad():
        q.rho.copy_(torch.log(torch.expm1(sigma)))  # softplus^-1
    return q


NUM_DRAWS = 100_000


@pytest.mark.parametrize("case", ["scale-mixture", "gaussian-forced-mc"])
def test_monte_carlo_kl_converges_to_the_reference(case: str) -> None:
    if case == "scale-mixture":
        pi, sigma1, sigma2 = 0.5, 1.0, math.exp(-6)
        prior: Prior = ScaleMixturePrior(pi, sigma1, sigma2).double()
        rounded = (float(prior.pi), float(prior.sigma1), float(prior.sigma2))  # float32 buffers

        def log_p(w: Tensor) -> Tensor:
            return mixture_log_density(w, *rounded)

    else:
        prior = GaussianPrior(torch.tensor(0.1, dtype=F64), torch.tensor(0.6, dtype=F64))

        def log_p(w: Tensor) -> Tensor:
            return gaussian_log_density(w, 0.1, 0.6)

    q = mc_posterior(prior)
    mu, sigma = q.mu.detach(), softplus64(q.rho.detach())
    if case == "scale-mixture":
        reference = quadrature_kl(mu, sigma, log_p)
    else:  # the closed form by hand
        reference = sum(
            math.log(0.6 / s) + (s**2 + (m - 0.1) ** 2) / (2 * 0.36) - 0.5
            for m, s in zip(mu.flatten().tolist(), sigma.flatten().tolist(), strict=True)
        )
        assert posterior_kl(q).item() == pytest.approx(reference, rel=1e-10)
        assert quadrature_kl(mu, sigma, log_p) == pytest.approx(reference, rel=1e-8)

    generator = torch.Generator().manual_seed(0)
    eps = torch.randn((NUM_DRAWS, *mu.shape), generator=generator, dtype=F64)
    draws = mu + sigma * eps
    record = KLRecord()
    record.add_sample(q, draws)
    with torch.no_grad():  # draws without a graph serve a KL without gradients
        estimate = posterior_kl(q, monte_carlo=True, record=record).item()

    # What the estimator averages: -H(q) (exact) - log p(w_d), one value per draw.
    neg_entropy = -(torch.log(sigma) + 0.5 * math.log(2 * math.pi * math.e)).sum()
    per_draw = neg_entropy - log_p(draws).flatten(1).sum(1)
    assert estimate == pytest.approx(per_draw.mean().item(), rel=1e-10, abs=1e-10)
    # Blundell's eq. 2 per draw, log q(w_d) - log p(w_d): the same expectation.
    log_q = (-0.5 * eps**2 - torch.log(sigma) - LOG_SQRT_2PI).flatten(1).sum(1)
    eq2_per_draw = log_q - log_p(draws).flatten(1).sum(1)

    for values in (per_draw, eq2_per_draw):
        # 5 standard errors of the mean of 1e5 i.i.d. per-draw values.
        standard_error = values.std().item() / math.sqrt(NUM_DRAWS)
        assert abs(values.mean().item() - reference) < 5 * standard_error


def test_monte_carlo_kl_has_the_gradients_of_eq2() -> None:
    """d/d(mu, rho) of the estimator equal those of sum_d [log q(w_d) - log p(w_d)] / D with
    w_d = mu + sigma eps_d (hand-written, float64)."""
    q = mc_posterior(ScaleMixturePrior(0.5, 1.0, math.exp(-6)).double())
    rounded = (float(q.prior.pi), float(q.prior.sigma1), float(q.prior.sigma2))
    eps = torch.randn((64, 2, 3), generator=torch.Generator().manual_seed(1), dtype=F64)

    record = KLRecord()
    record.add_sample(q, q.mu + q.scale * eps)
    ours = torch.autograd.grad(posterior_kl(q, record=record), [q.mu, q.rho])

    sigma = F.softplus(q.rho)
    w = q.mu + sigma * eps
    log_q = -0.5 * ((w - q.mu) / sigma) ** 2 - torch.log(sigma) - LOG_SQRT_2PI
    eq2 = (log_q - mixture_log_density(w, *rounded)).sum() / 64
    reference = torch.autograd.grad(eq2, [q.mu, q.rho])
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_monte_carlo_kl_uses_the_forward_pass_weights() -> None:
    net = small_net(ScaleMixturePrior().double())
    x = torch.randn(5, 4, dtype=F64)
    record = KLRecord()
    with net.bayes_forward_pass.recording(record):
        out = net(x)

    def drawn(q: MeanFieldNormal) -> Tensor:
        (sample,) = record.sample(q)  # one draw each, of the tensor's shape
        return sample

    layer = net[0]
    w, b = drawn(layer.weight_posterior), drawn(layer.bias_posterior)
    # The Linear layers really used the recorded draws ...
    # (reading net[1].weight here would draw afresh: the forward's draw is recorded)
    norm = net[1].parametrizations
    norm_weight, norm_bias = drawn(norm.weight[0]), drawn(norm.bias[0])
    hidden = F.layer_norm(F.linear(x, w, b), (3,), norm_weight, norm_bias)
    last = net[2]
    expected = F.linear(hidden, drawn(last.weight_posterior), drawn(last.bias_posterior))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # ... and the KL is evaluated at them: -H(q) - log p(w) per tensor, by hand.
    prior = net[0].weight_posterior.prior
    pi, s1, s2 = float(prior.pi), float(prior.sigma1), float(prior.sigma2)
    by_hand = 0.0
    for _, q in named_posteriors(net):
        sigma = softplus64(q.rho.detach())
        neg_entropy = -(torch.log(sigma) + 0.5 * math.log(2 * math.pi * math.e)).sum()
        by_hand += (neg_entropy - mixture_log_density(drawn(q).detach(), pi, s1, s2).sum()).item()
    assert kl_divergence(net, record=record).item() == pytest.approx(by_hand, rel=1e-10)


def test_monte_carlo_kl_averages_the_folded_samples() -> None:
    """Bayesian layers only: the S samples are folded into one call, each layer draws S
    weights, and the Monte Carlo KL averages log p over them."""
    net = small_net(ScaleMixturePrior().double(), middle=nn.Tanh())
    record = KLRecord()
    with net.bayes_forward_pass.recording(record):
        sample_forward(net, torch.randn(5, 4, dtype=F64), num_samples=7)
    q = net[0].weight_posterior
    drawn = record.sample(q)
    assert drawn.shape == (7, 3, 4)
    prior = q.prior
    sigma = softplus64(q.rho.detach())
    neg_entropy = -(torch.log(sigma) + 0.5 * math.log(2 * math.pi * math.e)).sum()
    log_p = mixture_log_density(
        drawn.detach(), float(prior.pi), float(prior.sigma1), float(prior.sigma2)
    )
    expected = neg_entropy - log_p.sum() / 7
    assert posterior_kl(q, record=record).item() == pytest.approx(expected.item(), rel=1e-10)


def test_monte_carlo_kl_draws_fresh_weights_under_local_reparameterization() -> None:
    net = small_net(ScaleMixturePrior().double(), estimator="local")
    record = KLRecord()
    with net.bayes_forward_pass.recording(record):
        net(torch.randn(5, 4, dtype=F64))
    assert record.sample(net[0].weight_posterior) is None  # no weight was drawn
    remembered = {name: record.sample(q) for name, q in named_posteriors(net)}  # the LayerNorm's
    torch.manual_seed(3)
    ours = kl_divergence(net, record=record).item()

    torch.manual_seed(3)  # the same draws, in the same order (named_posteriors order)
    by_hand = 0.0
    for name, q in named_posteriors(net):
        sigma = softplus64(q.rho.detach())
        w = None if remembered[name] is None else remembered[name][0].detach()
        if w is None:
            w = q.mu.detach() + sigma * torch.randn(q.mu.shape, dtype=F64)
        prior = q.prior
        neg_entropy = -(torch.log(sigma) + 0.5 * math.log(2 * math.pi * math.e)).sum()
        log_p = mixture_log_density(w, float(prior.pi), float(prior.sigma1), float(prior.sigma2))
        by_hand += (neg_entropy - log_p.sum()).item()
    assert math.isfinite(ours)
    assert ours == pytest.approx(by_hand, rel=1e-10)


def test_reduction_mean_divides_by_the_number_of_weights() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    num_weights = sum(p.numel() for p in plain.parameters())  # 15 + 6 + 8 = 29
    net = bayesianize(plain, prior=LaplacePrior(0.0, 0.3))
    total = kl_divergence(net, reduction="sum")
    torch.testing.assert_close(kl_divergence(net, reduction="mean"), total / num_weights)
    assert num_weights == sum(q.mu.numel() for _, q in named_posteriors(net)) == 29


def test_bad_reduction_raises() -> None:
    net = bayesianize(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="'none'"):
        kl_divergence(net, reduction="none")


def test_network_without_posteriors_raises() -> None:
    with pytest.raises(ValueError, match="bayesianize"):
        kl_divergence(nn.Linear(2, 2))


def test_kl_is_zero_when_posterior_equals_prior() -> None:
    """KL(N(0, 1) || N(0, 1)) = 0: sigma = softplus(rho) = 1 at rho = log(e - 1)."""
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 2)),
        posterior=partial(MeanFieldNormal, rho_init=math.log(math.e - 1)),
    ).double()
    with torch.no_grad():
        for _, q in named_posteriors(net):
            q.mu.zero_()
            q.rho.fill_(math.log(math.e - 1))
    assert abs(kl_divergence(net).item()) < 1e-12


def test_each_draw_serves_one_kl() -> None:
    """A Monte Carlo KL with no forward since the last KL draws afresh: it does not reuse a draw
    whose graph a backward pass has freed (a second backward would fail), whether the last KL
    was in closed form or not; and a parametrized tensor's draw at registration serves once."""
    torch.manual_seed(0)
    net = bayesianize(nn.Sequential(nn.Linear(3, 4)))
    (net(torch.randn(5, 3)).sum() + kl_divergence(net)).backward()
    first = kl_divergence(net, monte_carlo=True)
    first.backward()
    second = kl_divergence(net, monte_carlo=True)
    second.backward()
    assert first.item() != second.item()

    net = bayesianize(nn.Sequential(nn.LayerNorm(3)), prior=ScaleMixturePrior())
    kl_divergence(net).backward()
    kl_divergence(net).backward()


def test_a_draw_without_gradients_is_not_used_for_a_kl_with_them() -> None:
    """After an evaluation forward (no gradients) the KL draws afresh, so that log p(w) sends
    its gradient to mu and rho."""
    torch.manual_seed(0)
    net = small_net(ScaleMixturePrior().double(), middle=nn.Tanh())
    record = KLRecord()
    with torch.no_grad(), net.bayes_forward_pass.recording(record):
        net(torch.randn(5, 4, dtype=F64))
    q = net[0].weight_posterior
    drawn = record.sample(q)
    assert drawn is not None and not drawn.requires_grad
    kl_divergence(net, record=record).backward()
    assert q.mu.grad is not None and bool(q.mu.grad.abs().sum() > 0)
