"""Likelihoods, the predictive, and the KL weighting against hand computations."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from bbb_lightning.training.objectives import (
    CategoricalLikelihood,
    GaussianLikelihood,
    KLTerm,
    log_mean_exp,
)


def test_uniform_weighting_is_one_over_m():
    term = KLTerm(weighting="uniform")
    assert [term.weight(i, 4, step=0) for i in range(4)] == [0.25] * 4


@pytest.mark.parametrize("num_batches", [1, 3, 10, 2000])
def test_minibatch_weighting_matches_blundell_and_sums_to_one(num_batches):
    term = KLTerm(weighting="minibatch")
    weights = [term.weight(i, num_batches, step=0) for i in range(num_batches)]
    if num_batches <= 10:  # 2^(M-i) / (2^M - 1), i = 1..M, exactly as in the paper
        expected = [
            2 ** (num_batches - i) / (2**num_batches - 1) for i in range(1, num_batches + 1)
        ]
        assert weights == pytest.approx(expected, rel=1e-12)
    assert all(math.isfinite(w) and w >= 0 for w in weights)
    assert math.fsum(weights) == pytest.approx(1.0, rel=1e-12)


def test_warmup_and_scale_multiply_the_weight():
    term = KLTerm(weighting="uniform", scale=0.5, warmup_steps=10)
    assert term.weight(0, 2, step=0) == 0.0
    assert term.weight(0, 2, step=5) == pytest.approx(0.5 * 0.5 * 0.5)
    assert term.weight(0, 2, step=25) == pytest.approx(0.5 * 0.5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weighting", "linear", "kl.weighting must be one of uniform, minibatch; got 'linear'"),
        ("reduction", "max", "kl.reduction must be one of sum, mean; got 'max'"),
        ("scale", -1.0, "kl.scale must be a finite number >= 0, got -1.0"),
        ("scale", "big", "kl.scale must be a finite number >= 0, got 'big'"),
        ("warmup_steps", -3, "kl.warmup_steps must be an integer >= 0, got -3"),
        ("warmup_steps", 2.5, "kl.warmup_steps must be an integer >= 0, got 2.5"),
        ("warmup_steps", True, "kl.warmup_steps must be an integer >= 0, got True"),
        ("monte_carlo", "yes", "kl.monte_carlo must be true or false, got 'yes'"),
        # these once gave TypeErrors, or (nan, inf) silently no warm-up or no KL at all
        ("scale", None, "kl.scale must be a finite number >= 0, got None"),
        ("scale", "0.5", "kl.scale must be a finite number >= 0, got '0.5'"),
        ("warmup_steps", None, "kl.warmup_steps must be an integer >= 0, got None"),
        ("warmup_steps", "10", "kl.warmup_steps must be an integer >= 0, got '10'"),
        ("warmup_steps", math.nan, "kl.warmup_steps must be an integer >= 0, got nan"),
        ("warmup_steps", math.inf, "kl.warmup_steps must be an integer >= 0, got inf"),
    ],
)
def test_bad_kl_settings_are_named(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KLTerm(**{field: value})


def test_categorical_log_prob_and_predictive_nll():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 4, dtype=torch.float64)  # S=5, B=3, C=4
    y = torch.tensor([0, 3, 1])
    likelihood = CategoricalLikelihood(num_classes=4)
    expected = torch.stack(
        [torch.distributions.Categorical(logits=logits[s]).log_prob(y) for s in range(5)]
    )
    assert torch.allclose(likelihood.log_prob(logits, y), expected)
    probs = torch.softmax(logits, -1).mean(0)
    assert torch.allclose(likelihood.predictive_probs(logits), probs)
    reference_nll = -probs[torch.arange(3), y].log()
    assert torch.allclose(likelihood.predictive_nll(logits, y), reference_nll)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_categorical_accepts_class_indices_of_any_integer_dtype(dtype):
    """uint8 labels (as stored in IDX files) once failed in gather(): int64 index expected."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4)
    y = torch.tensor([0, 3, 1])
    expected = torch.distributions.Categorical(logits=logits).log_prob(y)
    assert torch.allclose(CategoricalLikelihood(4).log_prob(logits, y.to(dtype)), expected)


