"""Weight pruning by signal-to-noise ratio (Blundell et al. 2015, section 5.2).

Each variational weight has SNR = |E_q[w]| / stddev_q(w) (|μ| / σ for the mean-field Gaussian,
|μ| / (σ / sqrt(D)) for the radial posterior). Pruning a fraction p sets the round(p · n)
weights with the lowest SNR to zero, ranked with one global threshold over every posterior of
the network (weights and biases, all layers together, as Blundell et al.), and predicts with the
posterior mean of the rest. Deterministic tensors are kept as they are; a posterior whose
distribution has no stddev is left out with a warning naming it
(:func:`~bbb_lightning.bayes.signal_to_noise`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..bayes import posterior_mean_network, signal_to_noise

__all__ = ["PRUNING_FRACTIONS", "prune_by_snr", "snr_masks"]

PRUNING_FRACTIONS: Sequence[float] = (0.0, 0.5, 0.75, 0.95, 0.98)
"""The fractions of Blundell et al. (2015), table 2."""


def snr_masks(net: nn.Module, fraction: float) -> dict[str, Tensor]:
    """Boolean keep-masks, one per variational tensor, dropping the lowest-SNR ``fraction``.

    Exactly round(fraction · n) of the n variational weights are dropped (ties broken by order).

    Example:
        >>> from bbb_lightning.bayes import bayesianize
        >>> net = bayesianize(nn.Linear(10, 10))
        >>> masks = snr_masks(net, 0.5)
        >>> sorted(masks), sum(int((~keep).sum()) for keep in masks.values())  # of 110 weights
        (['bias', 'weight'], 55)
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"pruning fraction must be in [0, 1], got {fraction!r}")
    snr = signal_to_noise(net)
    if not snr:
        raise ValueError("the network has no posterior with a stddev to prune")
    flat = torch.cat([values.flatten() for values in snr.values()])
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    num_dropped = round(fraction * flat.numel())
    keep[torch.argsort(flat, stable=True)[:num_dropped]] = False
    masks, start = {}, 0
    for name, values in snr.items():
        masks[name] = keep[start : start + values.numel()].view_as(values)
        start += values.numel()
    return masks


def prune_by_snr(net: nn.Module, fraction: float) -> nn.Module:
    """The posterior-mean network (a plain ``nn.Module``) with the lowest-SNR weights zeroed.

    Example:
        >>> from bbb_lightning.bayes import bayesianize
        >>> net = bayesianize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> pruned = prune_by_snr(net, 0.5)
        >>> sum(int((p == 0).sum()) for p in pruned.parameters())  # half of 20 + 10 weights
        15
    """
    masks = snr_masks(net, fraction)
    plain = posterior_mean_network(net)
    parameters = dict(plain.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            if name not in parameters:
                raise KeyError(f"posterior {name!r} has no parameter in the posterior-mean network")
            parameters[name].mul_(keep.to(parameters[name].dtype))
    return plain
