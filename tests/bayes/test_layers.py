"""Bayesian Linear/Conv layers: the three estimators against the closed-form moments.

For a = W x + b with q(W) = N(mu, sigma^2) (elementwise), every estimator must give each output
unit the marginal N(x mu^T + b_mu, x^2 (sigma^2)^T + sigma_b^2). The references below are
plain ``nn.Linear``/``nn.ConvNd`` modules (same configuration) holding mu and sigma^2, run in
float64. Statistical tolerances are 5 standard errors: of a mean, sqrt(var / n); of a Gaussian
sample variance, var sqrt(2 / (n - 1)).
"""

from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bbb_lightning.bayes import (
    ESTIMATORS,
    BayesianLayer,
    MeanFieldNormal,
    ScaleMixturePrior,
    bayesianize,
    kl_divergence,
    native,
    posterior_mean,
    posterior_mean_network,
    sample_forward,
)
from bbb_lightning.bayes.forward_pass import KLRecord

F64 = torch.float64


def bayesian(
    plain: nn.Module, estimator: str, rho_init: float | tuple[float, float] = (-1.5, -0.5)
) -> nn.Sequential:
    """``plain`` (copied) as the only layer of a float64 Bayesian Sequential."""
    net = bayesianize(
        nn.Sequential(copy.deepcopy(plain)),
        posterior=partial(MeanFieldNormal, rho_init=rho_init),
        estimator=estimator,
    )
    assert isinstance(net[0], BayesianLayer)
    return net.double()