@pytest.mark.parametrize(
    ("likelihood", "outputs", "targets", "message"),
    [
        (  # (B, 1) labels broadcast against (S, B), or were silently misread when S == B
            CategoricalLikelihood(4),
            torch.zeros(3, 3, 4),
            torch.zeros(3, 1, dtype=torch.long),
            "classification targets of shape (3, 1) do not fit a batch of 3: the likelihood "
            "needs shape (3,) (one class index per example)",
        ),
        (
            CategoricalLikelihood(4),
            torch.zeros(1, 3, 4),
            torch.zeros(3),
            "classification targets of dtype torch.float32 are not class indices",
        ),
        (  # 1-based labels
            CategoricalLikelihood(4),
            torch.zeros(1, 3, 4),
            torch.tensor([1, 4, 2]),
            "classification targets from 1 to 4 are not all class indices in [0, 4) "
            "(num_classes=4)",
        ),
        (
            CategoricalLikelihood(4),
            torch.zeros(1, 3, 4),
            torch.tensor([-1, 0, 2]),
            "classification targets from -1 to 2 are not all class indices in [0, 4)",
        ),
        (
            CategoricalLikelihood(4),
            torch.zeros(1, 3, 5),
            torch.zeros(3, dtype=torch.long),
            "network outputs of shape (1, 3, 5) do not fit the classification likelihood: it "
            "needs (B, num_outputs) per sample, num_outputs=4",
        ),
        (  # (B,) targets broadcast against (S, B, 1) into (S, B, B): a wrong NLL, no error
            GaussianLikelihood(target_dim=1),
            torch.zeros(2, 3, 1),
            torch.zeros(3),
            "regression targets of shape (3,) do not fit a batch of 3: the likelihood needs "
            "shape (3, 1) (target_dim=1 values per example)",
        ),
        (  # three outputs against one target dimension broadcast silently
            GaussianLikelihood(target_dim=1, noise="fixed"),
            torch.zeros(2, 3, 3),
            torch.zeros(3, 1),
            "network outputs of shape (2, 3, 3) do not fit the regression likelihood",
        ),
        (
            GaussianLikelihood(target_dim=2, noise="heteroscedastic"),
            torch.zeros(2, 3, 2),
            torch.zeros(3, 2),
            "num_outputs=4",
        ),
    ],
)
def test_outputs_and_targets_that_do_not_fit_are_named(likelihood, outputs, targets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        likelihood.log_prob(outputs, targets)
    with pytest.raises(ValueError, match=re.escape(message)):
        likelihood.predictive_nll(outputs, targets)
    with pytest.raises(ValueError, match=re.escape(message)):
        likelihood.expected_nll(outputs, targets)


@pytest.mark.parametrize("samples", [1, 3])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.uint8])
def test_categorical_expected_nll_is_the_mean_over_samples_summed_over_the_batch(samples, dtype):
    """sum_b (1/S) sum_s -log softmax(f_s,b)_y_b, value and gradient, against
    torch.distributions.Categorical in float64."""
    torch.manual_seed(2)
    logits = (3 * torch.randn(samples, 7, 5)).requires_grad_()
    targets = torch.randint(0, 5, (7,)).to(dtype)
    CategoricalLikelihood(5).expected_nll(logits, targets).backward()
    logits64 = logits.detach().double().requires_grad_()
    log_p = torch.distributions.Categorical(logits=logits64).log_prob(targets.long())
    expected = -log_p.mean(0).sum()
    expected.backward()
    got = CategoricalLikelihood(5).expected_nll(logits.detach(), targets)
    assert got.shape == () and float(got) == pytest.approx(float(expected), rel=1e-6)
    assert torch.allclose(logits.grad.double(), logits64.grad, atol=1e-6)


def test_categorical_expected_nll_skips_no_class_index(monkeypatch):
    """cross_entropy's default ignore_index (-100) would drop such an example from the loss
    where the range check does not run (on a GPU); without the check, it is an error here."""
    likelihood = CategoricalLikelihood(5)
    monkeypatch.setattr(likelihood, "_check_class_indices", lambda outputs, targets: None)
    with pytest.raises((IndexError, RuntimeError), match="out of bounds"):
        likelihood.expected_nll(torch.zeros(2, 3, 5), torch.tensor([0, -100, 1]))


def test_a_subclass_redefining_log_prob_trains_on_its_own_log_prob():
    class Tempered(CategoricalLikelihood):
        def log_prob(self, outputs, targets):
            return super().log_prob(outputs / 2.0, targets)

    torch.manual_seed(4)
    logits, targets = torch.randn(3, 6, 4), torch.randint(0, 4, (6,))
    tempered = Tempered(4)
    expected = -tempered.log_prob(logits, targets).mean(0).sum()
    assert torch.equal(tempered.expected_nll(logits, targets), expected)
    assert not torch.allclose(expected, CategoricalLikelihood(4).expected_nll(logits, targets))


def test_gaussian_expected_nll_is_the_mean_over_samples_summed_over_the_batch():
    torch.manual_seed(3)
    likelihood = GaussianLikelihood(target_dim=2, noise="fixed", noise_std=0.5)
    outputs, targets = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(4, 2)
    expected = -Normal(outputs, 0.5).log_prob(targets.double()).sum(-1).mean(0).sum()
    got = likelihood.double().expected_nll(outputs, targets.double())
    assert float(got) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("noise", ["fixed", "homoscedastic", "heteroscedastic"])
