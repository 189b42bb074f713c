"""The fast path of the Gaussian posterior: hand-written gradients, the sigma cache, shared rows.

References are the same quantities written in plain torch ops (autograd through softplus) in
float64; gradients are also checked against central differences (gradcheck).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import Normal
from torch.distributions import kl_divergence as torch_kl

from bbb_lightning.bayes import (
    BayesianLinear,
    bayesianize,
    gaussian_ops,
    kl_divergence,
    native,
)
from bbb_lightning.bayes import layers as layers_module
from bbb_lightning.bayes.forward_pass import ForwardPass
from bbb_lightning.bayes.functional import log_softplus
from bbb_lightning.bayes.gaussian_ops import (
    ScaleValues,
    draw,
    gaussian_kl,
    perturbation,
    variance,
)
from bbb_lightning.bayes.layers import _distinct_rows, _random_signs
from bbb_lightning.bayes.sampling import sample_forward

F64 = torch.float64


def leaf(values: Tensor) -> Tensor:
    return values.to(F64).clone().requires_grad_()


def sigma_of(rho: Tensor, min_scale: float) -> Tensor:
    return F.softplus(rho) + min_scale


@pytest.mark.parametrize("min_scale", [0.0, 0.05])
@pytest.mark.parametrize("sample_shape", [(), (3,)])
def test_draw_perturbation_and_variance_match_autograd(
    min_scale: float, sample_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    mu, rho = leaf(torch.randn(4, 5)), leaf(torch.empty(4, 5).uniform_(-5.0, 1.0))
    eps = torch.randn(*sample_shape, 4, 5, dtype=F64)
    weights = torch.randn(*sample_shape, 4, 5, dtype=F64)
    cases = [
        (
            lambda m, r: draw(m, r, ScaleValues(r, min_scale), eps),
            lambda m, r: m + sigma_of(r, min_scale) * eps,
        ),
        (
            lambda m, r: perturbation(r, ScaleValues(r, min_scale), eps) + 0 * m,
            lambda m, r: sigma_of(r, min_scale) * eps + 0 * m,
        ),
        (
            lambda m, r: variance(r, ScaleValues(r, min_scale)) + 0 * m,
            lambda m, r: sigma_of(r, min_scale) ** 2 + 0 * m,
        ),
    ]
    for ours, reference in cases:
        value = (ours(mu, rho) * weights).sum()
        expected = (reference(mu, rho) * weights).sum()
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad(value, [mu, rho])
        expected_grads = torch.autograd.grad(expected, [mu, rho])
        for a, b in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda m, r, f=ours: (f(m, r) * weights).sum(), (mu, rho))


@pytest.mark.parametrize("min_scale", [0.0, 0.05])
@pytest.mark.parametrize("prior", ["scalar", "per-weight"])
def test_gaussian_kl_matches_torch_distributions(min_scale: float, prior: str) -> None:
    torch.manual_seed(1)
    mu, rho = leaf(torch.randn(3, 4)), leaf(torch.empty(3, 4).uniform_(-6.0, 2.0))
    if prior == "scalar":
        loc, scale = torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64)
    else:
        loc, scale = torch.randn(3, 4, dtype=F64), torch.tensor(0.7, dtype=F64)

    def ours(m: Tensor, r: Tensor) -> Tensor:
        return gaussian_kl(m, r, ScaleValues(r, min_scale), loc, scale)

    def reference(m: Tensor, r: Tensor) -> Tensor:
        return torch_kl(Normal(m, sigma_of(r, min_scale)), Normal(loc, scale)).sum()

    value, expected = ours(mu, rho), reference(mu, rho)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(
        torch.autograd.grad(value, [mu, rho]),
        torch.autograd.grad(expected, [mu, rho]),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (mu, rho))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_kl_is_exact_and_finite_where_sigma_underflows(dtype: torch.dtype) -> None:
    """rho from -10 to -800: sigma underflows to 0 (float32 below ~-103, float64 below ~-745);
    log sigma, the KL and its gradient follow the stable log_softplus reference."""
    rho = torch.tensor([-10.0, -19.9, -20.1, -30.0, -90.0, -110.0, -800.0], dtype=dtype)
    rho.requires_grad_()
    mu = torch.zeros(7, dtype=dtype, requires_grad=True)
    loc, scale = torch.tensor(0.0, dtype=dtype), torch.tensor(0.5, dtype=dtype)
    kl = gaussian_kl(mu, rho, ScaleValues(rho, 0.0), loc, scale)
    kl.backward()
    sigma = F.softplus(rho.detach())
    reference = (math.log(0.5) - log_softplus(rho.detach()) + sigma**2 / (2 * 0.25) - 0.5).sum()
    torch.testing.assert_close(kl.detach(), reference)
    assert torch.isfinite(rho.grad).all()
    # d/drho [sigma^2 / (2 s^2) - log sigma] = (sigma / s^2 - 1 / sigma) sigmoid(rho) -> -1.
    ref_rho = rho.detach().clone().requires_grad_()
    ref = (-log_softplus(ref_rho) + F.softplus(ref_rho) ** 2 / 0.5).sum()
    ref.backward()
    torch.testing.assert_close(rho.grad, ref_rho.grad)


def test_the_kl_after_an_update_sees_the_new_rho() -> None:
    """An optimizer step changes rho in place: the next KL must not use the old sigma."""
    torch.manual_seed(3)
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator="local")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    (net(torch.randn(4, 3)).square().sum() + kl_divergence(net)).backward()
    optimizer.step()
    fresh = sum(
        torch_kl(Normal(q.mu, F.softplus(q.rho)), Normal(0.0, 1.0)).sum()
        for q in (net[0].weight_posterior, net[0].bias_posterior)
    )
    torch.testing.assert_close(kl_divergence(net), fresh)
    # .double() converts rho: the float32 sigma of the last forward is dropped.
    net(torch.randn(4, 3))
    net.double()
    assert kl_divergence(net).dtype == F64


def test_modifying_rho_between_forward_and_backward_raises() -> None:
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator="reparameterization")
    loss = net(torch.randn(4, 3)).sum() + kl_divergence(net)
    with torch.no_grad():
        net[0].weight_posterior.rho.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_distinct_rows_only_for_copies_that_are_still_equal() -> None:
    x = torch.randn(3, 2, 4)
    copies = x.unsqueeze(0).expand(5, *x.shape).reshape(15, 2, 4)
    forward_pass = ForwardPass()
    assert _distinct_rows(forward_pass, copies) is None  # outside sample_forward
    with forward_pass.folded(5, copies=copies):
        assert _distinct_rows(forward_pass, copies) == 3
        assert _distinct_rows(forward_pass, copies.flatten(1)) == 3  # e.g. after nn.Flatten
        assert _distinct_rows(forward_pass, copies.clone()) is None
        assert _distinct_rows(forward_pass, copies.reshape(30, 4)) is None  # another layout
        assert _distinct_rows(forward_pass, copies.transpose(1, 2)) is None
        copies.mul_(2.0)  # in place, the same on every copy: still S copies of one batch
        assert _distinct_rows(forward_pass, copies) == 3
        copies[:3].add_(1.0)  # in place on one sample only (an in-place dropout)
        assert _distinct_rows(forward_pass, copies) is None
        copies[:3].sub_(1.0)
        with native.stepped_aside():  # not on the reference path (compile, torch.func)
            assert _distinct_rows(forward_pass, copies) is None
    with forward_pass.folded(1, copies=x):
        assert _distinct_rows(forward_pass, x) is None


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_shared_first_layer_gives_independent_samples(estimator: str) -> None:
    """With the first layer's mean (and variance) computed once for the S copies, the samples
    still differ and still have the layer's closed-form mean and variance."""
    torch.manual_seed(4)
    net = bayesianize(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), estimator=estimator).double()
    x = torch.randn(3, 2, 2, dtype=F64)
    with torch.no_grad():
        out = sample_forward(net, x, 4000)
        q_w, q_b = net[1].weight_posterior, net[1].bias_posterior
        mean = F.linear(x.flatten(1), q_w.mu, q_b.mu)
        var = F.linear(x.flatten(1).square(), F.softplus(q_w.rho) ** 2, F.softplus(q_b.rho) ** 2)
    assert out.unique().numel() == out.numel()
    assert ((out.mean(0) - mean).abs() <= 5 * (var / 4000).sqrt()).all()
    assert ((out.var(0) - var).abs() <= 5 * var * math.sqrt(2 / 3999)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # native, torch ops
def test_random_signs_are_fair_and_independent(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    reference = torch.empty(4000, 7, 3, dtype=dtype)
    signs = _random_signs(reference, channel_dim=1)
    assert signs.shape == (4000, 7, 1) and signs.dtype == reference.dtype
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    flat = signs.reshape(4000, 7)
    n = flat.shape[0]
    assert (flat.mean(0).abs() <= 5 / math.sqrt(n)).all()
    correlation = (flat.T @ flat) / n - torch.eye(7)
    assert (correlation.abs() <= 5 / math.sqrt(n)).all()
    lagged = (flat[1:] * flat[:-1]).mean(0)
    assert (lagged.abs() <= 5 / math.sqrt(n)).all()


def test_reparameterization_without_gradients_draws_in_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Chunks of 2 weight draws for 5 samples: each sample still shares one weight across its
    rows (rows e_1, e_2, e_3 read it off), and every sample has its own draw."""
    monkeypatch.setattr(layers_module, "_MAX_DRAWN_WEIGHTS", 12)  # 2 draws of a 2x3 weight
    torch.manual_seed(6)
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 2, bias=False)), estimator="reparameterization"
    ).double()
    x = torch.cat([torch.eye(3, dtype=F64), torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)])
    with torch.no_grad():
        out = sample_forward(net, x, 5)  # (5, 4, 2)
    weights = out[:, :3].transpose(1, 2)  # (5, 2, 3)
    torch.testing.assert_close(out[:, 3], weights @ x[3])
    assert weights.reshape(5, -1).unique(dim=0).shape[0] == 5


@pytest.mark.parametrize("estimator", ["reparameterization", "flipout"])
def test_chunked_draws_compute_sigma_once_per_call(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three chunks of draws (5 samples, 2 per chunk) from one sigma per posterior and call."""
    monkeypatch.setattr(layers_module, "_MAX_DRAWN_WEIGHTS", 12)
    computed: list[tuple[int, ...]] = []

    class Counted(ScaleValues):
        def __init__(self, rho: Tensor, *args: Any, **kwargs: Any) -> None:
            computed.append(tuple(rho.shape))
            super().__init__(rho, *args, **kwargs)

    monkeypatch.setattr(gaussian_ops, "ScaleValues", Counted)
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator=estimator)
    with torch.no_grad():
        for _ in range(2):
            sample_forward(net, torch.randn(4, 3), 5)
    assert computed == [(2, 3), (2,)] * 2


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_the_first_layer_computes_the_mean_once_per_example(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under local reparameterization the first layer's moments (mean and variance) see the B
    distinct rows, the second layer's all S*B rows; also in inference mode."""
    net = bayesianize(
        nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)), estimator="local"
    )
    seen: list[tuple[int, int]] = []
    original = BayesianLinear._moments

    def spy(self: BayesianLinear, x: Tensor, *args: Any) -> tuple[Tensor, Tensor]:
        seen.append((self.plain_config["in_features"], x.shape[0]))
        return original(self, x, *args)

    monkeypatch.setattr(BayesianLinear, "_moments", spy)
    x = torch.randn(5, 2, 2)
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad}.get(mode, torch.inference_mode)
    with context():
        out = sample_forward(net, x, 7)
    assert out.shape == (7, 5, 2)
    assert seen == [(4, 5), (3, 35)]


