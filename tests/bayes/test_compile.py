"""The reference path under ``torch.compile`` and ``torch.func``.

``torch.compile(..., fullgraph=True)`` raises on any graph break, so each compiled test proves
the forward, the KL and the backward trace whole. Values are checked against float64 closed
forms (the KL) and against autograd (gradients); the draws against their closed-form moments.
The ``aot_eager`` backend traces exactly as the default one does, without generating code (the
default ``inductor`` would compile C++ for each graph: minutes in CI).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl
from torch.func import functional_call, grad, vmap

from bbb_lightning.bayes import (
    ESTIMATORS,
    LaplacePrior,
    ScaleMixturePrior,
    bayesianize,
    kl_divergence,
    named_posteriors,
    native,
    sample_forward,
    sample_forward_with_kl,
)
from bbb_lightning.models.nets import CNN, MLP

F64 = torch.float64


def float64_kl(net: nn.Module) -> float:
    """KL(q || N(0, 1)) of every tensor, by torch.distributions in float64."""
    return sum(
        float(torch_kl(Normal(q.mu.double(), F.softplus(q.rho.double())), Normal(0.0, 1.0)).sum())
        for _, q in named_posteriors(net)
    )


NETS = {
    "mlp": (lambda: MLP(input_shape=[1, 8, 8], num_outputs=3, hidden=[16]), (6, 1, 8, 8)),
    "cnn": (
        lambda: CNN(input_shape=[1, 8, 8], num_outputs=3, channels=[4], hidden=8),
        (6, 1, 8, 8),
    ),
}


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", list(NETS))
def test_fullgraph_compile_of_a_training_step(kind: str, estimator: str) -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    make, shape = NETS[kind]
    net = bayesianize(make(), estimator=estimator)
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))

    def loss(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out, kl = sample_forward_with_kl(net, x, 2)
        nll = F.cross_entropy(out.flatten(0, 1), y.repeat(2))
        return nll + kl / 1000, out, kl

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value, out, kl = compiled(x, y)
    assert out.shape == (2, shape[0], 3)
    assert math.isclose(kl.item(), float64_kl(net), rel_tol=1e-5)
    value.backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def float64_laplace_kl(net: nn.Module, scale: float) -> float:
    """KL(N(mu, sigma^2) || Laplace(0, b)) = log 2b - H(q) + E|w|/b in float64, with
    E|w| = mu erf(mu / (sigma sqrt 2)) + sigma sqrt(2/pi) exp(-mu^2 / (2 sigma^2))."""
    total = 0.0
    for _, q in named_posteriors(net):
        mu, sigma = q.mu.double(), F.softplus(q.rho.double())
        mean_abs = mu * torch.erf(mu / (sigma * math.sqrt(2))) + sigma * math.sqrt(
            2 / math.pi
        ) * torch.exp(-(mu**2) / (2 * sigma**2))
        entropy = Normal(mu, sigma).entropy()
        total += float((math.log(2 * scale) - entropy + mean_abs / scale).sum().detach())
    return total


@pytest.mark.parametrize("prior", ["laplace", "scale_mixture"])
def test_fullgraph_compile_with_a_laplace_or_a_scale_mixture_prior(prior: str) -> None:
    """The closed form against a Laplace prior, and the Monte Carlo KL against the scale
    mixture (no closed form), trace without a graph break: the registry is consulted eagerly
    at bayesianize."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    chosen = LaplacePrior(0.0, 0.5) if prior == "laplace" else ScaleMixturePrior(0.5, 1.0, 0.01)
    net = bayesianize(NETS["mlp"][0](), prior=chosen)
    x = torch.randn(NETS["mlp"][1])

    def loss(x: Tensor) -> tuple[Tensor, Tensor]:
        out, kl = sample_forward_with_kl(net, x, 2)
        return out.square().mean() + kl / 1000, kl

    value, kl = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    if prior == "laplace":
        assert math.isclose(kl.item(), float64_laplace_kl(net, 0.5), rel_tol=1e-5)
    else:  # a Monte Carlo estimate (the compiled graph draws its own noise): finite
        assert torch.isfinite(kl)


