"""Plain deterministic architectures.

Nothing here is Bayesian: these are ordinary ``nn.Module`` networks that the Bayes-by-Backprop
machinery turns into Bayesian networks by replacing their parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence, Set
from itertools import pairwise
from typing import Any

from torch import Tensor, nn

from ..bayes.arguments import is_integer, positive_integer

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        allowed = ", ".join(ACTIVATIONS)
        raise ValueError(f"unknown activation {name!r}; allowed: {allowed}") from None


def layer_sizes(name: str, value: Any) -> list[int]:
    """``value`` as a list of ``int`` (numpy's integers included, bools not), each at least 1.

    Any ordered collection passes (a list, a tuple, an omegaconf ``ListConfig``, a
    ``torch.Size``); an empty one is returned as ``[]`` (its meaning is the caller's). A size of
    0 or less would build a layer with no units, which fails only inside training, or not at all.
    """
    ordered = isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping, Set))
    items = tuple(value) if ordered else ()
    if not ordered or not all(is_integer(item) and item >= 1 for item in items):
        raise ValueError(f"{name} must be a list of integers >= 1, got {value!r}")
    return [int(item) for item in items]


class MLP(nn.Module):
    """Fully connected network on the flattened input.

    Args:
        input_shape: Per-example input shape (no batch dimension); flattened to its product.
        num_outputs: Size of the final layer (classes or regression targets).
        hidden: Width of each hidden layer; empty for a linear model.
        activation: Non-linearity between layers, one of ``relu``, ``leaky_relu``, ``tanh``,
            ``gelu``, ``silu``.

    Raises:
        ValueError: ``input_shape`` or ``hidden`` is not a list of integers >= 1 (``hidden`` may
            be empty), or ``num_outputs`` is not an integer >= 1 (bools are not integers here).

    Example:
        >>> import torch
        >>> net = MLP([1, 28, 28], num_outputs=10, hidden=(400, 400))
        >>> net(torch.zeros(8, 1, 28, 28)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        hidden: Sequence[int] = (400, 400),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        input_shape = layer_sizes("input_shape", input_shape)
        num_outputs = positive_integer("num_outputs", num_outputs)
        hidden = layer_sizes("hidden", hidden)
        widths = [math.prod(input_shape), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for width_in, width_out in pairwise(widths):
            layers += [nn.Linear(width_in, width_out), make_activation(activation)]
        layers.append(nn.Linear(widths[-1], num_outputs))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, *input_shape)`` to outputs ``(B, num_outputs)``."""
        return self.layers(x)


class CNN(nn.Module):
    """LeNet-style convolutional network.

    Each entry of ``channels`` adds ``Conv2d(kernel_size=5, padding=2) -> ReLU -> MaxPool2d(2)``;
    the feature map is then flattened and passed through ``Linear(hidden) -> ReLU ->
    Linear(num_outputs)``.

    Args:
        input_shape: Per-example input shape ``(C, H, W)``.
        num_outputs: Size of the final layer.
        channels: Output channels of each convolutional block; empty for none.
        hidden: Width of the fully connected hidden layer.

    Raises:
        ValueError: ``input_shape`` is not three integers >= 1 or is too small for the pooling
            blocks, ``channels`` is not a list of integers >= 1, or ``num_outputs`` or ``hidden``
            is not an integer >= 1 (bools are not integers here).

    Example:
        >>> import torch
        >>> net = CNN([1, 28, 28], num_outputs=10)
        >>> net(torch.zeros(8, 1, 28, 28)).shape
        torch.Size([8, 10])
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_outputs: int,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        shape = layer_sizes("input_shape", input_shape)
        if len(shape) != 3:
            raise ValueError(f"CNN input_shape must be (C, H, W), got {tuple(shape)}")
        num_outputs = positive_integer("num_outputs", num_outputs)
        channels = layer_sizes("channels", channels)
        hidden = positive_integer("hidden", hidden)
        in_channels, height, width = shape
        blocks: list[nn.Module] = []
        for out_channels in channels:
            blocks += [
                nn.Conv2d(in_channels, out_channels, kernel_size=5, padding=2),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            in_channels, height, width = out_channels, height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"input_shape {tuple(shape)} is too small for {len(channels)} pooling blocks"
            )
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * height * width, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Map a batch ``(B, C, H, W)`` to outputs ``(B, num_outputs)``."""
        return self.classifier(self.features(x))
