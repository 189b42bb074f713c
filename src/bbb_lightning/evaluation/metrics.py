"""Metrics of a predictive distribution: pure functions of tensors, no state, no Lightning.

Notation: S posterior draws w_s ~ q(w), B examples, C classes. ``sample_probs`` has shape
(S, B, C) and holds p_s = softmax(f(x; w_s)); the predictive is p̄ = (1/S) sum_s p_s. Entropies
are in nats, with 0 log 0 = 0.

Classification (uncertainty decomposition of Depeweg et al. 2018, Smith & Gal 2018):

    total     H[p̄]                          ``predictive_entropy``
    aleatoric (1/S) sum_s H[p_s]             ``expected_entropy``
    epistemic H[p̄] - (1/S) sum_s H[p_s]     ``mutual_information`` (>= 0, Jensen)

Regression (Gaussian likelihood N(y; m_s, σ_s²) per draw): the predictive is the mixture
(1/S) sum_s N(m_s, σ_s²) with mean m̄, epistemic variance Var_s(m_s) and aleatoric variance
(1/S) sum_s σ_s² (law of total variance); intervals use the Gaussian approximation of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    multiclass_calibration_error,
)

__all__ = [
    "brier_score",
    "calibration_errors",
    "classification_metrics",
    "entropy",
    "expected_entropy",
    "gaussian_nll",
    "interval_coverage",
    "mutual_information",
    "nll_from_samples",
    "ood_scores",
    "predictive_entropy",
    "raw_log_likelihood",
    "regression_metrics",
    "reliability_bins",
]


def _count_outside(values: Tensor, low: float, high: float) -> int:
    """How many of ``values`` are NaN or outside [low, high]."""
    return int((~((values >= low) & (values <= high))).sum())


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy -sum_c p_c log p_c in nats along ``dim`` (0 log 0 = 0).

    Example:
        >>> entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
        tensor([0.6931, 0.0000])
    """
    return 0.0 - torch.special.xlogy(probs, probs).sum(dim)  # 0.0 - x: no "-0.0"


def predictive_entropy(probs: Tensor) -> Tensor:
    """Total uncertainty H[p̄] of predictive probabilities (..., C) -> (...).

    Example:
        >>> predictive_entropy(torch.full((1, 4), 0.25))  # log 4
        tensor([1.3863])
    """
    return entropy(probs, dim=-1)


def expected_entropy(sample_probs: Tensor) -> Tensor:
    """Aleatoric uncertainty (1/S) sum_s H[p_s]: sample probabilities (S, B, C) -> (B,)."""
    return entropy(sample_probs, dim=-1).mean(0)


def mutual_information(sample_probs: Tensor) -> Tensor:
    """Epistemic uncertainty I[y; w | x] = H[p̄] - (1/S) sum_s H[p_s]: (S, B, C) -> (B,).

    Clamped at 0 (it is >= 0 by Jensen's inequality; rounding can make it -1e-8).

    Example:
        >>> agree = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])     # two draws, one example
        >>> disagree = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
        >>> mutual_information(agree), mutual_information(disagree)
        (tensor([0.]), tensor([0.6931]))
    """
    return (predictive_entropy(sample_probs.mean(0)) - expected_entropy(sample_probs)).clamp_min(0)


def brier_score(probs: Tensor, targets: Tensor) -> Tensor:
    """Multi-class Brier score (Brier 1950): mean over examples of sum_c (p_c - 1[y = c])².

    Ranges over [0, 2]; 0 for a confident correct prediction.

    Example:
        >>> brier_score(torch.tensor([[0.8, 0.2], [0.5, 0.5]]), torch.tensor([0, 1]))
        tensor(0.2900)
    """
    one_hot = F.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    return (probs - one_hot).square().sum(-1).mean()


def nll_from_samples(sample_log_probs: Tensor) -> Tensor:
    """Predictive NLL per example, -log (1/S) sum_s p(y | x, w_s), from log p(y | x, w_s).

    Args:
        sample_log_probs: (S, B) log-likelihood of each example under each draw.

    Returns:
        (B,), by a stable log-mean-exp.

    Example:
        >>> nll_from_samples(torch.tensor([[0.5], [0.1]]).log())  # -log 0.3
        tensor([1.2040])
    """
    return -(torch.logsumexp(sample_log_probs, dim=0) - math.log(sample_log_probs.shape[0]))


