"""Each metric against an independent reference: hand computations, float64 loops over
examples and bins, closed forms, and ``torch.distributions``."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Normal, kl_divergence

from bbb_lightning.evaluation.metrics import (
    brier_score,
    calibration_errors,
    classification_metrics,
    entropy,
    expected_entropy,
    gaussian_nll,
    interval_coverage,
    mutual_information,
    nll_from_samples,
    ood_scores,
    predictive_entropy,
    regression_metrics,
    reliability_bins,
)


def random_sample_probs(s: int = 7, b: int = 11, c: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(s, b, c, generator=generator, dtype=torch.float64)
    return logits.softmax(-1)


# -- entropies --------------------------------------------------------------------------------
def test_entropy_by_hand_and_against_categorical():
    assert entropy(torch.tensor([0.5, 0.5])).item() == pytest.approx(math.log(2))
    assert entropy(torch.full((8,), 1 / 8)).item() == pytest.approx(math.log(8))
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == 0.0  # 0 log 0 = 0, no NaN
    probs = random_sample_probs()[0]
    assert torch.allclose(predictive_entropy(probs), Categorical(probs=probs).entropy())


def test_expected_entropy_and_mutual_information_against_loops():
    sample_probs = random_sample_probs()
    s, b, _ = sample_probs.shape
    for i in range(b):
        draws = [Categorical(probs=sample_probs[k, i]) for k in range(s)]
        aleatoric = sum(d.entropy() for d in draws) / s
        mean = Categorical(probs=sample_probs[:, i].mean(0))
        assert expected_entropy(sample_probs)[i].item() == pytest.approx(aleatoric.item())
        # I[y; w] = E_s KL(p_s || p̄): a second closed form of the same quantity.
        mi = sum(kl_divergence(d, mean) for d in draws) / s
        assert mutual_information(sample_probs)[i].item() == pytest.approx(mi.item(), abs=1e-12)
        assert mutual_information(sample_probs)[i].item() == pytest.approx(
            (mean.entropy() - aleatoric).item(), abs=1e-12
        )


def test_mutual_information_extremes():
    same = torch.tensor([0.2, 0.3, 0.5]).expand(4, 1, 3)
    assert mutual_information(same).item() == pytest.approx(0.0, abs=1e-7)
    disagree = torch.eye(4).unsqueeze(1)  # four one-hot draws, four classes
    assert mutual_information(disagree).item() == pytest.approx(math.log(4))
    assert expected_entropy(disagree).item() == 0.0


# -- proper scoring rules ---------------------------------------------------------------------
def test_brier_score_by_hand_and_loop():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.1² + 0.9² + 0.8²) = 1.46
    assert brier_score(probs, torch.tensor([0, 1])).item() == pytest.approx((0.14 + 1.46) / 2)
    probs = random_sample_probs()[0]
    y = torch.arange(len(probs)) % probs.shape[1]
    reference = sum(
        sum((probs[i, c].item() - (c == y[i].item())) ** 2 for c in range(probs.shape[1]))
        for i in range(len(probs))
    ) / len(probs)
    assert brier_score(probs, y).item() == pytest.approx(reference)


def test_nll_from_samples_is_a_stable_log_mean_exp():
    likelihoods = torch.tensor([[0.9, 0.2], [0.5, 0.4], [0.1, 0.3]], dtype=torch.float64)
    expected = -torch.log(likelihoods.mean(0))
    assert torch.allclose(nll_from_samples(likelihoods.log()), expected)
    tiny = torch.full((3, 1), -2000.0)  # exp underflows; log-mean-exp does not
    assert nll_from_samples(tiny).item() == pytest.approx(2000.0)


def test_gaussian_nll_against_normal_log_prob():
    generator = torch.Generator().manual_seed(1)
    mean, y = torch.randn(2, 6, 3, generator=generator, dtype=torch.float64)
    var = torch.rand(6, 3, generator=generator, dtype=torch.float64) + 0.1
    reference = -Normal(mean, var.sqrt()).log_prob(y).sum(-1)
    assert torch.allclose(gaussian_nll(mean, var, y), reference)


# -- calibration ------------------------------------------------------------------------------
def test_calibration_errors_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7], [0.4, 0.6]])
    y = torch.tensor([0, 1, 1, 1, 0])
    # Bins (10): conf 0.9 -> acc 1/2 (2 ex.), conf 0.7 -> acc 1 (2 ex.), conf 0.6 -> acc 0 (1).
    errors = calibration_errors(probs, y, num_bins=10)
    assert errors["ece"].item() == pytest.approx((2 * 0.4 + 2 * 0.3 + 1 * 0.6) / 5, abs=1e-6)
    assert errors["mce"].item() == pytest.approx(0.6, abs=1e-6)


def reference_ece(probs: torch.Tensor, y: torch.Tensor, num_bins: int) -> tuple[float, float]:
    """Guo et al.'s ECE and MCE by a loop over equal-width bins (m/M, (m+1)/M]."""
    confidence, predicted = probs.max(-1)
    ece, mce, n = 0.0, 0.0, len(y)
    for m in range(num_bins):
        low, high = m / num_bins, (m + 1) / num_bins
        inside = [i for i in range(n) if low < confidence[i].item() <= high]
        if not inside:
            continue
        accuracy = sum(float(predicted[i] == y[i]) for i in inside) / len(inside)
        mean_confidence = sum(confidence[i].item() for i in inside) / len(inside)
        ece += len(inside) / n * abs(accuracy - mean_confidence)
        mce = max(mce, abs(accuracy - mean_confidence))
    return ece, mce


