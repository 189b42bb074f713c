"""Fixtures shared by the tests of ``bbb_lightning.bayes``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Run each test on one intra-op thread, then restore the setting.

    These tests run many tiny ops (layers of a few units, grouped convolutions with thousands
    of groups). With two threads on a busy 2-core machine, torch's parallel regions wait on
    each other and the same test runs 10 to 100 times slower; one thread is fast and steady.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


_WORD = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 of one counter (Salmon et al. 2011), in plain Python integers."""
    x0, x1, x2, x3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * x0, 0xCD9E8D57 * x2
        x0, x1, x2, x3 = ((p1 >> 32) ^ x1 ^ k0) & _WORD, p1 & _WORD, ((p0 >> 32) ^ x3 ^ k1), p0
        x2, x3 = x2 & _WORD, x3 & _WORD
        k0, k1 = (k0 + 0x9E3779B9) & _WORD, (k1 + 0xBB67AE85) & _WORD
    return [x0, x1, x2, x3]


def reference_signs(seed: int, lanes: int, blocks: int) -> torch.Tensor:
    """What ``random_signs_`` documents for a build of ``lanes`` lanes: in block b, lane l runs
    Philox on the counter (b lanes + l, 0, 0, 1) with the key (seed's low word, high word); the
    block's words, word-major (word w of lane l is word w lanes + l), give 32 signs each, bit j
    of a word being sign 32 i + j (+1 where the bit is set)."""
    key = (seed & _WORD, seed >> 32)
    signs = []
    for block in range(blocks):
        words = [philox4x32_10((block * lanes + lane, 0, 0, 1), key) for lane in range(lanes)]
        for w in range(4):
            for lane in range(lanes):
                signs += [1.0 if words[lane][w] >> j & 1 else -1.0 for j in range(32)]
    return torch.tensor(signs)


@pytest.fixture
def philox_signs() -> Callable[[int, int, int], torch.Tensor]:
    """:func:`reference_signs`, for the tests of the native builds' generator."""
    return reference_signs


@pytest.fixture
def philox() -> Callable[[tuple[int, int, int, int], tuple[int, int]], list[int]]:
    """:func:`philox4x32_10`, the reference of the native builds' generator."""
    return philox4x32_10
