"""Out-of-distribution inputs built from (or beside) an in-distribution test set.

- ``noise``: x ~ N(m, s²) elementwise, m and s the mean and standard deviation of the
  in-distribution inputs, clamped to their range [min, max];
- ``rotated``: images rotated by ``angle`` degrees about their centre (exact for multiples of
  90, else bilinear with the background filled by the inputs' minimum);
- ``flipped``: images flipped upside down (``vertical``) or left-right (``horizontal``);
- ``idx``: the test images of another IDX dataset (FashionMNIST, KMNIST, ...) in ``path``
  (:func:`bbb_lightning.data.ood_sets.idx_test_images`), normalised as the run's MNIST images;
- ``cifar``: the test images of CIFAR-100 (or CIFAR-10) in ``path``
  (:func:`bbb_lightning.data.ood_sets.cifar_test_images`), normalised by the CIFAR run's
  per-channel training moments.

Every set has a name (``ood.name``, else its kind) under which its metrics are reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.cifar import CIFARDataModule
from ..data.mnist import NORMALIZATIONS
from ..data.ood_sets import cifar_test_images, idx_test_images
from ..data.pickle_batches import CIFAR_SETS

__all__ = ["OOD_KINDS", "flipped", "gaussian_noise", "ood_inputs", "rotated", "set_name"]

OOD_KINDS = ("none", "noise", "rotated", "flipped", "idx", "cifar")


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


def set_name(ood: Mapping[str, Any]) -> str:
    """The OOD set's name in the metric keys, ``ood/<name>/...``: ``ood.name``, else its kind."""
    return str(ood.get("name") or ood["kind"])


def _idx_inputs(ood: Mapping[str, Any], datamodule: Any, shape: tuple[int, ...]) -> Tensor:
    """IDX test images, normalised as the run's MNIST-like images: (pixels - offset) / scale."""
    normalization = getattr(datamodule, "normalization", None)
    if normalization not in NORMALIZATIONS:
        cifar = "ood=cifar100, " if isinstance(datamodule, CIFARDataModule) else ""
        raise ValueError(
            f"ood.kind=idx (ood={set_name(ood)} and other IDX image sets) needs an MNIST-like "
            f"image dataset with a pixel normalization; this run's dataset is "
            f"{type(datamodule).__name__}: use {cifar}ood=noise or ood=none"
        )
    images = idx_test_images(ood["path"], set_name(ood), bool(ood.get("download", False)))
    if images[0].numel() != math.prod(shape):
        raise ValueError(
            f"ood={set_name(ood)}: its images in {ood['path']} have shape "
            f"{tuple(images.shape[1:])}, which does not fit the model's input shape {shape}"
        )
    offset, scale = NORMALIZATIONS[normalization]
    return ((images.float() - offset) / scale).reshape(-1, *shape)


def _cifar_inputs(ood: Mapping[str, Any], datamodule: Any) -> Tensor:
    """CIFAR test images, normalised by the run's per-channel training moments."""
    name = set_name(ood)
    if not isinstance(datamodule, CIFARDataModule):
        shape = tuple(getattr(datamodule, "input_shape", ()) or ())
        raise ValueError(
            f"ood={name} needs a CIFAR run (3 x 32 x 32 colour images); this run's dataset is "
            f"{type(datamodule).__name__} with inputs {shape}: use ood=fashion_mnist (MNIST), "
            "ood=noise or ood=none"
        )
    if name == datamodule.name:
        other = next(key for key in CIFAR_SETS if key != name)
        raise ValueError(
            f"ood.name={name} is this run's own dataset, not out of its distribution: use "
            f"ood.name={other} (ood.path at a copy of it)"
        )
    return datamodule.normalize(cifar_test_images(ood["path"], name, bool(ood["download"])))


def ood_inputs(
    ood: Mapping[str, Any], x: Tensor, datamodule: Any, input_shape: Sequence[int], seed: int
) -> Tensor:
    """The OOD inputs of config ``ood`` (``kind`` in :data:`OOD_KINDS` but ``none``) beside the
    in-distribution test inputs ``x`` of ``datamodule``: at most ``ood.num_examples`` (null:
    ``len(x)``).

    Raises:
        ValueError, FileNotFoundError: the set does not fit the run, or is not there (one line).
    """
    kind = ood["kind"]
    limit = ood.get("num_examples")
    limit = len(x) if limit is None else int(limit)
    if kind == "noise":
        return gaussian_noise(x, limit, seed=seed)
    if kind == "rotated":
        return rotated(x[:limit], ood["angle"])
    if kind == "flipped":
        return flipped(x[:limit], ood["axis"])
    if kind == "idx":
        return _idx_inputs(ood, datamodule, tuple(input_shape))[:limit]
    if kind == "cifar":
        return _cifar_inputs(ood, datamodule)[:limit]
    raise ValueError(f"ood.kind={kind!r} is not allowed: one of {list(OOD_KINDS)}")