def closed_form(net: nn.Sequential, plain: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of every output unit, from plain modules holding mu and sigma^2."""
    layer = net[0]
    q_w, q_b = layer.weight_posterior, layer.bias_posterior
    mean_module = copy.deepcopy(plain).double()
    var_module = copy.deepcopy(plain).double()
    with torch.no_grad():
        mean_module.weight.copy_(q_w.mu)
        var_module.weight.copy_(F.softplus(q_w.rho) ** 2)
        if q_b is not None:
            mean_module.bias.copy_(q_b.mu)
            var_module.bias.copy_(F.softplus(q_b.rho) ** 2)
        return mean_module(x), var_module(x**2)


def assert_moments(samples: Tensor, mean: Tensor, var: Tensor) -> None:
    """samples: (n, *shape) i.i.d. over dim 0; 5 standard errors on the mean and the variance."""
    n = samples.shape[0]
    sample_mean, sample_var = samples.mean(0), samples.var(0)
    mean_error = (sample_mean - mean).abs()
    assert (mean_error <= 5 * (sample_var / n).sqrt()).all(), mean_error.max()
    var_error = (sample_var - var).abs()
    assert (var_error <= 5 * var * math.sqrt(2 / (n - 1))).all(), (var_error / var).max()


LAYERS = {
    "linear": (lambda: nn.Linear(6, 4), (5, 6)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 3), (2, 2, 7)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 2, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(1, 2, 2), (1, 1, 3, 3, 3)),
}
NUM_SAMPLES = 4000


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", list(LAYERS))
def test_sample_forward_has_the_closed_form_moments(kind: str, estimator: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    plain = make()
    net = bayesian(plain, estimator)
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        samples = sample_forward(net, x, NUM_SAMPLES)
        mean, var = closed_form(net, plain, x)
    assert samples.shape == (NUM_SAMPLES, *mean.shape)
    assert_moments(samples, mean, var)


def two_sample_check(a: Tensor, b: Tensor) -> None:
    """Same mean and variance (5 standard errors of the difference) for two i.i.d. samples."""
    n, m = a.shape[0], b.shape[0]
    va, vb = a.var(0), b.var(0)
    assert ((a.mean(0) - b.mean(0)).abs() <= 5 * (va / n + vb / m).sqrt()).all()
    pooled = (va + vb) / 2
    assert ((va - vb).abs() <= 5 * pooled * math.sqrt(2 / (n - 1) + 2 / (m - 1))).all()


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_vectorized_samples_match_single_forwards(kind: str, estimator: str) -> None:
    torch.manual_seed(1)
    make, shape = LAYERS[kind]
    plain = make()
    net = bayesian(plain, estimator)
    x = torch.randn(shape, dtype=F64)
    with torch.no_grad():
        vectorized = sample_forward(net, x, 3000)
        loop = torch.stack([net(x) for _ in range(1500)])
        mean, var = closed_form(net, plain, x)
    assert vectorized.shape == (3000, *loop.shape[1:])
    two_sample_check(vectorized, loop)
    assert_moments(loop, mean, var)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_correlation_across_examples(estimator: str) -> None:
    """Two examples share one weight draw under weight reparameterization, so their outputs are
    correlated (cov = sum_i x1_i x2_i sigma_i^2 + sigma_b^2); local reparameterization and
    flipout make them uncorrelated. Checked per output unit, 5 standard errors of the sample
    covariance (from the spread of the centred products)."""
    torch.manual_seed(2)
    plain = nn.Linear(3, 2)
    net = bayesian(plain, estimator, rho_init=(-0.5, 0.5))
    x = torch.tensor([[1.0, 2.0, -1.0], [1.0, 1.5, -0.5]], dtype=F64)
    with torch.no_grad():
        samples = sample_forward(net, x, NUM_SAMPLES)  # (n, 2, 2)
        q_w, q_b = net[0].weight_posterior, net[0].bias_posterior
        shared = (x[0] * x[1]) @ (F.softplus(q_w.rho) ** 2).T + F.softplus(q_b.rho) ** 2
    centred = samples - samples.mean(0)
    products = centred[:, 0] * centred[:, 1]
    covariance = products.sum(0) / (NUM_SAMPLES - 1)
    expected = shared if estimator == "reparameterization" else torch.zeros_like(shared)
    standard_error = products.std(0) / math.sqrt(NUM_SAMPLES)
    assert ((covariance - expected).abs() <= 5 * standard_error).all()
    assert (shared.abs() > 10 * standard_error).all()  # the test tells the two cases apart


def test_weight_reparameterization_draws_one_weight_per_sample() -> None:
    """Rows e_1, e_2, e_3, 0 read off W_s and b_s of each sample s; a fifth row checks that all
    rows of a sample share that one draw; the draws are independent across samples."""
    torch.manual_seed(3)
    net = bayesian(nn.Linear(3, 2), "reparameterization", rho_init=(-1.0, 0.0))
    probe = torch.randn(1, 3, dtype=F64)
    x = torch.cat([torch.eye(3, dtype=F64), torch.zeros(1, 3, dtype=F64), probe])
    n = 2000
    with torch.no_grad():
        out = sample_forward(net, x, n)  # (n, 5, 2)
    bias = out[:, 3]  # (n, 2)
    weight = (out[:, :3] - bias[:, None]).transpose(1, 2)  # (n, 2, 3)
    reconstructed = torch.einsum("ki,noi->nko", probe, weight)[:, 0] + bias
    torch.testing.assert_close(reconstructed, out[:, 4], rtol=1e-12, atol=1e-12)

    q = net[0].weight_posterior
    with torch.no_grad():
        eps = (weight - q.mu) / F.softplus(q.rho)  # standardised noise, (n, 2, 3)
    flat = eps.reshape(n, -1)
    # All draws are different, and the noise is N(0, 1): 5 SE on mean and variance.
    assert torch.cdist(flat, flat).add(torch.eye(n, dtype=F64)).min() > 0
    assert (flat.mean(0).abs() <= 5 / math.sqrt(n)).all()
    assert ((flat.var(0) - 1).abs() <= 5 * math.sqrt(2 / (n - 1))).all()
    # Consecutive samples uncorrelated: |r| <= 5 / sqrt(n) per weight.
    lag = (flat[1:] * flat[:-1]).mean(0)
    assert (lag.abs() <= 5 / math.sqrt(n - 1)).all()


# Inputs with at least 64 output positions per sample (rows x spatial positions).
WIDE_INPUTS = {
    "linear": (lambda: nn.Linear(6, 4), (64, 6)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1), (3, 2, 5, 5)),
}


@pytest.mark.parametrize("estimator", ["local", "flipout"])
@pytest.mark.parametrize("kind", list(WIDE_INPUTS))
def test_inference_mode_draws_one_weight_per_sample(kind: str, estimator: str) -> None:
    """In inference mode, on an input that differs between samples (S copies that the caller
    made, so the layer cannot know them to be copies) with >= 64 output positions per sample,
    local reparameterization and flipout apply one weight draw per sample: each example keeps
    the closed-form marginal, and two equal examples of one sample get equal outputs, with S
    samples as with one. Under plain no_grad they keep independent noise."""
    torch.manual_seed(12)
    make, shape = WIDE_INPUTS[kind]
    plain = make()
    net = bayesian(plain, estimator)
    x = torch.randn(shape, dtype=F64)
    x[1] = x[0]
    folded = x.repeat(NUM_SAMPLES, *[1] * (x.dim() - 1))
    with torch.inference_mode():
        with net.bayes_forward_pass.folded(NUM_SAMPLES):
            samples = net(folded).unflatten(0, (NUM_SAMPLES, shape[0]))
        single = net(x)
    with torch.no_grad():
        mean, var = closed_form(net, plain, x)
        with net.bayes_forward_pass.folded(NUM_SAMPLES):
            independent = net(folded).unflatten(0, (NUM_SAMPLES, shape[0]))
    assert_moments(samples, mean, var)
    torch.testing.assert_close(samples[:, 0], samples[:, 1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(single[0], single[1], rtol=1e-12, atol=1e-12)
    assert not torch.equal(independent[:, 0], independent[:, 1])


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_inference_mode_predictive_matches_the_training_estimator(estimator: str) -> None:
    """A two-layer network's S-sample predictive in inference mode (local moments in the first
    layer, one weight draw per sample in the second) against the training-time estimator
    under no_grad: the same distribution of every example's outputs (5 standard errors)."""
    torch.manual_seed(13)
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)),
        posterior=partial(MeanFieldNormal, rho_init=(-1.5, -0.5)),
        estimator=estimator,
    ).double()
    x = torch.randn(64, 3, dtype=F64)
    with torch.inference_mode():
        fast = sample_forward(net, x, 3000)
    with torch.no_grad():
        reference = sample_forward(net, x, 3000)
    two_sample_check(fast.clone(), reference)
    assert (fast[:, 0, None] == fast[:, 1:]).sum() == 0  # examples are not copies of each other


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_input_unit_gets_a_full_distribution_per_sample(estimator: str) -> None:
    """Regression: flipout with one shared perturbation dW for all folded samples gave the S
    copies of an example only two values, mu x +- x dW. Each sample needs its own dW."""
    torch.manual_seed(4)
    net = bayesian(nn.Linear(1, 1, bias=False), estimator, rho_init=0.0)
    with torch.no_grad():
        out = sample_forward(net, torch.ones(1, 1, dtype=F64), 2000).flatten()
    assert out.unique().numel() > 1900
    sigma = math.log(2.0)  # softplus(0)
    assert abs(out.var().item() - sigma**2) <= 5 * sigma**2 * math.sqrt(2 / 1999)


