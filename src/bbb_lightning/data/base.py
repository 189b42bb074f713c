"""The interface shared by every datamodule of the package.

A model needs to know, before training, what kind of data it will see: :class:`BBBDataModule`
exposes the task, the per-example input shape, the number of classes or target dimensions, and
the number of training examples ``N`` (which scales the KL term of the ELBO).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler, TensorDataset

from bbb_lightning.bayes.arguments import is_integer
from bbb_lightning.data.sampler import EpochPermutationSampler, ResumableEpochLoader

__all__ = ["TASKS", "BBBDataModule"]

TASKS = ("classification", "regression")


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an ``int`` (numpy's integers included, bools not), at least ``minimum``."""
    if not (is_integer(value) and value >= minimum):
        raise ValueError(f"dataset {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BBBDataModule(LightningDataModule):
    """Base class: batching, loaders and the attributes a model is built from.

    Subclasses set ``task``, ``input_shape`` and one of ``num_classes`` / ``target_dim``, and
    fill ``train_set``, ``val_set`` and ``test_set`` (at the latest in :meth:`setup`). Batches
    are ``(x, y)``: for classification ``y`` holds ``int64`` class indices, for regression it is
    ``float32`` of shape ``(B, target_dim)``.

    Args:
        batch_size: Examples per batch, for every split.
        num_workers: Loader worker processes (0: load in the main process).
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
        self.batch_size = _check_int("batch_size", batch_size, minimum=1)
        self.num_workers = _check_int("num_workers", num_workers, minimum=0)
        self.seed = _check_int("seed", seed, minimum=0)
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
        """Training batches in the order of :class:`EpochPermutationSampler` (last batch kept).

        The order depends only on (seed, epoch) and, under data parallelism, the process's rank:
        a resumed run sees the same batches as an uninterrupted one, and R processes with batch B
        see the batches of one process with batch R * B. Attached to a trainer, the loader is
        built for the trainer's current epoch (the configs reload it every epoch). Under
        ``trainer.overfit_batches`` it is the set in its own order, so every epoch trains on the
        same first batches (Lightning would otherwise swap in a sequential sampler itself).
        """
        if self.train_set is None:
            raise RuntimeError(f"{type(self).__name__} has no train set yet: call setup() first")
        trainer = self.trainer
        if trainer is not None and trainer.overfit_batches > 0:
            return self._loader(self.train_set, "train", sampler=self._shard(self.train_set))
        sampler = EpochPermutationSampler(
            len(self.train_set),
            seed=self.seed,
            epoch=trainer.current_epoch if trainer is not None else 0,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
        )
        if trainer is None:
            return self._loader(self.train_set, "train", sampler=sampler)
        progress = trainer.fit_loop.epoch_loop.batch_progress
        return ResumableEpochLoader(
            self.train_set,
            sampler,
            batches_done=lambda: progress.current.processed,
            **self._loader_options(),
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order (under data parallelism, rank r of R takes every
        R-th example from the r-th: each example is evaluated once, by one process)."""
        return self._loader(self.val_set, "val", sampler=self._shard(self.val_set))

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order (sharded across processes as the validation set)."""
        return self._loader(self.test_set, "test", sampler=self._shard(self.test_set))

    def _shard(self, dataset: TensorDataset | None) -> range | None:
        trainer = self.trainer
        if dataset is None or trainer is None or trainer.world_size == 1:
            return None
        return range(trainer.global_rank, len(dataset), trainer.world_size)

    def predict_dataloader(self) -> DataLoader:
        """Prediction runs over the test set."""
        return self.test_dataloader()

    def _loader(
        self,
        dataset: TensorDataset | None,
        split: str,
        sampler: Sampler[int] | range | None = None,
    ) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} set yet: call setup() before the loaders"
            )
        return DataLoader(dataset, sampler=sampler, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "drop_last": False,
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
        }
