"""Priors: log densities against independent references, buffers, the empirical prior, checks."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.distributions import Laplace, Normal

from bbb_lightning.bayes import (
    EmpiricalPrior,
    GaussianPrior,
    LaplacePrior,
    ScaleMixturePrior,
    bayesianize,
    kl_divergence,
    named_posteriors,
)


def normal_log_density(w: float, sigma: float) -> float:
    return -0.5 * (w / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)


def log_add_exp(a: float, b: float) -> float:
    top = max(a, b)
    return top + math.log(math.exp(a - top) + math.exp(b - top))


def scale_mixture_reference(w: float, pi: float, sigma1: float, sigma2: float) -> float:
    """log(pi N(w; 0, sigma1^2) + (1 - pi) N(w; 0, sigma2^2)) in float64, by hand."""
    return log_add_exp(
        math.log(pi) + normal_log_density(w, sigma1),
        math.log(1 - pi) + normal_log_density(w, sigma2),
    )


MIXTURES = [
    (0.5, 1.0, math.exp(-6)),  # Blundell et al.'s MNIST setting
    (0.25, math.exp(-1), math.exp(-7)),
    (0.75, 2.0, 0.5),
]


@pytest.mark.parametrize(("pi", "sigma1", "sigma2"), MIXTURES)
def test_scale_mixture_log_density_matches_hand_reference(
    pi: float, sigma1: float, sigma2: float
) -> None:
    # Zero, the spike, the slab, 50 sigma1 out (both densities underflow in float32), and 1e3.
    weights = [0.0, 1e-3, -0.01, 0.5, -2.0, 50 * sigma1, -50 * sigma1, 1e3, -1e3]
    reference = torch.tensor(
        [scale_mixture_reference(w, pi, sigma1, sigma2) for w in weights], dtype=torch.float64
    )
    prior = ScaleMixturePrior(pi=pi, sigma1=sigma1, sigma2=sigma2)

    ours64 = prior.to(torch.float64).log_prob(torch.tensor(weights, dtype=torch.float64))
    assert ours64.dtype == torch.float64
    # The buffers were created in float32: the float64 reference uses those rounded values.
    rounded = [float(prior.pi), float(prior.sigma1), float(prior.sigma2)]
    reference64 = torch.tensor(
        [scale_mixture_reference(w, *rounded) for w in weights], dtype=torch.float64
    )
    torch.testing.assert_close(ours64, reference64, rtol=1e-12, atol=1e-12)

    ours32 = prior.to(torch.float32).log_prob(torch.tensor(weights))
    assert ours32.dtype == torch.float32
    assert torch.isfinite(ours32).all()
    # float32 hyperparameters and weights: a few float32 ulps relative to the log density.
    torch.testing.assert_close(ours32.double(), reference, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    w = torch.linspace(-5, 5, 101, dtype=torch.float64)
    prior = GaussianPrior(0.3, 0.7).double()
    expected = Normal(torch.tensor(0.3, dtype=torch.float64), 0.7).log_prob(w)
    # The buffers hold float32(0.3), float32(0.7) converted to float64: float32 precision.
    torch.testing.assert_close(prior.log_prob(w), expected, rtol=1e-6, atol=1e-6)
    exact = GaussianPrior(torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7).double())
    by_hand = (
        -0.5 * ((w - 0.3) / exact.scale) ** 2 - exact.scale.log() - 0.5 * math.log(2 * math.pi)
    )
    torch.testing.assert_close(exact.log_prob(w), by_hand, rtol=1e-12, atol=1e-12)


def test_laplace_log_prob_matches_torch_distributions() -> None:
    w = torch.linspace(-5, 5, 101)
    prior = LaplacePrior(-0.2, 0.5)
    torch.testing.assert_close(prior.log_prob(w), Laplace(-0.2, 0.5).log_prob(w))
    by_hand = torch.tensor([-abs(x + 0.2) / 0.5 - math.log(2 * 0.5) for x in w.tolist()])
    torch.testing.assert_close(prior.log_prob(w), by_hand, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("prior", "names"),
    [
        (GaussianPrior(0.0, 0.5), {"loc", "scale"}),
        (LaplacePrior(0.0, 0.5), {"loc", "scale"}),
        (ScaleMixturePrior(0.5, 1.0, 0.01), {"pi", "sigma1", "sigma2"}),
    ],
    ids=["gaussian", "laplace", "scale-mixture"],
)
def test_hyperparameters_are_buffers_that_follow_dtype(prior: nn.Module, names: set[str]) -> None:
    assert {name for name, _ in prior.named_buffers()} == names
    assert set(prior.state_dict()) == names
    assert not list(prior.parameters())  # nothing for the optimizer
    prior.to(torch.float64)
    assert all(buffer.dtype == torch.float64 for buffer in prior.buffers())
    assert prior.log_prob(torch.zeros(3, dtype=torch.float64)).dtype == torch.float64
    prior.to(torch.float32)


def test_prior_buffers_follow_the_network_dtype() -> None:
    net = bayesianize(nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)), prior=ScaleMixturePrior())
    net.to(torch.float64)
    buffers = dict(net.named_buffers())
    assert buffers and all(b.dtype == torch.float64 for b in buffers.values())
    assert any(name.endswith("prior.sigma2") for name in buffers)
    assert kl_divergence(net).dtype == torch.float64


def test_empirical_prior_is_centred_on_the_initial_weights() -> None:
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    with torch.no_grad():  # LayerNorm initialises to ones/zeros: make it look trained
        pretrained[1].weight.normal_()
        pretrained[1].bias.normal_()
    original = {name: p.detach().clone() for name, p in pretrained.named_parameters()}
    net = bayesianize(pretrained, prior=EmpiricalPrior(scale=0.1))

    posteriors = dict(named_posteriors(net))
    assert set(posteriors) == set(original)
    for name, q in posteriors.items():
        assert isinstance(q.prior, GaussianPrior)
        assert torch.equal(q.prior.loc, original[name])
        assert q.prior.scale.item() == pytest.approx(0.1)
        assert torch.equal(q.mu, original[name])
    # The prior centre is a copy: moving mu does not move it.
    with torch.no_grad():
        posteriors["0.weight"].mu.add_(1.0)
    assert torch.equal(posteriors["0.weight"].prior.loc, original["0.weight"])
    # The prior locations are buffers, saved with the network.
    assert any(key.endswith("prior.loc") for key in net.state_dict())


def test_empirical_prior_has_no_density_of_its_own() -> None:
    with pytest.raises(RuntimeError, match="GaussianPrior"):
        EmpiricalPrior(0.1).distribution()


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (lambda v: GaussianPrior(0.0, v), 0.0),
        (lambda v: GaussianPrior(0.0, v), -1.5),
        (lambda v: GaussianPrior(0.0, v), float("nan")),
        (lambda v: GaussianPrior(0.0, v), float("inf")),
        (lambda v: LaplacePrior(0.0, v), 0.0),
        (lambda v: LaplacePrior(v, 1.0), float("nan")),
        (lambda v: LaplacePrior(v, 1.0), float("inf")),
        (lambda v: LaplacePrior(0.0, v), -0.25),
        (lambda v: LaplacePrior(v, 1.0), float("nan")),  # was accepted: a NaN KL
        (lambda v: LaplacePrior(v, 1.0), float("-inf")),
        (lambda v: GaussianPrior(v, 1.0), float("nan")),
        (lambda v: EmpiricalPrior(v), -2.0),
        (lambda v: ScaleMixturePrior(pi=v), 0.0),
        (lambda v: ScaleMixturePrior(pi=v), 1.0),
        (lambda v: ScaleMixturePrior(pi=v), 1.5),
        (lambda v: ScaleMixturePrior(pi=v), -0.1),
        (lambda v: ScaleMixturePrior(sigma1=v), 0.0),
        (lambda v: ScaleMixturePrior(sigma2=v), -0.003),
        (lambda v: ScaleMixturePrior(sigma2=v), 1e-23),  # sigma^2 underflows: NaN at w = 0
        (lambda v: GaussianPrior(0.0, v), 1e20),  # sigma^2 overflows
        (lambda v: LaplacePrior(0.0, v), 1e-20),
        (lambda v: ScaleMixturePrior(pi=v), 1.0 - 1e-8),  # float32 rounds it to 1
        (lambda v: ScaleMixturePrior(pi=v), 1e-40),  # below the smallest normal float32
    ],
)
def test_invalid_hyperparameters_raise_naming_the_value(
    make: Callable[[float], nn.Module], value: float
) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        make(value)


def test_a_tensor_scale_must_be_finite() -> None:
    """As a float scale: an infinite one would make every KL infinite."""
    with pytest.raises(ValueError, match=r"prior scale must be in \[1e-19, 1e\+19\] everywhere"):
        GaussianPrior(0.0, torch.tensor([1.0, float("inf")]))
    with pytest.raises(ValueError, match=r"prior scale must be in \[1e-19, 1e\+19\] everywhere"):
        GaussianPrior(0.0, torch.tensor([1.0, 1e-25]))


@pytest.mark.parametrize(
    ("pi", "sigma1", "sigma2"),
    [(1.0 - 2.0**-24, 1.0, 1e-3), (1e-30, 1.0, 1e-3), (0.5, 1e19, 1e-19)],
)
def test_extreme_accepted_hyperparameters_keep_both_components(
    pi: float, sigma1: float, sigma2: float
) -> None:
    """At the ends of the accepted ranges the float32 log density is finite and matches the
    float64 mixture of both components, at w = 0 (where sigma^2 used to underflow) and beyond."""
    weights = [0.0, 1e-20, 1e-3, 1.0]
    prior = ScaleMixturePrior(pi=pi, sigma1=sigma1, sigma2=sigma2)
    ours = prior.log_prob(torch.tensor(weights))
    reference = torch.tensor(
        [scale_mixture_reference(w, pi, sigma1, sigma2) for w in weights], dtype=torch.float64
    )
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-5)
