"""Shapes and argument checks of the deterministic architectures."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bbb_lightning.models.nets import CNN, MLP


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


@pytest.mark.parametrize(
    ("hidden", "shown"),
    [
        (8, "8"),
        ([0], "[0]"),
        ([-1], "[-1]"),
        ((16, 0), "(16, 0)"),
        ("abc", "'abc'"),
        ([8.0], "[8.0]"),
        ([True], "[True]"),  # a bool is not a width
        ({"a": 1}, "{'a': 1}"),
        (None, "None"),
    ],
)
def test_mlp_rejects_bad_hidden_widths(hidden: object, shown: str) -> None:
    """A width < 1 failed only inside training (a tensor of 0 elements); a non-list gave a
    message that did not say what is allowed."""
    message = f"^hidden must be a list of integers >= 1, got {re.escape(shown)}$"
    with pytest.raises(ValueError, match=message):
        MLP((4,), num_outputs=2, hidden=hidden)


def test_mlp_rejects_bad_sizes() -> None:
    with pytest.raises(
        ValueError, match=r"^input_shape must be a list of integers >= 1, got \[0\]$"
    ):
        MLP([0], num_outputs=2)
    with pytest.raises(ValueError, match=r"^num_outputs must be an integer >= 1, got 0$"):
        MLP([4], num_outputs=0)
    with pytest.raises(ValueError, match=r"^num_outputs must be an integer >= 1, got True$"):
        MLP([4], num_outputs=True)


def test_nets_accept_numpy_integers_and_omegaconf_lists() -> None:
    """What the datamodules and Hydra pass: numpy integers, ListConfig, torch.Size."""
    hidden = OmegaConf.create({"hidden": [8, 4]}).hidden
    net = MLP(torch.Size([1, 2, 2]), num_outputs=np.int64(3), hidden=hidden)
    assert net(torch.randn(5, 1, 2, 2)).shape == (5, 3)
    net = MLP([4], num_outputs=3, hidden=[np.int64(8)])
    assert net(torch.randn(5, 4)).shape == (5, 3)
    channels = OmegaConf.create({"channels": [2]}).channels
    cnn = CNN(np.array([1, 4, 4]), num_outputs=2, channels=channels, hidden=np.int64(3))
    assert cnn(torch.randn(5, 1, 4, 4)).shape == (5, 2)


def test_cnn_accepts_no_convolutional_block() -> None:
    net = CNN((1, 3, 3), num_outputs=2, channels=[], hidden=4)
    assert net(torch.randn(5, 1, 3, 3)).shape == (5, 2)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"channels": [0]}, "channels must be a list of integers >= 1, got [0]"),
        ({"channels": 8}, "channels must be a list of integers >= 1, got 8"),
        ({"channels": [4, -2]}, "channels must be a list of integers >= 1, got [4, -2]"),
        ({"channels": [True]}, "channels must be a list of integers >= 1, got [True]"),
        ({"hidden": 0}, "hidden must be an integer >= 1, got 0"),
        ({"hidden": [8]}, "hidden must be an integer >= 1, got [8]"),
        ({"hidden": 8.0}, "hidden must be an integer >= 1, got 8.0"),
        ({"hidden": False}, "hidden must be an integer >= 1, got False"),
        ({"num_outputs": -1}, "num_outputs must be an integer >= 1, got -1"),
        (
            {"input_shape": (1, 0, 28)},
            "input_shape must be a list of integers >= 1, got (1, 0, 28)",
        ),
        ({"input_shape": "abc"}, "input_shape must be a list of integers >= 1, got 'abc'"),
    ],
)
def test_cnn_rejects_bad_sizes(arguments: dict, message: str) -> None:
    arguments = {"input_shape": (1, 28, 28), "num_outputs": 10, **arguments}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CNN(**arguments)
