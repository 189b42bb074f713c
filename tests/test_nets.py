"""Shapes and argument checks of the deterministic architectures."""

from __future__ import annotations

import pytest
import torch

from bbb_lightning.nets import CNN, MLP


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "gelu", "silu"])
def test_mlp_output_shape(activation: str) -> None:
    net = MLP((1, 28, 28), num_outputs=10, hidden=(32, 16), activation=activation)
    assert net(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_accepts_list_shape_and_no_hidden_layer() -> None:
    net = MLP([3], num_outputs=1, hidden=[])
    assert net(torch.randn(4, 3)).shape == (4, 1)
    assert sum(isinstance(m, torch.nn.Linear) for m in net.modules()) == 1


def test_mlp_rejects_unknown_activation() -> None:
    with pytest.raises(ValueError, match=r"'sigmoidish'.*relu, leaky_relu, tanh, gelu, silu"):
        MLP((4,), num_outputs=2, activation="sigmoidish")


@pytest.mark.parametrize(
    ("input_shape", "channels"), [([1, 28, 28], (8, 16)), ((3, 32, 32), (4,)), ((1, 7, 9), (2, 2))]
)
def test_cnn_output_shape(input_shape: tuple[int, ...], channels: tuple[int, ...]) -> None:
    net = CNN(input_shape, num_outputs=7, channels=channels, hidden=12)
    assert net(torch.randn(2, *input_shape)).shape == (2, 7)


def test_cnn_rejects_bad_input_shape() -> None:
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        CNN((28, 28), num_outputs=10)
    with pytest.raises(ValueError, match="too small"):
        CNN((1, 2, 2), num_outputs=10, channels=(4, 4))
