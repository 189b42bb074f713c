"""The interface shared by every datamodule of the package.

A model needs to know, before training, what kind of data it will see: :class:`BBBDataModule`
exposes the task, the per-example input shape, the number of classes or target dimensions, and
the number of training examples ``N`` (which scales the KL term of the ELBO).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["TASKS", "BBBDataModule"]

TASKS = ("classification", "regression")


class BBBDataModule(LightningDataModule):
    """Base class: batching, loaders and the attributes a model is built from.

    Subclasses set ``task``, ``input_shape`` and one of ``num_classes`` / ``target_dim``, and
    fill ``train_set``, ``val_set`` and ``test_set`` (at the latest in :meth:`setup`). Batches
    are ``(x, y)``: for classification ``y`` holds ``int64`` class indices, for regression it is
    ``float32`` of shape ``(B, target_dim)``.

    Args:
        batch_size: Examples per batch, for every split.
        num_workers: Loader worker processes; workers persist across epochs when ``> 0``.
        seed: Seed for the data splits (and for synthetic data).
        pin_memory: Pin batches in page-locked memory (useful for GPU training).
    """

    task: str
    input_shape: tuple[int, ...]
    num_classes: int | None = None
    target_dim: int | None = None

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def num_train(self) -> int:
        """Number of training examples ``N``."""
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__}.num_train is known after setup('fit')")
        return len(self.train_set)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (the last, smaller batch is kept)."""
        return self._loader(self.train_set, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.val_set, "val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.test_set, "test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Prediction runs over the test set."""
        return self.test_dataloader()

    def _loader(self, dataset: TensorDataset | None, split: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} set yet: call setup() before the loaders"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )
