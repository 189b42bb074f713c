"""The CIFAR ResNet: He et al.'s architecture, its shortcuts, and model=resnet20 through
bayesianize with batch norm in or out of the posterior."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bbb_lightning.bayes import named_posteriors
from bbb_lightning.cli.errors import UserError
from bbb_lightning.data import CIFARDataModule
from bbb_lightning.models.resnet import CIFARResNet
from bbb_lightning.train import build_model
from bbb_testing import compose_config, write_cifar_batches


def test_resnet20_is_he_et_al_s_network() -> None:
    net = CIFARResNet([3, 32, 32], num_outputs=10)
    convolutions = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(convolutions) + len(linears) == 20  # the 20 weighted layers of its name
    assert len(norms) == len(convolutions) == 19 and len(linears) == 1
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convolutions)
    assert [c.out_channels for c in convolutions] == [16] * 7 + [32] * 6 + [64] * 6
    assert [c.stride[0] for c in convolutions].count(2) == 2  # the first block of stages 2, 3
    assert sum(p.numel() for p in net.parameters()) == 269_722  # "0.27M" in the paper's table 6
    features = []
    net.stages.register_forward_hook(lambda module, inputs, output: features.append(output))
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert features[0].shape == (2, 64, 8, 8)
    assert sum(p.numel() for p in CIFARResNet([3, 32, 32], 10, depth=32).parameters()) == 464_154


def test_a_widening_shortcut_subsamples_and_zero_pads() -> None:
    block = CIFARResNet([3, 32, 32], num_outputs=10).stages[1][0]
    x = torch.randn(2, 16, 8, 8)
    shortcut = block.shortcut(x)
    assert shortcut.shape == (2, 32, 4, 4)
    assert torch.equal(shortcut[:, :16], x[:, :, ::2, ::2])
    assert not shortcut[:, 16:].any()
    identity = CIFARResNet([3, 32, 32], num_outputs=10).stages[0][1].shortcut
    assert identity(x).data_ptr() == x.data_ptr() and list(identity.parameters()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"depth": 21}, r"depth must be 6n \+ 2 >= 8 \(20, 32, 44, ...\), got 21"),
        ({"widths": [16, 32]}, "three channel counts"),
        ({"widths": [32, 16, 64]}, "must not decrease"),
        ({"input_shape": [32, 32]}, r"must be \(C, H, W\)"),
    ],
)
def test_bad_arguments_are_named(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CIFARResNet(**{"input_shape": [3, 32, 32], "num_outputs": 10, **arguments})


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> CIFARDataModule:
    root = write_cifar_batches(tmp_path_factory.mktemp("cifar"), per_batch=4)
    dm = CIFARDataModule("cifar10", root, val_size=4, download=False)
    dm.setup()
    return dm


@pytest.mark.parametrize("bayesian_batchnorm", [False, True])
def test_model_resnet20_is_bayesian_with_or_without_batch_norm(
    tmp_path, cifar, bayesian_batchnorm: bool
) -> None:
    switch = f"model.bayesian_batchnorm={str(bayesian_batchnorm).lower()}"
    cfg = compose_config(tmp_path, "dataset=cifar10", "model=resnet20", switch)
    model = build_model(cfg, cifar)
    names = [name for name, _ in named_posteriors(model.net)]
    net = CIFARResNet([3, 32, 32], num_outputs=10)
    weights = [n for n, p in net.named_parameters() if p.ndim > 1]  # convolutions and fc
    norms = [
        f"{prefix}.{name}"
        for prefix, module in net.named_modules()
        if isinstance(module, nn.BatchNorm2d)
        for name in ("weight", "bias")
    ]
    assert set(weights) <= set(names) and "fc.bias" in names
    assert set(norms) & set(names) == (set(norms) if bayesian_batchnorm else set())
    assert len(names) == len(weights) + 1 + (len(norms) if bayesian_batchnorm else 0)
    outputs = model(cifar.test_set.tensors[0][:3], 2)
    assert outputs.shape == (2, 3, 10) and not torch.equal(outputs[0], outputs[1])


def test_a_bad_batch_norm_switch_is_named(tmp_path, cifar) -> None:
    cfg = compose_config(
        tmp_path, "dataset=cifar10", "model=resnet20", "model.bayesian_batchnorm=2"
    )
    with pytest.raises(
        UserError, match=r"model\.bayesian_batchnorm=2 is not allowed: true or false"
    ):
        build_model(cfg, cifar)
