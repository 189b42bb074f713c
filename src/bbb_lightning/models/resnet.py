"""The CIFAR ResNets of He et al. (2016, section 4.2): ResNet-20, -32, -44, -56, -110.

Shortcuts are option A of the paper, parameter-free: the identity, and where a stage halves
the feature map and widens it, every second pixel with the new channels zero (appended after
the old ones). Other implementations pad half the new channels on each side or use a 1 x 1
projection (option B); the parameter count, 269,722 for ResNet-20 on CIFAR-10, is that of
option A.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch.nn.functional as F
from torch import Tensor, nn

from ..bayes.arguments import positive_integer
from .nets import layer_sizes

__all__ = ["CIFARResNet"]


class _ZeroPadShortcut(nn.Module):
    """He et al.'s option A shortcut: every ``stride``-th pixel, new channels zero (no
    parameters)."""

    def __init__(self, stride: int, extra_channels: int) -> None:
        super().__init__()
        self.stride, self.extra_channels = stride, extra_channels

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels)) if self.extra_channels else x


class _BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, 3 x 3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _ZeroPadShortcut(stride, out_channels - in_channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CIFARResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): ResNet-20 at ``depth=20``.

    A 3 x 3 convolution to ``widths[0]`` channels, then three stages of n = (depth - 2) / 6
    basic blocks of ``widths[0]``, ``widths[1]``, ``widths[2]`` channels (the first block of
    stages 2 and 3 halves the feature map with stride 2), each convolution followed by batch
    norm; identity shortcuts, option A where the shape changes (subsample by 2, zero-pad the new
    channels); global average pooling and one linear layer. Convolutions have no bias (batch
    norm's shift replaces it); weights start at He et al.'s normal initialisation.

    Args:
        input_shape: Per-example input shape ``(C, H, W)``.
        num_outputs: Size of the final layer.
        depth: 6n + 2: 20, 32, 44, 56, 110 in the paper.
        widths: Channels of the three stages.

    Example:
        >>> import torch
        >>> net = CIFARResNet([3, 32, 32], num_outputs=10)
        >>> net(torch.zeros(2, 3, 32, 32)).shape, sum(p.numel() for p in net.parameters())
        (torch.Size([2, 10]), 269722)
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        shape = layer_sizes("input_shape", input_shape)
        if len(shape) != 3:
            raise ValueError(f"CIFARResNet input_shape must be (C, H, W), got {tuple(shape)}")
        num_outputs = positive_integer("num_outputs", num_outputs)
        depth = positive_integer("depth", depth)
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFARResNet depth must be 6n + 2 >= 8 (20, 32, 44, ...), got {depth}"
            )
        widths = layer_sizes("widths", widths)
        if len(widths) != 3:
            raise ValueError(f"CIFARResNet widths must be three channel counts, got {widths}")
        if any(later < earlier for earlier, later in pairwise(widths)):
            raise ValueError(
                f"CIFARResNet widths must not decrease (zero-padded shortcuts), got {widths}"
            )
        self.conv = nn.Conv2d(shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks_per_stage = (depth - 2) // 6
        stages, channels = [], widths[0]
        for stage, width in enumerate(widths):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(_BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_outputs)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, H, W)`` to outputs ``(B, num_outputs)``."""
        features = self.stages(F.relu(self.bn(self.conv(x))))
        return self.fc(features.mean(dim=(-2, -1)))