PADDINGS = [
    {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
    {"kernel_size": 4, "padding": "same", "padding_mode": "reflect"},  # even kernel: asymmetric
    {"kernel_size": 3, "padding": "same", "padding_mode": "zeros", "dilation": 2},
    {"kernel_size": 3, "padding": "same", "padding_mode": "circular"},
    {"kernel_size": (3, 5), "padding": (1, 2), "padding_mode": "replicate", "stride": 2},
    {"kernel_size": 3, "padding": "valid", "padding_mode": "reflect"},
    {"kernel_size": 3, "padding": 2, "padding_mode": "zeros", "groups": 2},
]


@pytest.mark.parametrize("config", PADDINGS, ids=lambda c: f"{c['padding']}-{c['padding_mode']}")
def test_padding_modes_match_the_plain_convolution(config: dict) -> None:
    torch.manual_seed(5)
    plain = nn.Conv2d(2, 4, **config).double()
    x = torch.randn(2, 2, 7, 8, dtype=F64)
    expected = plain(x)
    for estimator in ESTIMATORS:
        net = bayesian(plain, estimator)
        with posterior_mean(net), torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(posterior_mean_network(net)(x), expected)
        with torch.no_grad():
            samples = sample_forward(net, x, 1500)
            mean, var = closed_form(net, plain, x)
        assert samples.shape == (1500, *expected.shape)
        assert_moments(samples, mean, var)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_posterior_mean_equals_the_plain_layer(kind: str) -> None:
    torch.manual_seed(6)
    make, shape = LAYERS[kind]
    plain = make()
    x = torch.randn(shape)
    for estimator in ESTIMATORS:
        net = bayesianize(nn.Sequential(copy.deepcopy(plain)), estimator=estimator)
        with posterior_mean(net):
            assert torch.equal(net(x), plain(x))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_dead_relu_inputs_give_finite_gradients(estimator: str) -> None:
    """An all-zero input row has zero output variance without a variational bias: the square
    root of the local reparameterization must not produce an infinite gradient."""
    torch.manual_seed(7)
    net = bayesianize(
        nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)),
        estimator=estimator,
    )
    with torch.no_grad():
        net[0].bias_posterior.mu.fill_(-100.0)  # the ReLU is dead for every input
    x = torch.randn(5, 3, requires_grad=True)
    out = net(x)
    if estimator == "local":  # the variance floor of 1e-12 leaves noise of sd 1e-6
        assert out.abs().max() < 1e-5
    else:
        assert torch.equal(out, torch.zeros_like(out))
    (out.square().sum() + out.sum() + kl_divergence(net)).backward()
    for name, parameter in net.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name
    assert torch.isfinite(x.grad).all()

    zero_input = torch.zeros(4, 4, requires_grad=True)
    out = net[2](zero_input)
    out.sum().backward()
    assert torch.isfinite(zero_input.grad).all()
    assert torch.isfinite(net[2].weight_posterior.rho.grad).all()


