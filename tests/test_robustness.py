"""Input gradients under posterior sampling and FGSM / PGD, against closed forms for linear
models (where the gradient and the L∞ margin are known exactly)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bbb_lightning.bayes import bayesianize, named_posteriors, sample_forward, sample_network
from bbb_lightning.evaluation.robustness import (
    adversarial_accuracy,
    expected_input_gradient,
    fgsm,
    input_gradients,
    pgd,
    predictive_log_probs,
)


def bayesian_linear(weight: torch.Tensor, bias: torch.Tensor, rho: float) -> nn.Module:
    """A Bayesian ``nn.Linear`` with posterior mean (weight, bias) and sigma = softplus(rho)."""
    net = bayesianize(nn.Linear(weight.shape[1], weight.shape[0]))
    posteriors = dict(named_posteriors(net))
    with torch.no_grad():
        for name, value in (("weight", weight), ("bias", bias)):
            posteriors[name].mu.copy_(value)
            posteriors[name].rho.fill_(rho)
    return net


def test_input_gradients_match_the_closed_form_of_each_draw():
    torch.manual_seed(0)
    net = bayesian_linear(torch.randn(3, 4), torch.randn(3), rho=-1.0)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    torch.manual_seed(1)
    gradients = input_gradients(net, x, y, num_draws=6)
    torch.manual_seed(1)
    draws = [sample_network(net) for _ in range(6)]
    for gradient, draw in zip(gradients, draws, strict=True):
        # d CE(Wx + b, y) / dx = W^T (softmax(Wx + b) - onehot(y)), per example.
        residual = F.softmax(draw(x), -1) - F.one_hot(y, 3).float()
        assert torch.allclose(gradient, residual @ draw.weight, atol=1e-6)


def test_expected_input_gradient_converges_to_the_posterior_mean_gradient():
    # With a loss linear in the outputs, E_q[∇_x sum(Wx + b)] = E_q[W]^T 1 = mu^T 1 exactly.
    torch.manual_seed(0)
    mu = torch.randn(2, 3)
    net = bayesian_linear(mu, torch.zeros(2), rho=-2.0)  # sigma 0.127
    x, y = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    expected = expected_input_gradient(net, x, y, loss_fn=lambda out, _: out.sum(), num_draws=400)
    # Monte Carlo standard error: sigma * sqrt(2 / 400) = 0.009 per coordinate.
    assert torch.allclose(expected, mu.sum(0).expand(4, 3), atol=0.04)
    with pytest.raises(ValueError, match="num_draws"):
        input_gradients(net, x, y, num_draws=0)


def test_fgsm_and_pgd_on_a_linear_loss():
    w = torch.tensor([[1.0, -2.0, 0.0]])
    x = torch.tensor([[0.5, 0.5, 0.5], [0.95, 0.05, 0.5]])

    def loss_of(inputs: torch.Tensor) -> torch.Tensor:
        return (inputs * w).sum()

    step = torch.tensor([[1.0, -1.0, 0.0]])  # sign of the gradient
    assert torch.allclose(fgsm(loss_of, x, 0.1, (0.0, 1.0)), (x + 0.1 * step).clamp(0, 1))
    # PGD on a linear loss ends at the same corner of the ball, then clamped to the data range.
    adversarial = pgd(loss_of, x, 0.1, (0.0, 1.0), steps=10, step_size=2.5)
    assert torch.allclose(adversarial, (x + 0.1 * step).clamp(0, 1), atol=1e-6)
    assert (adversarial - x).abs().max() <= 0.1 + 1e-6


def test_predictive_log_probs_is_the_log_of_the_averaged_probabilities():
    torch.manual_seed(0)
    net = bayesian_linear(torch.randn(3, 2), torch.randn(3), rho=0.0)
    x = torch.randn(6, 2)
    torch.manual_seed(2)
    log_probs = predictive_log_probs(net, x, 8)
    torch.manual_seed(2)
    reference = F.softmax(sample_forward(net, x, 8), -1).mean(0).log()
    assert torch.allclose(log_probs, reference, atol=1e-6)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
@pytest.mark.parametrize("setting", ["mean", "draw", "predictive"])
def test_attacks_break_a_linear_classifier_exactly_beyond_its_margin(method, setting):
    # Logit difference f1 - f0 = x1 + x2, sigma ~ 1e-9: every point has L∞ margin |x1 + x2| / 2.
    net = bayesian_linear(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.zeros(2), rho=-20.0)
    generator = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (50,), generator=generator)
    direction = torch.randn(50, 2, generator=generator)
    direction[:, 1] = (2 * sign - 1) * 0.6 - direction[:, 0]  # x1 + x2 = ±0.6: margin 0.3
    x, y = direction, sign
    accuracies = adversarial_accuracy(
        net, x, y, [0.0, 0.25, 0.35], method=method, setting=setting, num_samples=4, num_draws=2
    )
    assert accuracies == [1.0, 1.0, 0.0]


def test_attacks_respect_the_data_range_and_check_arguments():
    net = bayesian_linear(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.zeros(2), rho=-20.0)
    x, y = torch.tensor([[0.6, 0.0]]), torch.tensor([1])
    # Inside [0, 1] the input can only move to (0.6 - eps, 0): margin 0.6 cannot be crossed.
    assert adversarial_accuracy(net, x, y, [0.5], bounds=(0.0, 1.0)) == [1.0]
    with pytest.raises(ValueError, match="attack method"):
        adversarial_accuracy(net, x, y, [0.1], method="cw")
    with pytest.raises(ValueError, match="attack setting"):
        adversarial_accuracy(net, x, y, [0.1], setting="ensemble")
