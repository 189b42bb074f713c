"""SNR pruning (Blundell et al. 2015, section 5.2) against hand-set posteriors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbb_lightning.bayes import (
    VariationalPosterior,
    bayesianize,
    named_posteriors,
    posterior_mean_network,
)
from bbb_lightning.evaluation.pruning import prune_by_snr, snr_masks


def set_posterior(net: nn.Module, name: str, mu: torch.Tensor, sigma: torch.Tensor) -> None:
    posterior = dict(named_posteriors(net))[name]
    with torch.no_grad():
        posterior.mu.copy_(mu)
        posterior.rho.copy_(torch.log(torch.expm1(sigma)))  # softplus^-1


def two_layer_net() -> nn.Module:
    """Layer 0 has SNRs 1..6 (weights) and 0.5, 7 (biases); layer 2 has SNRs of 100 and more."""
    net = bayesianize(nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1)))
    set_posterior(
        net, "0.weight", torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]), torch.ones(2, 3)
    )
    set_posterior(net, "0.bias", torch.tensor([0.25, -3.5]), torch.full((2,), 0.5))
    set_posterior(net, "2.weight", torch.tensor([[100.0, -200.0]]), torch.ones(1, 2))
    set_posterior(net, "2.bias", torch.tensor([300.0]), torch.ones(1))
    return net


def test_masks_drop_the_lowest_snr_globally():
    net = two_layer_net()  # 11 weights; SNRs sorted: 0.5, 1, 2, 3, 4, 5, 6, 7, 100, 200, 300
    masks = snr_masks(net, 4 / 11)
    assert masks["0.bias"].tolist() == [False, True]
    assert masks["0.weight"].tolist() == [[False, False, False], [True, True, True]]
    assert masks["2.weight"].all() and masks["2.bias"].all()
    assert sum(int((~keep).sum()) for keep in snr_masks(net, 0.5).values()) == round(0.5 * 11)


def test_pruned_network_is_the_posterior_mean_with_zeros():
    net = two_layer_net()
    pruned = prune_by_snr(net, 8 / 11)  # all of layer 0 goes, layer 2 stays
    assert not any(isinstance(m, VariationalPosterior) for m in pruned.modules())
    assert torch.equal(pruned[0].weight, torch.zeros(2, 3))
    assert torch.equal(pruned[0].bias, torch.zeros(2))
    assert torch.equal(pruned[2].weight, torch.tensor([[100.0, -200.0]]))
    x = torch.randn(5, 3)
    assert torch.equal(pruned(x), torch.full((5, 1), 300.0))  # ReLU(0) = 0: only the bias


def test_fractions_zero_and_one():
    torch.manual_seed(0)
    net = bayesianize(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)))
    x = torch.randn(6, 4)
    assert torch.equal(prune_by_snr(net, 0.0)(x), posterior_mean_network(net)(x))
    assert all((p == 0).all() for p in prune_by_snr(net, 1.0).parameters())
    for fraction in (-0.1, 1.5):
        with pytest.raises(ValueError, match="pruning fraction"):
            prune_by_snr(net, fraction)


def test_parametrized_tensors_are_pruned_too():
    # LayerNorm is not a Linear/Conv: its weight is variational through a parametrization.
    net = bayesianize(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    pruned = prune_by_snr(net, 1.0)
    assert torch.equal(pruned[1].weight, torch.zeros(3))
    assert torch.equal(pruned(torch.randn(4, 2)), torch.zeros(4, 3))  # zero scale and shift


def test_a_network_without_posteriors_is_refused():
    with pytest.raises(ValueError, match="no posterior with a stddev to prune"):
        snr_masks(nn.Linear(2, 2), 0.5)
