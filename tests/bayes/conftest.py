"""Fixtures shared by the tests of ``bbb_lightning.bayes``."""

from __future__ import annotations

from collections.abc import Iterator

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