def test_gaussian_log_prob_against_torch_distributions(noise):
    torch.manual_seed(1)
    likelihood = GaussianLikelihood(target_dim=2, noise=noise, noise_std=0.3).double()
    outputs = torch.randn(4, 6, likelihood.num_outputs, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    if noise == "heteroscedastic":
        mean, raw = outputs.chunk(2, -1)
        std = torch.nn.functional.softplus(raw) + likelihood.min_std
    else:
        mean, std = outputs, torch.full_like(outputs, 0.3)  # sigma = noise_std
    expected = Normal(mean, std).log_prob(y).sum(-1)
    assert torch.allclose(likelihood.log_prob(outputs, y), expected)
    mixture_nll = -torch.logsumexp(expected, 0) + math.log(4)
    assert torch.allclose(likelihood.predictive_nll(outputs, y), mixture_nll)
    predictive_mean, epistemic, aleatoric = likelihood.predictive_moments(outputs)
    assert torch.allclose(predictive_mean, mean.mean(0))
    assert torch.allclose(epistemic, mean.var(0, unbiased=False))
    assert torch.allclose(aleatoric, std.square().mean(0))


@pytest.mark.parametrize("noise_std", [1e-3, 0.3, 800.0, 1e5])
def test_noise_std_sets_sigma_also_for_targets_in_large_units(noise_std):
    """softplus^-1(noise_std) was log(expm1(noise_std)): an OverflowError from 710 on."""
    likelihood = GaussianLikelihood(noise="fixed", noise_std=noise_std, min_std=0.0).double()
    outputs, y = torch.zeros(1, 3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64)
    expected = Normal(0.0, noise_std).log_prob(y).sum(-1)
    torch.testing.assert_close(likelihood.log_prob(outputs, y)[0], expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise_std", [None, "0.1", math.inf, math.nan, 1e-5, True])
def test_bad_noise_std_is_named(noise_std):
    message = f"likelihood noise_std must be a finite number > min_std=0.0001, got {noise_std!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        GaussianLikelihood(noise_std=noise_std)


@pytest.mark.parametrize("min_std", [None, -1e-3, math.inf, False])
def test_bad_min_std_is_named(min_std):
    """A bool is not a standard deviation (False was taken as 0.0)."""
    message = f"likelihood min_std must be a finite number >= 0, got {min_std!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        GaussianLikelihood(min_std=min_std)


def test_sizes_take_numpy_integers_and_refuse_bools():
    """``labels.max() + 1`` (a numpy integer) was refused as 'not an integer'."""
    assert CategoricalLikelihood(np.int64(3)).num_outputs == 3
    assert type(CategoricalLikelihood(np.int64(3)).num_classes) is int
    assert GaussianLikelihood(target_dim=np.int32(2), noise="heteroscedastic").num_outputs == 4
    assert GaussianLikelihood(target_dim=np.int32(2)).raw_std.shape == (2,)
    with pytest.raises(ValueError, match="likelihood target_dim must be an integer >= 1, got True"):
        GaussianLikelihood(target_dim=True)


def test_homoscedastic_noise_is_learned_and_fixed_noise_is_not():
    assert [n for n, _ in GaussianLikelihood(noise="homoscedastic").named_parameters()] == [
        "raw_std"
    ]
    assert list(GaussianLikelihood(noise="fixed").parameters()) == []


def test_log_mean_exp_is_stable():
    values = torch.tensor([-1000.0, -1000.0])
    assert log_mean_exp(values).item() == pytest.approx(-1000.0)


@pytest.mark.parametrize("noise_std", [1e-3, 0.1, 5.0, 800.0, 1e6])
def test_gaussian_noise_starts_at_noise_std_of_any_size(noise_std):
    """softplus(raw) + min_std = noise_std; log(expm1(x)) overflowed a float above x = 709."""
    likelihood = GaussianLikelihood(noise="homoscedastic", noise_std=noise_std).double()
    _, std = likelihood.mean_and_std(torch.zeros(1, 1, dtype=torch.float64))
    assert float(std) == pytest.approx(noise_std, rel=1e-6)  # raw is a float32 buffer


@pytest.mark.parametrize("noise_std", [float("inf"), float("nan"), 1e-4, "0.1"])
def test_gaussian_noise_std_must_be_finite_and_above_min_std(noise_std):
    with pytest.raises(ValueError, match=r"noise_std must be a finite number > min_std=0.0001"):
        GaussianLikelihood(noise_std=noise_std, min_std=1e-4)
