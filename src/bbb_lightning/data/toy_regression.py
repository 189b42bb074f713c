"""The one-dimensional toy regression problem of Blundell et al. (2015), Section 5.2.

Training inputs cover a narrow interval; validation and test inputs cover a wider one, so a
plot of the predictive distribution over :meth:`ToyRegressionDataModule.plot_grid` shows how
the uncertainty grows away from the data.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from bbb_lightning.data.base import BBBDataModule, _check_int

__all__ = ["ToyRegressionDataModule", "blundell_curve"]


def blundell_curve(x: Tensor, eps: Tensor | float = 0.0) -> Tensor:
    """The regression curve of Blundell et al. (2015), Section 5.2.

    ``y = x + 0.3 sin(2π(x + ε)) + 0.3 sin(4π(x + ε)) + ε``; with ``eps = 0`` it is the
    noise-free regression function.

    Example:
        >>> blundell_curve(torch.tensor([0.0, 0.25]))
        tensor([0.0000, 0.5500])
    """
    shifted = x + eps
    return x + 0.3 * torch.sin(2 * math.pi * shifted) + 0.3 * torch.sin(4 * math.pi * shifted) + eps


def _check_range(name: str, value: Sequence[float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):  # not two numbers
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"dataset {name} must be [low, high], two finite numbers with low < high, got {value!r}"
        )
    return low, high


class ToyRegressionDataModule(BBBDataModule):
    """Noisy samples of :func:`blundell_curve`, generated in memory from ``seed``.

    ``ε ~ N(0, noise_std²)``. Blundell et al. write ``ε ~ N(0, 0.02)``; we read 0.02 as the
    standard deviation (the default ``noise_std``), which gives the thin band of their figure.

    Each split is drawn from its own generator, derived from ``seed``, so changing the size of
    one split leaves the others unchanged.

    Args:
        num_train: Training examples, ``x`` uniform in ``train_range``.
        num_val: Validation examples, ``x`` uniform in ``eval_range``.
        num_test: Test examples, ``x`` uniform in ``eval_range``.
        noise_std: Standard deviation of ``ε``.
        train_range: ``(low, high)`` of the training inputs.
        eval_range: ``(low, high)`` of the validation and test inputs, and of :meth:`plot_grid`.
        batch_size, num_workers, seed, pin_memory: See :class:`BBBDataModule`.

    Attributes:
        train_x, train_y: The training inputs ``(num_train, 1)`` and targets ``(num_train, 1)``.

    Example:
        >>> dm = ToyRegressionDataModule(num_train=32, batch_size=8)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> x.shape, y.shape, dm.num_train
        (torch.Size([8, 1]), torch.Size([8, 1]), 32)
    """

    task = "regression"
    input_shape = (1,)
    target_dim = 1

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 256,
        num_test: int = 256,
        noise_std: float = 0.02,
        train_range: Sequence[float] = (0.0, 0.5),
        eval_range: Sequence[float] = (-0.2, 1.2),
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, pin_memory)
        for name, count in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            _check_int(name, count, minimum=1)
        if not (isinstance(noise_std, int | float) and noise_std >= 0):
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.noise_std = float(noise_std)
        self.train_range = _check_range("train_range", train_range)
        self.eval_range = _check_range("eval_range", eval_range)

        split_seeds = torch.randint(
            2**62, (3,), generator=torch.Generator().manual_seed(self.seed)
        ).tolist()
        self.train_x, self.train_y = self._sample(num_train, self.train_range, split_seeds[0])
        self.train_set = TensorDataset(self.train_x, self.train_y)
        self.val_set = TensorDataset(*self._sample(num_val, self.eval_range, split_seeds[1]))
        self.test_set = TensorDataset(*self._sample(num_test, self.eval_range, split_seeds[2]))

    def _sample(self, n: int, bounds: tuple[float, float], seed: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(seed)
        low, high = bounds
        x = low + (high - low) * torch.rand(n, 1, generator=generator)
        eps = self.noise_std * torch.randn(n, 1, generator=generator)
        return x, blundell_curve(x, eps)

    def plot_grid(self, num_points: int = 200) -> Tensor:
        """Evenly spaced inputs ``(num_points, 1)`` spanning ``eval_range``, for figures."""
        return torch.linspace(*self.eval_range, num_points).unsqueeze(1)
