"""Out-of-distribution sets from files: FashionMNIST (IDX) and CIFAR-100 (pickle batches) in
every layout, the md5-checked download, and the one-line errors when a set does not fit the
run; all on small files written in the exact formats of the originals."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from bbb_lightning.data import CIFARDataModule, MNISTDataModule, ood_sets
from bbb_lightning.evaluation.ood import ood_inputs
from bbb_testing import write_cifar_batches

IMAGES = "t10k-images-idx3-ubyte"


def _idx_bytes(images: torch.Tensor) -> bytes:
    """Unsigned bytes in IDX: magic 0x0000 08 <ndim>, the big-endian sizes, the pixels."""
    sizes = b"".join(int(size).to_bytes(4, "big") for size in images.shape)
    return bytes([0, 0, 8, images.ndim]) + sizes + images.to(torch.uint8).numpy().tobytes()


def _images(count: int = 6, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("folder", ["", "raw", "FashionMNIST", "FashionMNIST/raw"])
@pytest.mark.parametrize("compressed", [False, True])
def test_fashion_mnist_is_found_in_every_layout(tmp_path, folder, compressed):
    images = _images()
    where = tmp_path / folder
    where.mkdir(parents=True, exist_ok=True)
    raw = _idx_bytes(images)
    (where / (f"{IMAGES}.gz" if compressed else IMAGES)).write_bytes(
        gzip.compress(raw) if compressed else raw
    )
    read = ood_sets.idx_test_images(tmp_path, "fashion_mnist", download=False)
    assert read.dtype == torch.uint8 and torch.equal(read, images)


def test_the_download_checks_the_published_md5_and_leaves_nothing_behind(tmp_path, monkeypatch):
    payload = gzip.compress(_idx_bytes(_images()))
    requested = []

    def serve(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(FileNotFoundError, match="md5") as info:  # not the published file
        ood_sets.idx_test_images(tmp_path / "wrong", "fashion_mnist", download=True)
    message = str(info.value)
    assert "\n" not in message and "bef4ecab320f06d8554ea6380940ec79" in message
    assert requested == [
        f"{mirror}{IMAGES}.gz" for mirror in ood_sets.IDX_SETS["fashion_mnist"].mirrors
    ]
    assert not (tmp_path / "wrong").exists()

    md5 = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    spec = dataclasses.replace(ood_sets.IDX_SETS["fashion_mnist"], md5=md5)
    monkeypatch.setitem(ood_sets.IDX_SETS, "fashion_mnist", spec)
    read = ood_sets.idx_test_images(tmp_path / "fresh", "fashion_mnist", download=True)
    assert torch.equal(read, _images())
    assert [p.name for p in (tmp_path / "fresh" / "raw").iterdir()] == [f"{IMAGES}.gz"]
    ood_sets.idx_test_images(tmp_path / "fresh", "fashion_mnist", download=True)
    assert len(requested) == 3  # the copy is there: nothing downloaded again

    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed.*unreachable"):
        ood_sets.idx_test_images(tmp_path / "offline", "fashion_mnist", download=True)
    assert not (tmp_path / "offline").exists()


def test_a_missing_idx_set_names_where_it_looked_and_why_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ood_sets.idx_test_images(tmp_path, "fashion_mnist", download=False)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"ood.path='{tmp_path}': no {IMAGES}")
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "ood.download=false" in message
    with pytest.raises(FileNotFoundError, match=r"no download for 'kmnist' \(known: fashion"):
        ood_sets.idx_test_images(tmp_path, "kmnist", download=True)


def test_an_idx_file_of_labels_is_not_taken_for_images(tmp_path):
    (tmp_path / IMAGES).write_bytes(_idx_bytes(torch.arange(10, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"shape \(10,\), expected test images \(N, H, W\)"):
        ood_sets.idx_test_images(tmp_path, "fashion_mnist", download=False)


def _test_batch(root: Path, name: str) -> np.ndarray:
    """The test images as the written file holds them, read with the plain unpickler."""
    spec = ood_sets.CIFAR_SETS[name]
    content = pickle.loads((root / spec.folder / spec.test[0]).read_bytes(), encoding="bytes")
    return content[b"data"].reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("layout", ["folder", "archive", "test batch only"])
def test_cifar100_test_images_in_every_layout(tmp_path, layout):
    reference = write_cifar_batches(tmp_path / "reference", "cifar100", per_batch=5, seed=1)
    expected = _test_batch(reference, "cifar100")
    if layout == "test batch only":
        root = write_cifar_batches(tmp_path / layout, "cifar100", per_batch=5, seed=1)
        (root / "cifar-100-python" / "train").unlink()
    else:
        root = write_cifar_batches(tmp_path / layout, "cifar100", 5, layout=layout, seed=1)
    images = ood_sets.cifar_test_images(root, "cifar100", download=False)
    assert images.dtype == torch.uint8 and np.array_equal(images.numpy(), expected)


def test_a_missing_cifar_set_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        ood_sets.cifar_test_images(tmp_path, "cifar100", download=False)
    message = str(info.value)
    assert "\n" not in message and "no CIFAR-100 copy" in message
    assert "cifar-100-python/" in message and "ood.download=false" in message


CIFAR100 = {"kind": "cifar", "name": "cifar100", "download": False, "num_examples": None}


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> CIFARDataModule:
    root = write_cifar_batches(tmp_path_factory.mktemp("cifar10"), per_batch=8)
    dm = CIFARDataModule("cifar10", root, val_size=8, augment=False, download=False)
    dm.setup()
    return dm


def test_cifar100_is_normalised_by_the_cifar10_runs_moments(tmp_path, cifar10):
    root = write_cifar_batches(tmp_path, "cifar100", per_batch=5, seed=1)
    x = cifar10.test_set.tensors[0]
    ood = {**CIFAR100, "path": str(root)}
    inputs = ood_inputs(ood, x, cifar10, (3, 32, 32), seed=0)
    pixels = torch.from_numpy(_test_batch(root, "cifar100")).double()
    mean = torch.tensor(cifar10.channel_mean, dtype=torch.float64).reshape(1, 3, 1, 1)
    std = torch.tensor(cifar10.channel_std, dtype=torch.float64).reshape(1, 3, 1, 1)
    assert inputs.dtype == torch.float32 and inputs.shape == (5, 3, 32, 32)
    torch.testing.assert_close(inputs.double(), (pixels - mean) / std, rtol=0, atol=1e-5)
    fewer = ood_inputs({**ood, "num_examples": 2}, x, cifar10, (3, 32, 32), seed=0)
    assert torch.equal(fewer, inputs[:2])


def test_a_set_that_does_not_fit_the_run_is_one_line(tmp_path, cifar10):
    x = cifar10.test_set.tensors[0]
    cases = [
        (
            {**CIFAR100, "path": str(tmp_path)},
            MNISTDataModule(tmp_path, download=False),
            r"^ood=cifar100 needs a CIFAR run .* MNISTDataModule with inputs \(1, 28, 28\): "
            r"use ood=fashion_mnist",
        ),
        (
            {**CIFAR100, "name": "cifar10", "path": str(tmp_path)},
            cifar10,
            r"^ood\.name=cifar10 is this run's own dataset.*use ood\.name=cifar100",
        ),
        (
            {"kind": "idx", "name": "fashion_mnist", "path": str(tmp_path), "download": False},
            cifar10,
            r"^ood\.kind=idx \(ood=fashion_mnist .*CIFARDataModule: use ood=cifar100, ood=noise",
        ),
    ]
    for ood, datamodule, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            ood_inputs(ood, x, datamodule, (3, 32, 32), seed=0)
        assert "\n" not in str(info.value)


def test_idx_images_of_another_size_do_not_fit_an_mnist_run(tmp_path):
    (tmp_path / IMAGES).write_bytes(_idx_bytes(torch.zeros(3, 32, 32, dtype=torch.uint8)))
    ood = {"kind": "idx", "name": "fashion_mnist", "path": str(tmp_path), "download": False}
    mnist = MNISTDataModule(tmp_path, download=False)
    x = torch.zeros(4, 1, 28, 28)
    with pytest.raises(ValueError, match=r"shape \(32, 32\), which does not fit .* \(1, 28, 28\)"):
        ood_inputs(ood, x, mnist, (1, 28, 28), seed=0)