def test_unknown_estimator_raises() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        bayesianize(nn.Sequential(nn.Linear(2, 2)), estimator="bogus")


# -- gradcheck of the negative ELBO with the noise fixed ---------------------------------------


class NegativeElbo(nn.Module):
    """Gaussian NLL (noise sd 0.1) summed over the batch (and the posterior samples folded by
    :func:`sample_forward` if ``num_samples`` > 1), plus the KL of the network."""

    def __init__(self, net: nn.Module, monte_carlo: bool, num_samples: int = 1) -> None:
        super().__init__()
        self.net = net
        self.monte_carlo = monte_carlo
        self.num_samples = num_samples

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        out = (
            self.net(x) if self.num_samples == 1 else sample_forward(self.net, x, self.num_samples)
        )
        nll = 0.5 * ((out - y) / 0.1).square().sum()
        return nll + kl_divergence(self.net, monte_carlo=self.monte_carlo)


GRADCHECK_CASES = (
    [("linear", estimator, "gaussian") for estimator in ESTIMATORS]
    + [("linear", estimator, "scale-mixture") for estimator in ESTIMATORS]
    + [("conv2d", "flipout", "gaussian"), ("conv2d", "local", "scale-mixture")]
)


@pytest.mark.parametrize(("kind", "estimator", "prior"), GRADCHECK_CASES)
def test_negative_elbo_gradients_match_finite_differences(
    kind: str, estimator: str, prior: str
) -> None:
    """mu ~ U(-0.2, 0.2), rho ~ U(-5, -4): d(-ELBO)/d(mu, rho) against float64 central
    differences (torch.autograd.gradcheck), the noise fixed by re-seeding inside the function.
    The scale-mixture prior has no closed form: its KL is the Monte Carlo estimate."""
    torch.manual_seed(8)
    if kind == "linear":
        plain: nn.Module = nn.Linear(4, 3)
        x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    else:
        plain = nn.Conv2d(2, 2, 3)
        x, y = torch.randn(2, 2, 4, 4, dtype=F64), torch.randn(2, 2, 2, 2, dtype=F64)
    net = bayesianize(
        nn.Sequential(plain),
        prior=ScaleMixturePrior() if prior == "scale-mixture" else None,
        estimator=estimator,
    ).double()
    objective = NegativeElbo(net, monte_carlo=prior == "scale-mixture")
    names = [name for name, _ in objective.named_parameters()]
    assert len(names) == 4 and all(name.endswith(("mu", "rho")) for name in names)
    inputs = []
    for name, parameter in objective.named_parameters():
        value = torch.empty_like(parameter, dtype=F64)
        value.uniform_(-0.2, 0.2) if name.endswith("mu") else value.uniform_(-5.0, -4.0)
        inputs.append(value.requires_grad_())

    def negative_elbo(*tensors: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1234)
            return functional_call(objective, dict(zip(names, tensors, strict=True)), (x, y))

    # The noise is fixed, and there is noise: a different seed gives a different value.
    assert negative_elbo(*inputs).item() == negative_elbo(*inputs).item()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(99)
        other = functional_call(objective, dict(zip(names, inputs, strict=True)), (x, y))
    assert other.item() != negative_elbo(*inputs).item()
    assert torch.autograd.gradcheck(negative_elbo, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("bias", [True, False])
def test_vectorized_sample_gradients_match_finite_differences(estimator: str, bias: bool) -> None:
    """Three posterior samples folded through two layers (:func:`sample_forward`): the
    gradients of the input, of every mu and rho, through the per-sample weight draws of
    weight reparameterization and flipout too, against float64 central differences with the
    noise fixed."""
    torch.manual_seed(9)
    net = bayesianize(
        nn.Sequential(nn.Linear(4, 3, bias=bias), nn.Tanh(), nn.Linear(3, 2, bias=bias)),
        estimator=estimator,
    ).double()
    objective = NegativeElbo(net, monte_carlo=False, num_samples=3)
    names = [name for name, _ in objective.named_parameters()]
    x, y = torch.randn(5, 4, dtype=F64), torch.randn(3, 5, 2, dtype=F64)
    inputs = [x.clone().requires_grad_()]
    for name, parameter in objective.named_parameters():
        value = torch.empty_like(parameter, dtype=F64)
        value.uniform_(-0.5, 0.5) if name.endswith("mu") else value.uniform_(-3.0, -2.0)
        inputs.append(value.requires_grad_())

    def negative_elbo(x: Tensor, *tensors: Tensor) -> Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4321)
            return functional_call(objective, dict(zip(names, tensors, strict=True)), (x, y))

    assert torch.autograd.gradcheck(negative_elbo, tuple(inputs), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_flipout_remembers_the_weights_it_used(num_samples: int) -> None:
    """With one input equal to 1 and no bias, flipout gives a_nj = mu_j + s_n r_nj dW_j: every
    row sees the remembered draw w = mu + dW up to its signs, so |a_nj - mu_j| = |w_j - mu_j|;
    the Monte Carlo KL is evaluated at w."""
    torch.manual_seed(10)
    net = bayesianize(
        nn.Sequential(nn.Linear(1, 6, bias=False)), estimator="flipout", prior=ScaleMixturePrior()
    ).double()
    q = net[0].weight_posterior
    record = KLRecord()
    with net.bayes_forward_pass.recording(record):
        out = sample_forward(net, torch.ones(7, 1, dtype=F64), num_samples)  # (S, B, 6)
    drawn = record.sample(q)
    assert drawn is not None and drawn.shape == (num_samples, 6, 1)
    deviation = (drawn - q.mu).reshape(num_samples, 1, 6).abs()
    torch.testing.assert_close((out - q.mu.reshape(6)).abs(), deviation.expand(-1, 7, -1))
    assert (deviation > 0).all()
    kl = kl_divergence(net, monte_carlo=True, record=record)
    prior = q.prior.distribution()
    sigma = F.softplus(q.rho)
    neg_entropy = -(sigma.log() + 0.5 * math.log(2 * math.pi * math.e)).sum()
    by_hand = neg_entropy - prior.log_prob(drawn).sum() / num_samples
    torch.testing.assert_close(kl, by_hand)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("num_samples", [1, 3])
@pytest.mark.parametrize("rows", [6, 70])
def test_a_seed_gives_the_same_forward_with_and_without_gradients(
    estimator: str, num_samples: int, rows: int
) -> None:
    """What reentrant ``torch.utils.checkpoint`` relies on: a forward recomputed with gradients
    after one without draws the same noise, and leaves the generator where the first left it.
    float32, so that the native kernels (where built) take the recorded path. 70 rows: enough
    for inference mode's weight draws, which plain no_grad must not take."""
    torch.manual_seed(0)
    net = bayesianize(
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), estimator=estimator
    )
    x = torch.randn(rows, 5)
    outputs, next_draws = [], []
    for grad in (False, True):
        torch.manual_seed(3)
        with torch.set_grad_enabled(grad):
            outputs.append(sample_forward(net, x, num_samples))
        next_draws.append(torch.rand(1))
    torch.testing.assert_close(outputs[0], outputs[1].detach())
    assert torch.equal(*next_draws)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_a_layer_draws_its_weight_and_bias_from_one_node(estimator: str, num_samples: int) -> None:
    """Under every estimator a Gaussian layer's weight and bias (their draws, perturbations or
    variances, and their KLs) come from one autograd node where the native kernels are built,
    and every parameter gets a finite gradient from the ELBO; a frozen bias leaves the weight
    to its own node."""
    torch.manual_seed(0)
    net = bayesianize(
        nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), estimator=estimator
    )
    (sample_forward(net, torch.randn(6, 5), num_samples).sum() + kl_divergence(net)).backward()
    for parameter in net.parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
    if native.kernels() is None:
        return

    def recorded_kls() -> dict:
        record = KLRecord()
        with net.bayes_forward_pass.recording(record):
            sample_forward(net, torch.randn(6, 5), num_samples)
        return record.kls

    kls = recorded_kls()
    for layer in (net[0], net[2]):
        weight_node = kls[layer.weight_posterior].grad_fn
        assert weight_node is kls[layer.bias_posterior].grad_fn
        assert "SampleWithKLNode" in weight_node.name()
    net[0].bias_posterior.frozen = True
    kls = recorded_kls()
    assert len(kls[net[0].weight_posterior].grad_fn.next_functions) == 2  # mu, rho
    assert len(kls[net[2].weight_posterior].grad_fn.next_functions) == 4


