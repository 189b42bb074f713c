"""Posterior draws as plain networks, the posterior mean, freezing, and input gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from bbb_lightning.bayes import (
    BayesianLayer,
    VariationalPosterior,
    bayesianize,
    freeze,
    is_bayesian,
    named_posteriors,
    posterior_mean,
    posterior_mean_network,
    sample_forward,
    sample_network,
    unfreeze,
)
from bbb_lightning.bayes.priors import Prior


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.norm = nn.LayerNorm(6)
        self.conv = nn.Conv1d(1, 2, 3)
        self.gain = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.norm(self.fc(x)))
        return self.conv(hidden.unsqueeze(1)).mean(-1) * self.gain


def mixed(estimator: str = "reparameterization") -> nn.Module:
    torch.manual_seed(0)
    return bayesianize(Mixed(), estimator=estimator)


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_sample_network_is_a_plain_module(estimator: str) -> None:
    net = mixed(estimator)
    plain = sample_network(net)
    for module in plain.modules():
        assert not isinstance(module, VariationalPosterior | BayesianLayer | Prior)
        assert not hasattr(module, "parametrizations")
    assert type(plain.fc) is nn.Linear and type(plain.conv) is nn.Conv1d
    assert type(plain.norm) is nn.LayerNorm and type(plain) is Mixed
    assert not plain._forward_hooks and not plain._forward_pre_hooks
    names = sorted(name for name, _ in plain.named_parameters())
    assert names == sorted(name for name, _ in named_posteriors(net))
    # Deterministic, and the original is untouched and still Bayesian.
    assert torch.equal(plain(X), plain(X))
    assert not torch.equal(sample_network(net)(X), plain(X))
    assert len(list(named_posteriors(net))) == 7
    assert net(X).shape == plain(X).shape


def test_sample_network_holds_one_draw_from_q() -> None:
    """Averaged over draws, the weights of sample_network are mu with sd sigma (5 SE)."""
    torch.manual_seed(2)
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)))
    q = net[0].weight_posterior
    draws = torch.stack([sample_network(net)[0].weight.detach() for _ in range(400)])
    mu, sigma = q.mu.detach(), q.scale.detach()
    assert ((draws.mean(0) - mu).abs() <= 5 * sigma / 20).all()
    assert ((draws.std(0) / sigma - 1).abs() <= 5 * (1 / 800) ** 0.5).all()


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_posterior_mean_network_equals_the_context_manager(estimator: str) -> None:
    net = mixed(estimator)
    with posterior_mean(net) as same:
        assert same is net
        expected = net(X)
        assert torch.equal(net(X), expected)
    assert torch.equal(posterior_mean_network(net)(X), expected)
    assert not torch.equal(net(X), expected)  # sampling again after the block

    freeze(net)
    with posterior_mean(net):
        pass
    assert all(q.frozen for _, q in named_posteriors(net))  # a frozen net stays frozen
    unfreeze(net)


def test_freeze_and_unfreeze() -> None:
    net = mixed()
    assert freeze(net) is net
    assert torch.equal(net(X), net(X))
    assert torch.equal(net(X), posterior_mean_network(net)(X))
    samples = sample_forward(net, X, 4)
    assert torch.equal(samples, samples[:1].expand_as(samples))
    assert unfreeze(net) is net
    assert not torch.equal(net(X), net(X))


def test_sample_forward_shapes_and_validation() -> None:
    net = mixed()
    assert sample_forward(net, X, 1).shape == (1, 5, 2)
    assert sample_forward(net, X, 7).shape == (7, 5, 2)
    for bad in (0, -1, 2.0, np.int64(0), torch.tensor(2)):
        with pytest.raises(ValueError, match="num_samples"):
            sample_forward(net, X, bad)
    assert sample_forward(net, X, np.int64(3)).shape == (3, 5, 2)  # an integer, if not an int


def test_sample_forward_draws_parametrized_tensors_afresh_for_every_sample() -> None:
    """A bare root layer is parametrized (drawn once per call): its S samples must still be
    independent draws, y = W x + b with Var(y_j) = sum_i x_i^2 sigma_ji^2 + sigma_bj^2.
    4000 samples; 5 standard errors of the sample variance, sqrt(2 / (S - 1)) relative."""
    torch.manual_seed(5)
    net = bayesianize(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    samples = 4000
    with torch.no_grad():
        out = sample_forward(net, x, samples)
        sigma = {name: q.scale for name, q in named_posteriors(net)}
    expected = x.square() @ sigma["weight"].square().T + sigma["bias"].square()
    se = expected * (2 / (samples - 1)) ** 0.5
    assert torch.all((out.var(0) - expected).abs() < 5 * se)
    centred = out - out.mean(0)
    correlation = (centred[1:] * centred[:-1]).mean(0) / out.var(0)
    assert torch.all(correlation.abs() < 5 / samples**0.5)


def test_sample_forward_stacks_every_output_of_a_parametrized_network() -> None:
    """An LSTM (parametrized, its states batch-second) runs S calls: every output gets a
    leading sample dimension, and the samples differ."""
    torch.manual_seed(6)
    net = bayesianize(nn.LSTM(3, 4, batch_first=True))
    with torch.no_grad():
        out, (h, c) = sample_forward(net, torch.randn(2, 5, 3), 3)
    assert out.shape == (3, 2, 5, 4) and h.shape == c.shape == (3, 1, 2, 4)
    assert not torch.equal(out[0], out[1]) and not torch.equal(h[1], h[2])


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
@pytest.mark.parametrize("track_running_stats", [True, False])
def test_a_batch_norm_normalises_every_sample_by_its_own_batch(
    estimator: str, track_running_stats: bool
) -> None:
    """A batch norm kept deterministic (here without parameters) that normalises by its batch's
    statistics must see each sample's B rows alone, as in net(x): every sample's outputs then
    have mean 0 and (biased) variance 1 over the batch. On the S samples folded into one batch
    it would normalise by the statistics of all of them together."""
    torch.manual_seed(7)
    net = bayesianize(
        nn.Sequential(
            nn.Linear(3, 4),
            nn.BatchNorm1d(4, affine=False, track_running_stats=track_running_stats),
        ),
        estimator=estimator,
    )
    with torch.no_grad():
        out = sample_forward(net, torch.randn(6, 3), 5)
    assert torch.allclose(out.mean(1), torch.zeros(5, 4), atol=1e-5)
    assert torch.allclose(out.var(1, unbiased=False), torch.ones(5, 4), atol=1e-3)


@pytest.mark.parametrize("estimator", ["reparameterization", "local", "flipout"])
def test_an_empty_batch_gives_empty_outputs(estimator: str) -> None:
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), estimator=estimator
    )
    for samples in (1, 3):
        assert sample_forward(net, torch.zeros(0, 3), samples).shape == (samples, 0, 2)


def pyro_classifier() -> nn.Module:
    """A Pyro user's 784-512-512-512-10 leaky-ReLU classifier."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512),
        nn.LeakyReLU(0.1),
        nn.Linear(512, 512),
        nn.LeakyReLU(0.1),
        nn.Linear(512, 512),
        nn.LeakyReLU(0.1),
        nn.Linear(512, 10),
    )


