"""The training order as a pure function of (seed, epoch), sharded across processes.

Resuming a run, or splitting it over R processes, must not change which examples form each
optimizer step. With this sampler, epoch e visits ``randperm(N, seed + e)``; under data
parallelism rank r takes every R-th index of that permutation (padded by wrapping around so
that every rank has the same number of batches, as ``DistributedSampler`` does), so the union of
the R per-rank batches of step t is the single-process batch of step t with batch size R * B.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

__all__ = ["EpochPermutationSampler"]


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

    def __len__(self) -> int:
        return -(-self.num_examples // self.world_size)  # ceil(N / R)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        padding = len(self) * self.world_size - self.num_examples
        if padding:
            order = torch.cat([order, order[:padding]])
        return iter(order[self.rank :: self.world_size].tolist())
