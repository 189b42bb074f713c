"""A reader for the IDX format of the MNIST files.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype> <ndim>``, then ``ndim`` big-endian
``uint32`` dimension sizes, then the data in row-major order. Only unsigned bytes (dtype
``0x08``), the type of every MNIST file, are supported.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["read_idx"]

_UBYTE = 0x08
_MAX_DIMENSIONS = 8  # a damaged header byte could otherwise ask for a shape of 255 sizes


def read_idx(path: str | Path) -> Tensor:
    """Read an IDX file of unsigned bytes, gzip-compressed if its name ends in ``.gz``.

    Returns:
        A ``uint8`` tensor with the shape stored in the header.

    Raises:
        ValueError: The file is corrupt, truncated, or not an unsigned-byte IDX file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"corrupt gzip file {path}: {err}") from None
    if len(raw) < 4:
        raise ValueError(f"corrupt IDX file {path}: {len(raw)} bytes, shorter than the header")
    zeros, dtype, ndim = struct.unpack_from(">HBB", raw)
    if zeros != 0 or dtype != _UBYTE:
        raise ValueError(
            f"corrupt IDX file {path}: magic number {raw[:4].hex()}, expected 0000{_UBYTE:02x}xx"
        )
    if not 1 <= ndim <= _MAX_DIMENSIONS:
        raise ValueError(
            f"corrupt IDX file {path}: its header says {ndim} dimensions, expected 1 to "
            f"{_MAX_DIMENSIONS} (MNIST's files have 1 or 3)"
        )
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(f"corrupt IDX file {path}: truncated header for {ndim} dimensions")
    shape = struct.unpack_from(f">{ndim}I", raw, 4)
    expected = offset + math.prod(shape)
    if len(raw) != expected:
        raise ValueError(
            f"corrupt IDX file {path}: {len(raw)} bytes, expected {expected} for shape {shape}"
        )
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)
    return torch.from_numpy(data.copy())
