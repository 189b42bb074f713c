"""CIFAR-10 / CIFAR-100: the pickle-batch reader in every layout, augmentation, download,
errors; all on small files written in the exact format of the originals."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import pickle
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from bbb_lightning.data import CIFARDataModule
from bbb_lightning.data import pickle_batches as batches
from bbb_lightning.data.cifar import RandomCropFlip, channel_moments
from bbb_testing import events, python2_pickle, run_cli, write_cifar_batches


def _written(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training and test images and labels as the files hold them, read back with the plain
    unpickler (the independent reference)."""
    spec = batches.CIFAR_SETS[name]
    folder = root / spec.folder
    parts = []
    for files in (spec.train, spec.test):
        loaded = [pickle.loads((folder / f).read_bytes(), encoding="bytes") for f in files]
        parts.append(np.concatenate([d[b"data"] for d in loaded]).reshape(-1, 3, 32, 32))
        parts.append(np.concatenate([d[spec.label_key.encode()] for d in loaded]))
    return parts[0], parts[1], parts[2], parts[3]


def _pixels(dm: CIFARDataModule, images: torch.Tensor) -> np.ndarray:
    """Normalised images back to their uint8 pixels."""
    mean = torch.tensor(dm.channel_mean).reshape(1, -1, 1, 1)
    std = torch.tensor(dm.channel_std).reshape(1, -1, 1, 1)
    pixels = (images.double() * std + mean).round()
    assert torch.allclose(pixels, images.double() * std + mean, atol=1e-3)
    return pixels.to(torch.uint8).numpy()


def _sorted_rows(images: np.ndarray) -> np.ndarray:
    rows = images.reshape(len(images), -1)
    return rows[np.lexsort(rows.T[::-1])]


def test_the_python2_format_is_what_the_reader_and_plain_pickle_read(tmp_path: Path) -> None:
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = python2_pickle({b"labels": [3, 7], b"data": data, b"batch_label": b"x" * 300})
    assert raw.startswith(b"\x80\x02") and b"_codecs" not in raw  # no Python 3 str in it
    reference = pickle.loads(raw, encoding="bytes")
    assert reference[b"labels"] == [3, 7] and np.array_equal(reference[b"data"], data)
    (tmp_path / "batch").write_bytes(raw)
    spec = dataclasses.replace(batches.CIFAR_SETS["cifar10"], train=("batch",), test=())
    images, labels = batches.read_batches(tmp_path, spec, ("batch",))
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert torch.equal(images.reshape(2, -1), torch.from_numpy(data)) and labels.tolist() == [3, 7]


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_every_layout_gives_the_images_of_the_files(tmp_path: Path, name: str) -> None:
    reference = write_cifar_batches(tmp_path / "reference", name)
    train_x, train_y, test_x, test_y = _written(reference, name)
    modules = {}
    for layout in ("folder", "flat", "archive"):
        root = write_cifar_batches(tmp_path / layout, name, layout=layout)
        dm = CIFARDataModule(name, root, batch_size=8, val_size=5, augment=False, download=False)
        dm.prepare_data()
        dm.setup()
        modules[layout] = dm
    archive = tmp_path / "archive" / batches.CIFAR_SETS[name].archive
    as_file = CIFARDataModule(name, archive, val_size=5, augment=False, download=False)
    as_file.setup()  # data_dir set to the archive itself
    modules["archive as data_dir"] = as_file
    assert not (tmp_path / "archive" / batches.CIFAR_SETS[name].folder).exists()  # not extracted

    dm = modules["folder"]
    assert (dm.num_classes, dm.input_shape) == (10 if name == "cifar10" else 100, (3, 32, 32))
    assert dm.classes == [f"class{i}" for i in range(dm.num_classes)]
    fit_x, fit_y = dm.train_set.tensors
    val_x, val_y = dm.val_set.tensors
    assert (len(fit_x), len(val_x)) == (len(train_x) - 5, 5)
    # the test set in file order; training + validation = the training files, disjoint
    assert np.array_equal(_pixels(dm, dm.test_set.tensors[0]), test_x)
    assert np.array_equal(dm.test_set.tensors[1].numpy(), test_y)
    together = np.concatenate([_pixels(dm, fit_x), _pixels(dm, val_x)])
    assert np.array_equal(_sorted_rows(together), _sorted_rows(train_x))
    labels = np.concatenate([fit_y.numpy(), val_y.numpy()])
    assert np.array_equal(np.sort(labels), np.sort(train_y))
    for layout, other in modules.items():
        for split in ("train_set", "val_set", "test_set"):
            for mine, theirs in zip(
                getattr(dm, split).tensors, getattr(other, split).tensors, strict=True
            ):
                assert torch.equal(mine, theirs), (layout, split)