def input_gradient(model: nn.Module, x: Tensor, labels: Tensor) -> Tensor:
    x = x.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(F.cross_entropy(model(x), labels), x)
    return gradient


def test_input_gradients_averaged_over_posterior_draws() -> None:
    net = bayesianize(pyro_classifier())
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(8, 784, generator=generator)
    labels = torch.randint(0, 10, (8,), generator=generator)

    torch.manual_seed(4)
    draws = torch.stack([input_gradient(sample_network(net), x, labels) for _ in range(20)])
    assert draws.shape == (20, 8, 784)
    assert torch.isfinite(draws).all()
    average = draws.mean(0)
    # The draws differ from each other, so the average differs from any single draw.
    assert not torch.equal(draws[0], draws[1])
    assert (average - draws[0]).norm() > 1e-3 * draws[0].norm()
    # The network itself is untouched and still samples.
    assert all(p.grad is None for p in net.parameters())
    assert not torch.equal(net(x), net(x))

    # As sigma -> 0 every draw's gradient becomes the posterior-mean network's.
    with torch.no_grad():
        for _, q in named_posteriors(net):
            q.rho.fill_(-30.0)  # sigma = softplus(-30) ~ 1e-13
    mean_gradient = input_gradient(posterior_mean_network(net), x, labels)
    tiny = torch.stack([input_gradient(sample_network(net), x, labels) for _ in range(3)])
    for gradient in tiny:
        torch.testing.assert_close(gradient, mean_gradient, rtol=1e-5, atol=1e-9)
    assert (average - mean_gradient).norm() > 1e-3 * mean_gradient.norm()


