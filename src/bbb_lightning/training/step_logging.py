"""Training-step logging that costs microseconds, not milliseconds.

Lightning's ``self.log`` costs a fixed price per value and step, whether or not the value is
written: a large part of a small network's step (docs/performance.md, "Constants set by
measurement"). So the training step

- accumulates its scalars into one :class:`WeightedMeans` (one tensor update per step), logged
  as ``<name>_epoch`` at the end of the epoch, averaged over every example of every process;
- hands the scalars to Lightning as ``<name>_step`` only on the steps a logger writes
  (:func:`logs_this_step`, every ``Trainer(log_every_n_steps)`` steps).

Example:
    >>> means = WeightedMeans(["nll", "kl"])
    >>> means.update(torch.tensor([1.0, 4.0]), weight=3)
    >>> means.update(torch.tensor([2.0, 0.0]), weight=1)
    >>> {name: round(float(value), 3) for name, value in means.compute().items()}
    {'nll': 1.25, 'kl': 3.0}
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["WeightedMeans", "logs_this_step"]


class WeightedMeans(Metric):
    """Weighted means of named scalars: sum_i w_i v_i / sum_i w_i, summed over processes.

    ``update(values, weight)`` takes the scalars of one step as a vector in the order of
    ``names`` and their weight (the number of examples they average over).
    """

    full_state_update = False
    totals: Tensor
    weight: Tensor

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__()
        self.names = tuple(names)
        self.add_state("totals", torch.zeros(len(self.names)), "sum")
        self.add_state("weight", torch.zeros(()), "sum")

    def update(self, values: Tensor, weight: float) -> None:
        if values.shape != (len(self.names),):
            raise ValueError(
                f"expected {len(self.names)} values ({', '.join(self.names)}), "
                f"got shape {tuple(values.shape)}"
            )
        self.totals += values.detach().to(self.totals.dtype) * weight
        self.weight += weight

    def compute(self) -> dict[str, Tensor]:
        return dict(zip(self.names, self.totals / self.weight, strict=True))


def logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers write the values logged in the current training step.

    Lightning writes step values when (optimizer steps taken + 1) % ``log_every_n_steps`` == 0,
    or when the run is stopping (``_LoggerConnector.should_update_logs``); where that private
    property is missing, every step logs.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