def calibration_errors(probs: Tensor, targets: Tensor, num_bins: int = 15) -> dict[str, Tensor]:
    """Expected and maximum calibration error of the top-class confidence (Guo et al. 2017).

    With equal-width confidence bins B_m over [0, 1] holding n_m of the N examples,

        ECE = sum_m (n_m / N) |acc(B_m) - conf(B_m)|,   MCE = max_m |acc(B_m) - conf(B_m)|,

    computed by ``torchmetrics`` (norm ``l1`` and ``max``). ``probs`` must be probabilities:
    a NaN, or a value outside [0, 1] (which torchmetrics would silently softmax), is an error.

    Example:
        >>> probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.3, 0.7]])
        >>> errors = calibration_errors(probs, torch.tensor([0, 1, 1, 1]), num_bins=10)
        >>> round(float(errors["ece"]), 4), round(float(errors["mce"]), 4)
        (0.35, 0.4)
    """
    if probs.shape[0] == 0:
        raise ValueError("calibration_errors: probs holds no example; ECE and MCE need one")
    bad = _count_outside(probs, 0.0, 1.0)
    if bad:
        raise ValueError(
            f"calibration_errors: probs has {bad} of {probs.numel()} values NaN or outside "
            "[0, 1]; probabilities are needed"
        )
    num_classes = probs.shape[-1]
    args = (probs.float(), targets, num_classes, num_bins)
    return {
        "ece": multiclass_calibration_error(*args, norm="l1"),
        "mce": multiclass_calibration_error(*args, norm="max"),
    }