class _Summed(nn.Module):
    """A network whose output is not batch-first: one number for the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).sum()


class _Transposed(_Summed):
    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x).T  # (features, batch)


@pytest.mark.parametrize("network", [_Summed, _Transposed])
def test_an_output_that_is_not_batch_first_is_named(network: type[nn.Module]) -> None:
    net = bayesianize(network())
    with pytest.raises(ValueError, match=r"needs every output of the network batch-first, with 20"):
        sample_forward(net, torch.randn(5, 3), 4)
    assert sample_forward(net, torch.randn(5, 3), 1).shape[0] == 1  # one sample: nothing folded


@pytest.mark.parametrize("recurrent", [nn.GRU, nn.LSTM])
def test_a_recurrent_network_after_a_forward_becomes_plain(recurrent: type[nn.RNNBase]) -> None:
    """An RNN keeps the weights of its last forward (its ``_flat_weights``), here draws with an
    autograd graph: the plain networks are copies of it all the same, and compute with their
    own weights (the posterior mean's equals the frozen network's output)."""
    torch.manual_seed(8)
    net = bayesianize(recurrent(3, 4, num_layers=2, batch_first=True))
    x = torch.randn(2, 5, 3)
    net(x)[0].sum().backward()
    mean_net = posterior_mean_network(net)
    with posterior_mean(net):
        expected = net(x)[0]
    assert type(mean_net) is recurrent
    assert torch.allclose(mean_net(x)[0], expected, atol=1e-6)
    draw = sample_network(net)
    assert torch.equal(draw(x)[0], draw(x)[0])
    assert not torch.allclose(draw(x)[0], expected)


class Symmetric(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.triu() + x.triu(1).T


def test_the_networks_own_parametrizations_stay_in_the_plain_networks() -> None:
    """weight_norm's g and v, and a symmetric weight's original, get posteriors behind their
    parametrizations: the plain networks keep those parametrizations, over plain parameters,
    and the posterior mean's output is the frozen network's; the original is left intact."""
    torch.manual_seed(9)
    normed = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    symmetric = nn.Linear(3, 3)
    parametrize.register_parametrization(symmetric, "weight", Symmetric())
    net = bayesianize(nn.Sequential(normed, nn.Tanh(), symmetric))
    x = torch.randn(4, 3)
    with posterior_mean(net):
        expected = net(x)
    mean_net = posterior_mean_network(net)
    torch.testing.assert_close(mean_net(x), expected)
    draw = sample_network(net)
    assert torch.equal(draw(x), draw(x)) and not torch.allclose(draw(x), expected)
    for plain in (mean_net, draw):
        assert not any(isinstance(m, VariationalPosterior) for m in plain.modules())
        assert parametrize.is_parametrized(plain[0], "weight")
        assert not parametrize.is_parametrized(plain[0], "bias")
        assert isinstance(plain[2], nn.Linear) and not parametrize.is_parametrized(plain[2], "bias")
        assert set(dict(plain.named_parameters())) == {
            "0.bias",
            "0.parametrizations.weight.original0",
            "0.parametrizations.weight.original1",
            "2.bias",
            "2.parametrizations.weight.original",
        }
    assert is_bayesian(net) and parametrize.is_parametrized(net[0], "bias")
    assert not torch.equal(net(x), net(x))


def test_a_parametrization_registered_after_the_posterior_applies_to_the_plain_weight() -> None:
    """A parametrization the user adds on top of a posterior is part of the tensor's value."""
    torch.manual_seed(10)
    net = bayesianize(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3)))
    parametrize.register_parametrization(net[1], "bias", _Negate())
    q = dict(named_posteriors(net))["1.bias"]
    with torch.no_grad():
        q.mean.normal_()
    mean_net = posterior_mean_network(net)
    assert not parametrize.is_parametrized(mean_net[1])
    torch.testing.assert_close(mean_net[1].bias, -q.mean.detach())
    x = torch.randn(4, 2)
    with posterior_mean(net):
        torch.testing.assert_close(mean_net(x), net(x))


class _Negate(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return -x


@pytest.mark.parametrize("extract", [sample_network, posterior_mean_network])
def test_a_plain_network_made_in_inference_mode_supports_autograd(extract) -> None:
    """Made under torch.inference_mode (as in an evaluation loop), the copy's weights are
    still normal tensors: input gradients and training of the copy work."""
    net = mixed()
    with torch.inference_mode():
        plain = extract(net)
    assert not any(parameter.is_inference() for parameter in plain.parameters())
    x = X.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(plain(x).sum(), x)
    assert gradient.shape == X.shape
    plain(X).sum().backward()
    assert all(parameter.grad is not None for parameter in plain.parameters())


class _Cache:
    """A non-tensor part of an output, as a Hugging Face causal LM returns a DynamicCache."""

    def __init__(self, calls: int) -> None:
        self.calls = calls


class _WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)  # parametrized: sample_forward runs S calls
        self.calls = 0

    def forward(self, x: torch.Tensor) -> dict:
        self.calls += 1
        return {"logits": self.norm(x), "past_key_values": _Cache(self.calls), "note": None}


@pytest.mark.parametrize("num_samples", [1, 4])
def test_sample_forward_keeps_the_non_tensor_parts_of_an_output(num_samples: int) -> None:
    net = bayesianize(_WithCache())
    out = sample_forward(net, torch.randn(5, 3), num_samples)
    assert out["logits"].shape == (num_samples, 5, 3)
    assert not torch.equal(out["logits"][0], out["logits"][-1]) or num_samples == 1
    assert isinstance(out["past_key_values"], _Cache)
    assert out["past_key_values"].calls == num_samples  # the last call's
    assert out["note"] is None


class _LinearWithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)  # a Bayesian layer: the S samples fold into one call

    def forward(self, x: torch.Tensor) -> tuple:
        return self.linear(x), _Cache(len(x))


def test_a_folded_call_keeps_the_non_tensor_parts_as_they_are() -> None:
    net = bayesianize(_LinearWithCache())
    logits, cache = sample_forward(net, torch.randn(5, 3), 4)
    assert logits.shape == (4, 5, 2)
    assert isinstance(cache, _Cache) and cache.calls == 20  # the folded call's, of S*B rows
