"""Out-of-distribution inputs built from (or beside) an in-distribution test set.

- ``noise``: x ~ N(m, s²) elementwise, m and s the mean and standard deviation of the
  in-distribution inputs, clamped to their range [min, max];
- ``rotated``: images rotated by ``angle`` degrees about their centre (exact for multiples of
  90, else bilinear with the background filled by the inputs' minimum);
- ``flipped``: images flipped upside down (``vertical``) or left-right (``horizontal``);
- ``idx``: the test images of another IDX dataset (FashionMNIST, KMNIST, ...) in ``path``,
  normalised by the caller's ``normalize``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.idx import read_idx

__all__ = ["OOD_KINDS", "flipped", "gaussian_noise", "idx_images", "rotated"]

OOD_KINDS = ("none", "noise", "rotated", "flipped", "idx")
IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"


def gaussian_noise(x: Tensor, num_examples: int, seed: int = 0) -> Tensor:
    """Noise shaped like ``x``'s examples, matching its mean and std, clamped to its range."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_examples, *x.shape[1:]), generator=generator, dtype=x.dtype)
    return (x.mean() + x.std() * noise).clamp(x.min(), x.max())


def _check_images(x: Tensor, kind: str) -> None:
    if x.ndim < 3:
        raise ValueError(
            f"ood={kind} needs image inputs (N, [C,] H, W); the test inputs have shape "
            f"{tuple(x.shape)}: use ood=noise or ood=none"
        )


def rotated(x: Tensor, angle: float) -> Tensor:
    """Images (N, [C,] H, W) rotated counter-clockwise by ``angle`` degrees.

    Example:
        >>> rotated(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), 90)
        tensor([[[2., 4.],
                 [1., 3.]]])
    """
    _check_images(x, "rotated")
    if float(angle) % 90 == 0:
        return torch.rot90(x, int(angle) // 90 % 4, dims=(-2, -1))
    images = x.reshape(-1, 1, *x.shape[-2:]) if x.ndim == 3 else x
    background = x.min()
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype)  # as rot90
    grid = F.affine_grid(
        theta.expand(images.shape[0], 2, 3), list(images.shape), align_corners=False
    )
    turned = F.grid_sample(images - background, grid, align_corners=False) + background
    return turned.reshape(x.shape)


def flipped(x: Tensor, axis: str = "vertical") -> Tensor:
    """Images flipped upside down (``vertical``) or left-right (``horizontal``)."""
    _check_images(x, "flipped")
    if axis not in ("vertical", "horizontal"):
        raise ValueError(f"ood.axis must be vertical or horizontal, got {axis!r}")
    return torch.flip(x, dims=(-2,) if axis == "vertical" else (-1,))


def idx_images(path: str | Path, normalize: Callable[[Tensor], Tensor]) -> Tensor:
    """The ``t10k-images-idx3-ubyte[.gz]`` images in ``path`` or ``path/raw``, normalised."""
    root = Path(path)
    for folder in (root, root / "raw"):
        for name in (IDX_TEST_IMAGES, f"{IDX_TEST_IMAGES}.gz"):
            if (folder / name).is_file():
                return normalize(read_idx(folder / name))
    raise FileNotFoundError(
        f"ood.path={str(path)!r}: no {IDX_TEST_IMAGES}[.gz] there or in its raw/ "
        "(point ood.path at a folder with the IDX test images, e.g. FashionMNIST)"
    )