def test_normalisation_uses_the_training_part_only(tmp_path: Path) -> None:
    root = write_cifar_batches(tmp_path, per_batch=20)
    dm = CIFARDataModule("cifar10", root, val_size=30, augment=False, download=False)
    dm.setup()
    x = dm.train_set.tensors[0].double()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(
        x.std(dim=(0, 2, 3), correction=0), torch.ones(3, dtype=torch.float64), atol=1e-5
    )
    assert not torch.allclose(dm.val_set.tensors[0].mean(dim=(0, 2, 3)), torch.zeros(3))
    # the exact moments of the histogram method against float64 arithmetic
    pixels = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8)
    mean, std = channel_moments(pixels)
    assert np.allclose(mean, pixels.double().mean(dim=(0, 2, 3)).numpy(), rtol=1e-12)
    assert np.allclose(std, pixels.double().std(dim=(0, 2, 3), correction=0).numpy(), rtol=1e-12)


def test_augmentation_is_a_padded_crop_and_a_flip_of_the_image() -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (400, 3, 8, 8), dtype=torch.uint8, generator=generator)
    mean, std = torch.tensor([10.0, 20.0, 30.0]), torch.tensor([2.0, 4.0, 8.0])
    augmented = RandomCropFlip(images, torch.zeros(400), mean, std, padding=2, seed=3, epoch=0)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    windows = {
        (top, left, flip): padded[:, :, top : top + 8, left : left + 8].flip(-1)
        if flip
        else padded[:, :, top : top + 8, left : left + 8]
        for top in range(5)
        for left in range(5)
        for flip in (False, True)
    }
    found = []
    for index in range(len(images)):
        x, _ = augmented[index]
        pixels = (x * std.reshape(-1, 1, 1) + mean.reshape(-1, 1, 1)).round().to(torch.uint8)
        matches = [key for key, window in windows.items() if torch.equal(window[index], pixels)]
        assert len(matches) == 1, index  # pixels >= 1 beside a black border: one window fits
        found.append(matches[0])
    tops, lefts, flips = (np.array(column, dtype=float) for column in zip(*found, strict=True))
    # offsets uniform on 0..4 (mean 2, variance 2), fair flips: within 5 standard errors
    for offsets in (tops, lefts):
        assert abs(offsets.mean() - 2) < 5 * np.sqrt(2 / len(images))
    assert abs(flips.mean() - 0.5) < 5 * np.sqrt(0.25 / len(images))
    again = RandomCropFlip(images, torch.zeros(400), mean, std, padding=2, seed=3, epoch=0)
    other_epoch = RandomCropFlip(images, torch.zeros(400), mean, std, padding=2, seed=3, epoch=1)
    assert torch.equal(again[5][0], augmented[5][0])
    assert not all(torch.equal(other_epoch[i][0], augmented[i][0]) for i in range(10))


def test_missing_copy_is_one_line_naming_the_layouts(tmp_path: Path) -> None:
    dm = CIFARDataModule("cifar100", tmp_path / "nowhere", download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match=r"dataset\.data_dir") as info:
            step()
        message = str(info.value)
        assert "\n" not in message and str(tmp_path / "nowhere") in message
        assert "cifar-100-python/" in message and "cifar-100-python.tar.gz" in message


def test_download_checks_the_md5_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_cifar_batches(tmp_path / "served", layout="archive")
    payload = (root / "cifar-10-python.tar.gz").read_bytes()
    requested = []

    def serve(url: str, timeout: float) -> io.BytesIO:
        requested.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    with pytest.raises(FileNotFoundError, match="md5") as info:  # not the published archive
        CIFARDataModule("cifar10", tmp_path / "wrong").prepare_data()
    assert "\n" not in str(info.value) and not list((tmp_path / "wrong").iterdir())
    assert requested == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]

    md5 = hashlib.md5(payload, usedforsecurity=False).hexdigest()
    spec = dataclasses.replace(batches.CIFAR_SETS["cifar10"], md5=md5)
    monkeypatch.setitem(batches.CIFAR_SETS, "cifar10", spec)
    dm = CIFARDataModule("cifar10", tmp_path / "fresh", val_size=5)
    dm.prepare_data()
    assert [p.name for p in (tmp_path / "fresh").iterdir()] == ["cifar-10-python.tar.gz"]
    dm.setup()
    assert len(dm.test_set) == 12
    dm.prepare_data()  # a copy is there: nothing downloaded
    assert len(requested) == 2

    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match=r"download failed.*unreachable"):
        CIFARDataModule("cifar10", tmp_path / "offline").prepare_data()
    assert not list((tmp_path / "offline").iterdir())