def test_a_posteriors_forward_hooks_run_when_the_layer_draws_one_sample() -> None:
    """Where a layer draws one weight (reparameterization, S = 1) it calls its posteriors, as
    it did before the weight and bias shared one node: their forward hooks run. Pruning a
    posterior's mu (``torch.nn.utils.prune``, a forward pre-hook recomputing mu = mu_orig *
    mask) must give each step's draw the current mu, not the one of the step before, whose
    graph a backward has freed."""
    torch.manual_seed(0)
    layer = bayesianize(nn.Sequential(nn.Linear(5, 3)))[0]
    calls = []
    layer.bias_posterior.register_forward_hook(lambda *_: calls.append("bias"))
    torch.nn.utils.prune.l1_unstructured(layer.weight_posterior, "mu", amount=0.5)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 5)
    for _ in range(3):
        optimizer.zero_grad()
        (layer(x).square().sum() + kl_divergence(layer)).backward()
        optimizer.step()
    q = layer.weight_posterior
    layer(x)
    assert calls == ["bias"] * 4
    assert torch.equal(q.mu, q.mu_orig * q.mu_mask)  # the current step's mu
    assert q.mu_orig.grad is not None and torch.isfinite(q.mu_orig.grad).all()


class _MeanOnly(MeanFieldNormal):
    """A Gaussian posterior whose draws, perturbations and variances are those of sigma = 0."""

    def rsample(self, sample_shape: tuple[int, ...] = (), scale_values: object = None) -> Tensor:
        return self.mu.expand(*sample_shape, *self.mu.shape)

    def perturbation(
        self, sample_shape: tuple[int, ...] = (), scale_values: object = None
    ) -> Tensor:
        return torch.zeros(*sample_shape, *self.mu.shape)

    def variance(self) -> Tensor:
        return torch.zeros_like(self.mu)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("num_samples", [1, 3])
