"""The training order as a pure function of (seed, epoch), sharded across processes.

Resuming a run, or splitting it over R processes, must not change which examples form each
optimizer step. With this sampler, epoch e visits ``randperm(N, seed + e)``; under data
parallelism rank r takes every R-th index of that permutation (padded by wrapping around so
that every rank has the same number of batches, as ``DistributedSampler`` does), so the union of
the R per-rank batches of step t is the single-process batch of step t with batch size R * B.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochPermutationSampler", "ResumableEpochLoader"]


class EpochPermutationSampler(Sampler[int]):
    """Shuffled indices of epoch ``epoch`` for ``rank`` of ``world_size`` processes.

    Example:
        >>> a = list(EpochPermutationSampler(6, seed=0, epoch=3))
        >>> a == list(EpochPermutationSampler(6, seed=0, epoch=3)) and sorted(a) == list(range(6))
        True
        >>> shards = [list(EpochPermutationSampler(6, 0, 3, rank=r, world_size=2)) for r in (0, 1)]
        >>> sorted(shards[0] + shards[1]) == list(range(6))
        True
    """

    def __init__(
        self, num_examples: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_examples = num_examples
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.skip = 0  # indices of this shard already trained on (a run resumed mid-epoch)

    def __len__(self) -> int:
        """ceil(N / R): the whole epoch's shard, also when resuming skips part of it (the loop
        counts a resumed epoch's batches from where the checkpoint left off)."""
        return -(-self.num_examples // self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        padding = len(self) * self.world_size - self.num_examples
        if padding:
            order = torch.cat([order, order[:padding]])
        return iter(order[self.rank :: self.world_size][self.skip :].tolist())


class ResumableEpochLoader(DataLoader):
    """The training loader of one epoch, which a checkpoint taken mid-epoch can resume.

    Lightning stores :meth:`state_dict` in its checkpoints and, resuming, hands it back to
    :meth:`load_state_dict` before it iterates; it does not fast-forward a map-style loader
    itself. The loader then skips the minibatches of that epoch already trained on, so a run
    resumed mid-epoch sees the batches of an uninterrupted one.

    Args:
        dataset: The training set.
        sampler: This epoch's order.
        batches_done: Minibatches of the current epoch trained so far (read when a checkpoint
            is saved).
        **kwargs: Passed on to :class:`~torch.utils.data.DataLoader`.
    """

    sampler: EpochPermutationSampler

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochPermutationSampler,
        batches_done: Callable[[], int],
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self.batches_done())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("epoch") == self.sampler.epoch:
            assert self.batch_size is not None
            self.sampler.skip = int(state["batches_done"]) * self.batch_size