def test_scale_values_of_an_inference_tensor() -> None:
    with torch.inference_mode():
        rho = torch.zeros(3)
    values = ScaleValues(rho, 0.0)
    torch.testing.assert_close(values.sigma, torch.full((3,), math.log(2.0)))


@pytest.mark.parametrize("estimator", ["reparameterization", "flipout"])
def test_chunked_draws_have_the_closed_form_moments(
    estimator: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(layers_module, "_MAX_DRAWN_WEIGHTS", 12)  # chunks of 2 samples
    torch.manual_seed(7)
    net = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator=estimator).double()
    x = torch.randn(4, 3, dtype=F64)
    n = 3000
    with torch.no_grad():
        out = sample_forward(net, x, n)
        q_w, q_b = net[0].weight_posterior, net[0].bias_posterior
        mean = F.linear(x, q_w.mu, q_b.mu)
        var = F.linear(x.square(), F.softplus(q_w.rho) ** 2, F.softplus(q_b.rho) ** 2)
    assert ((out.mean(0) - mean).abs() <= 5 * (var / n).sqrt()).all()
    assert ((out.var(0) - var).abs() <= 5 * var * math.sqrt(2 / (n - 1))).all()


def test_without_autograd_the_values_are_the_same() -> None:
    torch.manual_seed(8)
    mu, rho = leaf(torch.randn(3, 4)), leaf(torch.empty(3, 4).uniform_(-5.0, 0.0))
    eps = torch.randn(2, 3, 4, dtype=F64)
    loc, scale = torch.tensor(0.1, dtype=F64), torch.tensor(0.8, dtype=F64)
    values = ScaleValues(rho, 0.0)

    def all_four() -> list[Tensor]:
        return [
            draw(mu, rho, values, eps),
            perturbation(rho, values, eps),
            variance(rho, values),
            gaussian_kl(mu, rho, values, loc, scale),
        ]

    tracked = all_four()
    assert all(t.grad_fn is not None for t in tracked)
    with torch.no_grad():
        untracked = all_four()
    for a, b in zip(tracked, untracked, strict=True):
        assert b.grad_fn is None
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