def reliability_bins(
    probs: Tensor, targets: Tensor, num_bins: int = 15
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin mean confidence, accuracy and count of the top-class confidence (for figures).

    Bins are (m/M, (m+1)/M] for m = 0..M-1 (the first also holds 0). Empty bins get
    confidence and accuracy 0.
    """
    confidence, predicted = probs.max(-1)
    correct = (predicted == targets).to(probs.dtype)
    index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    count = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, index, torch.ones_like(correct))
    sum_conf = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, index, confidence)
    sum_acc = torch.zeros(num_bins, dtype=probs.dtype).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return sum_conf / safe, sum_acc / safe, count


def classification_metrics(
    probs: Tensor,
    targets: Tensor,
    nll: Tensor,
    expected_entropies: Tensor,
    num_bins: int = 15,
) -> dict[str, float]:
    """Every classification metric of a predictive, from per-example summaries.

    Args:
        probs: predictive probabilities p̄ (N, C).
        targets: class indices (N,).
        nll: per-example predictive NLL (N,) (:func:`nll_from_samples`).
        expected_entropies: per-example (1/S) sum_s H[p_s] (N,) (:func:`expected_entropy`).

    Returns:
        accuracy, nll, ece, mce, brier, entropy (mean H[p̄]), expected_entropy (aleatoric),
        mutual_information (epistemic), each averaged over the N examples.
    """
    total = predictive_entropy(probs)
    metrics = {
        "accuracy": (probs.argmax(-1) == targets).float().mean(),
        "nll": nll.mean(),
        "brier": brier_score(probs, targets),
        "entropy": total.mean(),
        "expected_entropy": expected_entropies.mean(),
        "mutual_information": (total - expected_entropies).clamp_min(0).mean(),
        **calibration_errors(probs, targets, num_bins),
    }
    return {name: float(value) for name, value in metrics.items()}


def interval_coverage(
    mean: Tensor, std: Tensor, targets: Tensor, levels: Sequence[float] = (0.5, 0.9, 0.95)
) -> dict[float, float]:
    """Fraction of targets inside the central ``level`` interval mean ± z·std of a Gaussian.

    z = Φ⁻¹((1 + level) / 2), e.g. 1.645 for 90 %; a NaN or infinite mean or target, or a
    negative or NaN std, is an error. Applied to a BNN's predictive this is the
    Gaussian approximation (matching its first two moments) of the mixture over draws.

    Example:
        >>> cover = interval_coverage(torch.zeros(4), torch.ones(4),
        ...                           torch.tensor([0.1, -0.7, 1.5, 3.0]), levels=[0.5, 0.9])
        >>> cover
        {0.5: 0.25, 0.9: 0.75}
    """
    normal = torch.distributions.Normal(0.0, 1.0)
    error = targets - mean
    if not (bool(torch.isfinite(error).all()) and bool((std >= 0).all())):
        raise ValueError(
            f"interval_coverage: {int((~torch.isfinite(error)).sum())} examples have a NaN or "
            f"infinite mean or target and {int((~(std >= 0)).sum())} a NaN or negative std; "
            "finite means and targets and stds >= 0 are needed"
        )
    # a target equal to the mean lies in every interval, also a zero-width one (0/0)
    distance = torch.where(error == 0, 0.0, error.abs() / std)
    coverage = {}
    for level in levels:
        if not 0 < level < 1:
            raise ValueError(f"interval level must be in (0, 1), got {level!r}")
        z = normal.icdf(torch.tensor((1 + level) / 2, dtype=torch.float64)).item()
        coverage[float(level)] = float((distance <= z).double().mean())
    return coverage


def gaussian_nll(mean: Tensor, var: Tensor, targets: Tensor) -> Tensor:
    """Per-example NLL of N(mean, var), summed over the last (target) dimension.

    0.5 log(2π var) + (y - mean)² / (2 var).

    Example:
        >>> gaussian_nll(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1, 1))  # log √(2π)
        tensor([0.9189])
    """
    return (0.5 * torch.log(2 * math.pi * var) + (targets - mean).square() / (2 * var)).sum(-1)


def raw_log_likelihood(nll: Tensor, target_std: Tensor) -> Tensor:
    """Log-likelihood in the target's own units from the NLL of standardised targets.

    With y' = (y - m) / s per target dimension d, the densities differ by the Jacobian:
    p(y) = p(y') / prod_d s_d, so log p(y) = -nll' - sum_d log s_d, for each of the S mixture
    components alike and so for their mean (the predictive, a log-mean-exp).

    Args:
        nll: -log p(y') per example (B,) or its mean (a 0-dim tensor).
        target_std: the scales s (D,).

    Example:
        >>> raw_log_likelihood(torch.tensor(1.0), torch.tensor([2.0]))  # -1 - log 2
        tensor(-1.6931)
    """
    return -nll - target_std.to(nll).log().sum()


def regression_metrics(
    mean: Tensor,
    epistemic: Tensor,
    aleatoric: Tensor,
    targets: Tensor,
    nll: Tensor,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> dict[str, float]:
    """Every regression metric of a predictive, from its moments (N, D) and per-example NLL.

    Returns:
        rmse; nll (the mixture's, as in training); gaussian_nll (moment-matched Gaussian);
        coverage_<pct> of the central intervals; epistemic_var and aleatoric_var (means).
    """
    var = epistemic + aleatoric
    metrics = {
        "rmse": (mean - targets).square().mean().sqrt().item(),
        "nll": nll.mean().item(),
        "gaussian_nll": gaussian_nll(mean, var, targets).mean().item(),
        "epistemic_var": epistemic.mean().item(),
        "aleatoric_var": aleatoric.mean().item(),
    }
    coverage = interval_coverage(mean, var.sqrt(), targets, levels)
    metrics |= {f"coverage_{round(100 * level):d}": value for level, value in coverage.items()}
    return metrics


def ood_scores(in_scores: Tensor, out_scores: Tensor) -> dict[str, float]:
    """AUROC and AUPR of telling out-of-distribution (positive) from in-distribution inputs.

    A higher score should mean "more likely OOD" (an entropy, a mutual information). AUPR is
    the average precision with OOD as the positive class. Scores are mapped affinely onto
    [0, 1] in float64 first (ranks unchanged), so ``torchmetrics`` does not apply a sigmoid.
    Both sets must be non-empty (with one class the areas are undefined) and every score
    finite (a NaN or infinite score has no rank); otherwise a ValueError names the set.

    Example:
        >>> scores = ood_scores(torch.tensor([0.1, 0.2, 0.6]), torch.tensor([0.5, 0.9]))
        >>> {name: round(value, 4) for name, value in scores.items()}  # 5 of 6 pairs ranked right
        {'auroc': 0.8333, 'aupr': 0.8333}
    """
    for name, values in (("in_scores", in_scores), ("out_scores", out_scores)):
        if values.numel() == 0:
            raise ValueError(f"ood_scores: {name} is empty; AUROC and AUPR need both sets")
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(
                f"ood_scores: {name} has {bad} of {values.numel()} scores NaN or infinite; "
                "scores must be finite"
            )
    scores = torch.cat([in_scores, out_scores]).double()
    span = (scores.max() - scores.min()).clamp_min(torch.finfo(torch.float64).tiny)
    scores = (scores - scores.min()) / span
    labels = torch.cat(
        [
            torch.zeros(len(in_scores), dtype=torch.long),
            torch.ones(len(out_scores), dtype=torch.long),
        ]
    )
    return {
        "auroc": float(binary_auroc(scores, labels)),
        "aupr": float(binary_average_precision(scores, labels)),
    }