def test_calibration_errors_and_reliability_bins_against_a_loop():
    generator = torch.Generator().manual_seed(3)
    probs = (3 * torch.randn(400, 4, generator=generator, dtype=torch.float64)).softmax(-1)
    y = torch.randint(0, 4, (400,), generator=generator)
    ece, mce = reference_ece(probs, y, num_bins=15)
    errors = calibration_errors(probs, y, num_bins=15)
    assert errors["ece"].item() == pytest.approx(ece, abs=1e-5)
    assert errors["mce"].item() == pytest.approx(mce, abs=1e-5)
    confidence, accuracy, count = reliability_bins(probs, y, num_bins=15)
    assert count.sum().item() == 400
    from_bins = ((count / 400) * (accuracy - confidence).abs()).sum().item()
    assert from_bins == pytest.approx(ece, abs=1e-9)


def test_classification_metrics_keys_and_consistency():
    sample_probs = random_sample_probs(s=5, b=40, c=3, seed=4)
    probs = sample_probs.mean(0)
    y = torch.arange(40) % 3
    log_likelihood = sample_probs.gather(-1, y.expand(5, 40).unsqueeze(-1)).squeeze(-1).log()
    metrics = classification_metrics(
        probs, y, nll_from_samples(log_likelihood), expected_entropy(sample_probs)
    )
    assert set(metrics) == {
        "accuracy",
        "nll",
        "ece",
        "mce",
        "brier",
        "entropy",
        "expected_entropy",
        "mutual_information",
    }
    assert metrics["accuracy"] == pytest.approx((probs.argmax(-1) == y).double().mean().item())
    assert metrics["nll"] == pytest.approx(-probs[torch.arange(40), y].log().mean().item())
    assert metrics["mutual_information"] == pytest.approx(
        mutual_information(sample_probs).mean().item()
    )
    assert metrics["entropy"] == pytest.approx(
        metrics["expected_entropy"] + metrics["mutual_information"]
    )


# -- regression -------------------------------------------------------------------------------
def test_interval_coverage_by_hand_and_for_gaussian_data():
    z95 = 1.959964
    mean, std = torch.zeros(4), torch.full((4,), 2.0)
    y = torch.tensor([2 * (z95 - 1e-3), 2 * (z95 + 1e-3), -0.1, 100.0])
    assert interval_coverage(mean, std, y, [0.95]) == {0.95: 0.5}
    generator = torch.Generator().manual_seed(5)
    y = 3 + 2 * torch.randn(200_000, generator=generator, dtype=torch.float64)
    coverage = interval_coverage(torch.full_like(y, 3.0), torch.full_like(y, 2.0), y)
    for level, value in coverage.items():
        assert value == pytest.approx(level, abs=0.005)
    with pytest.raises(ValueError, match="interval level"):
        interval_coverage(mean, std, y[:4], [1.5])
    # a zero-width interval holds its own mean (0/0 was NaN, counted as outside)
    assert interval_coverage(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, 1.0]), [0.5]) == {
        0.5: 0.5
    }
    # a NaN target or std was counted as outside: 2 of 3 covered instead of an error
    nan = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match=r"^interval_coverage: 1 examples have a NaN or infin"):
        interval_coverage(torch.zeros(3), torch.ones(3), nan)
    with pytest.raises(ValueError, match=r"and 1 a NaN or negative std"):
        interval_coverage(torch.zeros(3), nan, torch.zeros(3))


def test_regression_metrics():
    mean = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([[1.0], [1.0], [2.0], [6.0]])
    epistemic, aleatoric = torch.full_like(mean, 0.5), torch.full_like(mean, 1.5)
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    metrics = regression_metrics(mean, epistemic, aleatoric, y, nll)
    assert metrics["rmse"] == pytest.approx(math.sqrt((1 + 0 + 0 + 9) / 4))
    assert metrics["nll"] == pytest.approx(2.5)
    assert metrics["epistemic_var"] == pytest.approx(0.5)
    assert metrics["aleatoric_var"] == pytest.approx(1.5)
    reference = -Normal(mean, torch.full_like(mean, 2.0).sqrt()).log_prob(y).mean().item()
    assert metrics["gaussian_nll"] == pytest.approx(reference, rel=1e-6)
    # |error| / sqrt(2) = 0.71, 0, 0, 2.12: the 50 % interval (z 0.674) holds the two zeros,
    # the 90 % and 95 % ones (z 1.645, 1.960) all but the last.
    assert metrics["coverage_50"] == 0.5
    assert metrics["coverage_90"] == 0.75
    assert metrics["coverage_95"] == 0.75