def test_a_layer_asks_a_posterior_subclass_for_its_draws(estimator: str, num_samples: int) -> None:
    """A subclass of MeanFieldNormal that defines its own rsample, perturbation or variance is
    asked for them, as before the weight and bias shared one node: the node is only for the
    methods of MeanFieldNormal itself."""
    torch.manual_seed(0)
    net = bayesianize(nn.Sequential(nn.Linear(5, 3)), posterior=_MeanOnly, estimator=estimator)
    x = torch.randn(4, 5)
    layer = net[0]
    mean = x @ layer.weight_posterior.mu.T + layer.bias_posterior.mu
    out = sample_forward(net, x, num_samples)
    torch.testing.assert_close(out, mean.expand(num_samples, -1, -1))


class Siamese(nn.Module):
    """One Linear layer applied to two inputs in one forward pass: its weights are shared."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.branch(x) - self.branch(x)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_a_layer_applied_twice_in_one_forward_pass_applies_one_weight_draw(
    num_samples: int,
) -> None:
    torch.manual_seed(0)
    net = bayesianize(Siamese(), estimator="reparameterization")
    x = torch.randn(4, 3)
    assert torch.equal(sample_forward(net, x, num_samples), torch.zeros(num_samples, 4, 2))
    branch = net.branch  # ... while separate forward passes still draw afresh
    assert not torch.equal(branch(x), branch(x))


@pytest.mark.parametrize("estimator", ["local", "flipout"])
def test_per_application_noise_is_warned_when_a_layer_is_applied_twice(estimator: str) -> None:
    net = bayesianize(Siamese(), estimator=estimator)
    with pytest.warns(
        UserWarning, match=f"applied twice in one forward pass: under estimator='{estimator}'"
    ):
        net(torch.randn(4, 3))
    once = bayesianize(nn.Sequential(nn.Linear(3, 2)), estimator=estimator)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        once(torch.randn(4, 3))
        once(torch.randn(4, 3))  # two forward passes, one application each: no warning
