"""retain_freed_memory: memory freed by a tensor stays in the process for the next one.

Each case runs in a fresh interpreter (malloc settings are per process). It allocates and
touches a 16 MiB tensor, frees it, and reads the resident set size: under glibc's own policy
the block was mmapped (it is above the initial 128 KiB threshold) and goes back to the system
on free, so the next step would fault its pages in again; retained, it stays resident.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from bbb_lightning.training.allocator import MAX_BLOCK_MIB, retain_freed_memory

glibc_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's",
)

FREE_ONE_TENSOR = """
import os, sys, torch
from bbb_lightning.training.allocator import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "retain" else False
def resident_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
tensor = torch.empty(4 << 20).fill_(1.0)  # 16 MiB, touched
before = resident_mib()
del tensor
print(applied, before - resident_mib())
"""


def resident_mib_released(mode: str) -> tuple[bool, float]:
    result = subprocess.run(
        [sys.executable, "-c", FREE_ONE_TENSOR, mode], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    applied, released = result.stdout.split()
    return applied == "True", float(released)


@glibc_linux
def test_a_freed_tensor_stays_resident_for_the_next_step() -> None:
    applied, released = resident_mib_released("retain")
    assert applied
    assert released < 1.0
    assert resident_mib_released("default") == (False, pytest.approx(16.0, abs=1.0))


def test_the_block_size_is_checked() -> None:
    for bad in (0, MAX_BLOCK_MIB + 1):
        with pytest.raises(ValueError, match=f"max_block_mib must be in 1..{MAX_BLOCK_MIB}"):
            retain_freed_memory(bad)