# -- out of distribution ----------------------------------------------------------------------
def reference_auroc_aupr(inside: list[float], outside: list[float]) -> tuple[float, float]:
    """AUROC as P(score_out > score_in) + 0.5 P(tie); AUPR as the average precision."""
    pairs = [(o > i) + 0.5 * (o == i) for o in outside for i in inside]
    auroc = sum(pairs) / len(pairs)
    ranked = sorted([(s, 1) for s in outside] + [(s, 0) for s in inside], reverse=True)
    hits, precision_sum = 0, 0.0
    for rank, (_, positive) in enumerate(ranked, start=1):
        if positive:
            hits += 1
            precision_sum += hits / rank
    return auroc, precision_sum / len(outside)


def test_ood_scores_by_hand_and_against_loops():
    assert ood_scores(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == {
        "auroc": 1.0,
        "aupr": 1.0,
    }
    assert ood_scores(torch.tensor([0.3, 0.4]), torch.tensor([0.1, 0.2]))["auroc"] == 0.0
    generator = torch.Generator().manual_seed(6)
    inside = torch.rand(60, generator=generator, dtype=torch.float64)
    outside = torch.rand(40, generator=generator, dtype=torch.float64) + 0.4
    auroc, aupr = reference_auroc_aupr(inside.tolist(), outside.tolist())
    scores = ood_scores(inside, outside)
    assert scores["auroc"] == pytest.approx(auroc, abs=1e-6)
    assert scores["aupr"] == pytest.approx(aupr, abs=1e-6)


def test_ood_scores_keep_the_order_of_tiny_or_large_scores():
    # Mutual informations of 1e-9 (or entropies above 1) must not be squashed by a sigmoid.
    inside = torch.tensor([1e-9, 2e-9, 3e-9], dtype=torch.float64)
    outside = torch.tensor([2.5e-9, 4e-9], dtype=torch.float64)
    assert ood_scores(inside, outside)["auroc"] == pytest.approx(5 / 6, abs=1e-6)
    assert ood_scores(inside + 40, outside + 40)["auroc"] == pytest.approx(5 / 6, abs=1e-6)


@pytest.mark.parametrize(
    ("inside", "outside", "message"),
    [
        ([0.1, float("nan")], [0.5], "in_scores has 1 of 2 scores NaN or infinite"),
        ([0.1, 0.2], [float("inf"), 0.5, 0.7], "out_scores has 1 of 3 scores NaN or infinite"),
        ([0.1, 0.2], [], "out_scores is empty"),
        ([], [0.5], "in_scores is empty"),
    ],
)
def test_ood_scores_refuse_nonfinite_scores_and_a_missing_class(inside, outside, message):
    # They gave an AUROC of 0.0 (NaN), 0.25 (inf: the affine map made NaN of it) or 0.0 (one
    # class), silently.
    with pytest.raises(ValueError, match=message):
        ood_scores(torch.tensor(inside), torch.tensor(outside))


def test_ood_scores_with_ties_count_half_a_pair():
    # Mann-Whitney: a tied in/out pair counts 1/2; average precision steps at each threshold.
    # Thresholds 3, 2, 1: (recall, precision) = (1/3, 1), (2/3, 2/3), (1, 1/2).
    inside, outside = [0.0, 1.0, 1.0, 2.0], [1.0, 2.0, 3.0]
    scores = ood_scores(torch.tensor(inside), torch.tensor(outside))
    assert reference_auroc_aupr(inside, outside)[0] == pytest.approx((2 + 3.5 + 4) / 12)
    assert scores["auroc"] == pytest.approx((2 + 3.5 + 4) / 12, abs=1e-6)
    assert scores["aupr"] == pytest.approx((1 + 2 / 3 + 1 / 2) / 3, abs=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), 1.5, -0.25])
def test_calibration_errors_refuse_what_is_not_a_probability(bad):
    # torchmetrics softmaxes probs with any value outside [0, 1] (a NaN included): the ECE of a
    # NaN predictive was a finite number (0.68 here).
    probs = torch.tensor([[0.5, 0.5], [0.2, 0.8]])
    probs[0, 1] = bad
    with pytest.raises(ValueError, match=r"probs has 1 of 4 values NaN or outside \[0, 1\]"):
        calibration_errors(probs, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"probs holds no example"):  # ECE was NaN
        calibration_errors(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