def _write(folder: Path, content: object, raw: bytes | None = None) -> Path:
    spec = batches.CIFAR_SETS["cifar10"]
    folder.mkdir(parents=True)
    good = python2_pickle({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    for name in (*spec.train, *spec.test):
        (folder / name).write_bytes(good)
    (folder / "test_batch").write_bytes(raw if raw is not None else python2_pickle(content))
    return folder


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


@pytest.mark.parametrize(
    ("content", "raw", "message"),
    [
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, None, "label 10 outside"),
        ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, None, r"\(N, 3072\)"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, None, "2 images but labels"),
        ({b"images": np.zeros((2, 3072), np.uint8)}, None, "expected keys 'data'"),
        (None, pickle.dumps(_Evil(), protocol=2), r"refusing to load __builtin__\.print"),
        (None, b"\x80\x02truncated", "corrupt CIFAR batch"),
    ],
    ids=["label", "shape", "count", "keys", "code", "truncated"],
)
def test_corrupt_batches_are_named(tmp_path: Path, content, raw, message) -> None:
    folder = _write(tmp_path / "cifar-10-batches-py", content, raw)
    dm = CIFARDataModule("cifar10", tmp_path, val_size=2, download=False)
    with pytest.raises(ValueError, match=message) as info:
        dm.setup()
    assert "test_batch" in str(info.value) and "\n" not in str(info.value)
    assert folder.is_dir()


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="cifar10, cifar100"):
        CIFARDataModule("cifar20")
    with pytest.raises(ValueError, match="augment must be true or false"):
        CIFARDataModule(augment="yes")
    with pytest.raises(ValueError, match="crop_padding must be an integer >= 0"):
        CIFARDataModule(crop_padding=-1)
    with pytest.raises(ValueError, match="val_size must be an integer >= 1"):
        CIFARDataModule(val_size=0)


def test_val_size_beyond_the_training_images_is_named(tmp_path: Path) -> None:
    dm = CIFARDataModule("cifar10", write_cifar_batches(tmp_path), val_size=60, download=False)
    with pytest.raises(ValueError, match="val_size must be < 60"):
        dm.setup()


# -- end to end: a tiny Bayesian ResNet-20 run through the command line ---------------------
@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``experiment=cifar10_resnet20`` on 40 + 8 images in the CIFAR-10 format, one epoch of 2
    minibatches on the CPU, through ``python -m bbb_lightning.train``."""
    root = tmp_path_factory.mktemp("cifar_run")
    data = write_cifar_batches(root / "data", per_batch=8)
    run = root / "run"
    result = run_cli(
        "experiment=cifar10_resnet20",
        "trainer=cpu",
        f"dataset.data_dir={data}",
        "dataset.download=false",
        "dataset.val_size=8",
        "dataset.batch_size=16",
        "trainer.max_epochs=1",
        "eval_samples=2",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        f"hydra.run.dir={run}",
        cwd=root,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_the_resnet20_experiment_trains_end_to_end(cifar_run: Path) -> None:
    metrics = json.loads((cifar_run / "metrics.json").read_text())
    assert metrics["epochs"] == 1
    assert 0 <= metrics["test/accuracy"] <= 1 and math.isfinite(metrics["test/nll"])
    checkpoint = torch.load(cifar_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 2  # 32 training images in batches of 16
    hparams = checkpoint["hyper_parameters"]
    assert hparams["net"]["_target_"] == "bbb_lightning.models.resnet.CIFARResNet"
    assert hparams["scheduler"]["milestones"] == [80, 120, 160]
    assert "stages.0.0.bn1.weight" in hparams["exclude"]  # batch norm kept deterministic
    accumulator = events(cifar_run)
    assert [event.value for event in accumulator.Scalars("train/lr")] == pytest.approx([1e-3])
    assert "val/accuracy" in accumulator.Tags()["scalars"]


@pytest.mark.slow
def test_cifar100_as_the_ood_set_of_the_cifar10_run_through_the_cli(cifar_run: Path) -> None:
    """``evaluate ood=cifar100`` on the run: CIFAR-100's test batch (torchvision's root layout,
    no download) scored against the CIFAR-10 test images, under the set's own name."""
    root = cifar_run.parent
    ood_root = write_cifar_batches(root / "ood", "cifar100", per_batch=6, seed=1)
    out = root / "evaluation"
    result = run_cli(
        f"ckpt_path={cifar_run}", "ood=cifar100", f"ood.path={ood_root}", "eval_samples=2",
        "sample_counts=[1,2]", "attack.enabled=false", "export.enabled=false",
        "pruning_fractions=[]", "figures=false", f"hydra.run.dir={out}",
        cwd=root, entry="evaluate",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    keys = {key for key in metrics if key.startswith("ood/")}
    names = ("entropy_auroc", "entropy_aupr", "mi_auroc", "mi_aupr", "entropy")
    assert keys == {f"ood/cifar100/{name}" for name in (*names, "mutual_information")}
    assert all(0 <= metrics[f"ood/cifar100/{name}"] <= 1 for name in names[:4])
    assert json.loads((out / "evaluation.json").read_text())["ood"] == "cifar100"