def test_a_compiled_network_trains() -> None:
    """``nn.Module.compile`` (what ``BayesByBackprop(compile=...)`` does): two graphs (the
    training S and the predictive S), and the loss falls."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    net = bayesianize(MLP(input_shape=[4], num_outputs=1, hidden=[16]), estimator="local")
    net.compile(backend="aot_eager")
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    losses = []
    for _ in range(40):
        out, kl = sample_forward_with_kl(net, x, 2)
        loss = (out - y).square().mean() + kl / 10_000
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    with torch.no_grad():
        assert sample_forward(net, x, 10).shape == (10, 64, 1)
    assert losses[-1] < 0.5 * losses[0]


class KLOf(nn.Module):
    """The network's KL as a module's forward, for ``functional_call``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self) -> Tensor:
        return kl_divergence(self.net)


def test_torch_func_grad_of_the_kl_equals_autograd() -> None:
    torch.manual_seed(2)
    net = bayesianize(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).double()
    wrapper = KLOf(net)
    params = {name: p.detach() for name, p in wrapper.named_parameters()}
    got = grad(lambda parameters: functional_call(wrapper, parameters, ()))(params)

    def by_hand() -> Tensor:  # torch.distributions' closed form, by autograd
        return sum(
            torch_kl(Normal(q.mu, F.softplus(q.rho)), Normal(0.0, 1.0)).sum()
            for _, q in named_posteriors(net)
        )

    expected = dict(
        zip(params, torch.autograd.grad(by_hand(), list(net.parameters())), strict=True)
    )
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_torch_func_grad_through_a_forward_on_the_reference_path() -> None:
    """grad of a loss of one forward with respect to the parameters: the same as autograd for
    the same noise (the generator reset before each)."""
    torch.manual_seed(3)
    net = bayesianize(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1))).double()
    params = {name: p.detach() for name, p in net.named_parameters()}
    x = torch.randn(7, 3, dtype=F64)

    def loss(parameters: dict[str, Tensor]) -> Tensor:
        return functional_call(net, parameters, (x,)).square().sum()

    torch.manual_seed(11)
    got = grad(loss)(params)
    torch.manual_seed(11)
    net.zero_grad()
    with native.stepped_aside():
        net(x).square().sum().backward()
    for name, parameter in net.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_vmap_with_different_randomness_draws_independent_samples(estimator: str) -> None:
    """vmap over 4000 copies of one input with randomness="different": each copy its own
    draw, with the layer's closed-form predictive mean and variance (float32: the native
    kernels step aside under the transform)."""
    torch.manual_seed(4)
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator=estimator)
    x = torch.randn(1, 3)
    n = 4000
    outs = vmap(lambda x: net(x), randomness="different")(x.expand(n, 1, 3)).double()[:, 0]
    q_w, q_b = net[0].weight_posterior, net[0].bias_posterior
    with torch.no_grad():
        mean = F.linear(x, q_w.mu, q_b.mu).double()[0]
        var = F.linear(x.square(), q_w.scale.square(), q_b.scale.square()).double()[0]
    assert outs.unique(dim=0).shape[0] == n  # every copy its own draw
    assert ((outs.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
    assert ((outs.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (n - 1))).all()


def test_stepped_aside_gives_the_reference_values() -> None:
    """The backend and the reference path: the same KL, and draws with the same moments."""
    torch.manual_seed(5)
    net = bayesianize(nn.Sequential(nn.Linear(20, 30)), estimator="reparameterization")
    fast = kl_divergence(net)
    with native.stepped_aside():
        assert not native.active() and not native.serves(torch.zeros(3))
        reference = kl_divergence(net)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-4)
    assert math.isclose(float(reference), float64_kl(net), rel_tol=1e-5)
