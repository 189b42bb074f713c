"""Keep freed memory in the process for the next training step (glibc ``malloc``).

A training step allocates and frees the same large tensors every step: gradients (with
``zero_grad(set_to_none=True)``), the optimizer's temporaries, the weight draws. PyTorch has no
caching allocator on the CPU; it calls ``malloc``. glibc serves a block larger than its mmap
threshold with a fresh ``mmap`` and gives it back to the system on ``free``, and trims the top of
the heap once more than twice that threshold is free there (the threshold adapts, between 128
KiB and 32 MiB). Either way, the next step's tensors land on new pages, and the kernel faults
in and zeroes every 4 KiB page on first touch.

On the 2-core benchmark machine, one step of the MNIST MLP 784-400-400-10 took about 1,100 page
faults, deterministic or Bayesian, and the faults cost about as much as the Bayesian part of the
step. :func:`retain_freed_memory` makes ``malloc`` keep what is freed: blocks up to
``max_block_mib`` come from the heap, and the heap is not trimmed. The faults drop to a few per
step; the memory of the largest step stays with the process (as PyTorch's CUDA caching
allocator keeps it on a GPU). ``python -m bbb_lightning.train`` calls it unless
``retain_freed_memory=false``. Elsewhere (not Linux with glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import sys

__all__ = ["retain_freed_memory"]

log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc refuses an mmap threshold above half its heap size: 32 MiB on 64-bit systems.
MAX_BLOCK_MIB = 32
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: trim only beyond 2 GiB free


def retain_freed_memory(max_block_mib: int = MAX_BLOCK_MIB) -> bool:
    """Have glibc ``malloc`` keep freed blocks up to ``max_block_mib`` MiB for reuse.

    Returns whether the setting took effect (False where the C library is not glibc).

    Example:
        >>> import sys
        >>> retain_freed_memory() == sys.platform.startswith("linux")  # doctest: +SKIP
        True
    """
    if not 0 < max_block_mib <= MAX_BLOCK_MIB:
        raise ValueError(f"max_block_mib must be in 1..{MAX_BLOCK_MIB}, got {max_block_mib!r}")
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their own malloc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = bool(mallopt(_M_MMAP_THRESHOLD, max_block_mib << 20)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    )
    log.debug("malloc keeps freed blocks up to %d MiB: %s", max_block_mib, applied)
    return applied
