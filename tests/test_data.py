"""The datamodules: toy regression, the IDX reader, MNIST and CSV."""

from __future__ import annotations

import gzip
import io
import math
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from bbb_lightning.data import CSVDataModule, MNISTDataModule, ToyRegressionDataModule
from bbb_lightning.data.idx import read_idx
from bbb_lightning.data.sampler import EpochPermutationSampler
from bbb_lightning.data.toy_regression import blundell_curve

# --- toy regression -------------------------------------------------------------------------


def test_blundell_curve_matches_hand_computation() -> None:
    x, eps = 0.1, 0.01
    expected = x + 0.3 * math.sin(2 * math.pi * 0.11) + 0.3 * math.sin(4 * math.pi * 0.11) + eps
    result = blundell_curve(torch.tensor([x], dtype=torch.float64), eps)
    assert result.item() == pytest.approx(expected, abs=1e-12)


def test_toy_regression_is_deterministic_under_seed() -> None:
    a, b, c = (ToyRegressionDataModule(seed=s) for s in (3, 3, 4))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert torch.equal(a.test_set.tensors[1], b.test_set.tensors[1])
    assert not torch.equal(a.train_x, c.train_x)


def test_toy_regression_splits_are_independent_of_other_split_sizes() -> None:
    small, large = ToyRegressionDataModule(num_train=16), ToyRegressionDataModule(num_train=64)
    assert torch.equal(small.val_set.tensors[0], large.val_set.tensors[0])


def test_toy_regression_shapes_dtypes_and_ranges() -> None:
    dm = ToyRegressionDataModule(num_train=100, num_val=50, num_test=40, batch_size=32)
    assert (dm.task, dm.input_shape, dm.target_dim, dm.num_classes) == ("regression", (1,), 1, None)
    assert dm.num_train == 100
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1) and y.shape == (32, 1)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert dm.train_x.min() >= 0.0 and dm.train_x.max() <= 0.5
    val_x = dm.val_set.tensors[0]
    assert val_x.min() >= -0.2 and val_x.max() <= 1.2 and val_x.max() > 0.5
    assert sum(len(batch[0]) for batch in dm.test_dataloader()) == 40
    grid = dm.plot_grid(11)
    assert grid.shape == (11, 1)
    assert grid[0].item() == pytest.approx(-0.2) and grid[-1].item() == pytest.approx(1.2)


def test_toy_regression_noise_std_is_a_standard_deviation() -> None:
    noiseless = ToyRegressionDataModule(noise_std=0.0)
    assert torch.allclose(noiseless.train_y, blundell_curve(noiseless.train_x))
    # Same seed, same standard-normal draws: the residual y - f(x) is about (f'(x) + 1) ε, so it
    # doubles when noise_std doubles (it would grow by √2 if noise_std were a variance).
    spread = [
        (dm.train_y - blundell_curve(dm.train_x)).std().item()
        for dm in (ToyRegressionDataModule(noise_std=s) for s in (0.01, 0.02))
    ]
    assert spread[1] / spread[0] == pytest.approx(2.0, rel=0.05)


def test_toy_regression_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="train_range"):
        ToyRegressionDataModule(train_range=(0.5, 0.0))
    with pytest.raises(ValueError, match="noise_std"):
        ToyRegressionDataModule(noise_std=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        ToyRegressionDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"train_range must be \[low, high\].*got \[0, 1, 2\]"):
        ToyRegressionDataModule(train_range=[0, 1, 2])
    with pytest.raises(ValueError, match="num_train must be an integer >= 1, got 'abc'"):
        ToyRegressionDataModule(num_train="abc")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got True"):
        ToyRegressionDataModule(batch_size=True)
    # numpy integers (e.g. computed sizes) are integers: they were refused as "not an integer"
    dm = ToyRegressionDataModule(num_train=np.int64(16), batch_size=np.int64(8), seed=np.int32(1))
    assert type(dm.batch_size) is int and dm.batch_size == 8 and dm.num_train == 16


def test_train_order_is_a_function_of_seed_and_epoch_only() -> None:
    dm = ToyRegressionDataModule(num_workers=1)
    train = dm.train_dataloader()
    assert isinstance(train.sampler, EpochPermutationSampler) and train.drop_last is False
    assert list(train.sampler) == list(dm.train_dataloader().sampler)  # same epoch, same order
    assert list(EpochPermutationSampler(512, seed=0, epoch=1)) != list(train.sampler)
    assert isinstance(dm.val_dataloader().sampler, SequentialSampler)


def test_shards_of_a_step_form_the_single_process_batch() -> None:
    order = list(EpochPermutationSampler(10, seed=3, epoch=2))
    shards = [list(EpochPermutationSampler(10, 3, 2, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5
    for step in range(2):  # per-rank batch 2 <-> single-process batch 4
        union = shards[0][2 * step : 2 * step + 2] + shards[1][2 * step : 2 * step + 2]
        assert sorted(union) == sorted(order[4 * step : 4 * step + 4])


# --- IDX reader -----------------------------------------------------------------------------


def _idx_bytes(shape: tuple[int, ...], data: bytes) -> bytes:
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + data


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_raw_and_gzip(tmp_path: Path, compress: bool) -> None:
    payload = _idx_bytes((2, 3), bytes(range(6)))
    path = tmp_path / ("tiny.idx.gz" if compress else "tiny.idx")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    result = read_idx(path)
    assert result.dtype == torch.uint8
    assert torch.equal(result, torch.arange(6, dtype=torch.uint8).reshape(2, 3))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("truncated.idx", _idx_bytes((2, 3), bytes(5)), "7 bytes|expected 14"),
        ("magic.idx", b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00", "magic"),
        ("short.idx", b"\x00\x00", "shorter than the header"),
        ("header.idx", b"\x00\x00\x08\x03\x00\x00", "truncated header"),
        ("ndim.idx", b"\x00\x00\x08\xc8" + bytes(800), "says 200 dimensions, expected 1 to 8"),
        ("notgzip.idx.gz", b"not gzip at all", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_corrupt_files(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert name in str(info.value)


# --- MNIST ----------------------------------------------------------------------------------


def test_mnist_from_local_copy(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=mnist_dir, download=False, normalization="blundell")
    assert (dm.task, dm.input_shape, dm.num_classes, dm.target_dim) == (
        "classification",
        (1, 28, 28),
        10,
        None,
    )
    assert dm.num_train == 50_000
    dm.prepare_data()
    dm.setup("fit")
    train_set = dm.train_set
    dm.setup("test")
    assert dm.train_set is train_set, "setup must decode the files only once"
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50_000, 10_000, 10_000)
    assert dm.num_train == 50_000

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (128,) and y.dtype == torch.int64
    train_x, train_y = dm.train_set.tensors
    assert train_x.min().item() == 0.0
    assert train_x.max().item() == pytest.approx(255 / 126)
    assert train_y.min().item() == 0 and train_y.max().item() == 9

    # train and val partition the 60k training images
    labels = read_idx(dm._find("train-labels-idx1-ubyte")).long()
    val_y = dm.val_set.tensors[1]
    counts = torch.bincount(train_y, minlength=10) + torch.bincount(val_y, minlength=10)
    assert torch.equal(counts, torch.bincount(labels, minlength=10))


def test_mnist_in_torchvisions_layout(mnist_dir: Path, tmp_path: Path) -> None:
    """``torchvision.datasets.MNIST(root)`` leaves ``root/MNIST/raw/``: data_dir=root finds it."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in [*mnist_dir.glob("*-ubyte*"), *mnist_dir.glob("raw/*-ubyte*")]:
        (raw / source.name).symlink_to(source.resolve())
    dm = MNISTDataModule(data_dir=tmp_path, download=False, limit_train=10)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train_set), len(dm.test_set)) == (10, 10_000)


def test_mnist_normalizations_and_limit(mnist_dir: Path) -> None:
    dm = MNISTDataModule(data_dir=mnist_dir, download=False, normalization="none", limit_train=100)
    assert dm.num_train == 100
    dm.setup("fit")
    assert dm.num_train == len(dm.train_set) == 100
    plain = dm.test_set.tensors[0]
    assert plain.min().item() == 0.0 and plain.max().item() == 1.0
    standard = MNISTDataModule(data_dir=mnist_dir, normalization="standard", limit_train=10)
    standard.setup("test")
    expected = (plain - 0.1307) / 0.3081
    assert torch.allclose(standard.test_set.tensors[0], expected, atol=1e-5)


def test_mnist_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="standard, blundell, none"):
        MNISTDataModule(normalization="zscore")
    with pytest.raises(ValueError, match="val_size"):
        MNISTDataModule(val_size=0)
    with pytest.raises(ValueError, match=r"val_size must be an integer .*got 5000\.0"):
        MNISTDataModule(val_size=5000.0)
    with pytest.raises(ValueError, match="limit_train"):
        MNISTDataModule(limit_train=0)


def test_mnist_missing_without_download(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    dm = MNISTDataModule(data_dir=missing, download=False)
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(FileNotFoundError, match=r"dataset\.data_dir") as info:
            step()
        message = str(info.value)
        assert str(missing) in message and "train-images-idx3-ubyte" in message
        assert "\n" not in message
        assert "(evaluate: data_dir=...)" in message  # evaluate has no dataset.data_dir key


def test_mnist_offline_download_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    dm = MNISTDataModule(data_dir=tmp_path, download=True)
    with pytest.raises(FileNotFoundError, match="download failed") as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path) in message and "unreachable" in message and "\n" not in message
    assert info.value.__cause__ is None


def test_mnist_download_verifies_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mnist_dir: Path
) -> None:
    local = MNISTDataModule(data_dir=mnist_dir)

    def serve_local_copy(url: str, timeout: float) -> io.BytesIO:
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        path = local._find(name)
        content = path.read_bytes()
        return io.BytesIO(content if path.suffix == ".gz" else gzip.compress(content))

    monkeypatch.setattr(urllib.request, "urlopen", serve_local_copy)
    dm = MNISTDataModule(data_dir=tmp_path, val_size=100, limit_train=10)
    dm.prepare_data()
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        f"{name}.gz"
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )

    def serve_garbage(url: str, timeout: float) -> io.BytesIO:
        return io.BytesIO(gzip.compress(b"not mnist"))

    monkeypatch.setattr(urllib.request, "urlopen", serve_garbage)
    with pytest.raises(FileNotFoundError, match="md5"):
        MNISTDataModule(data_dir=tmp_path / "other").prepare_data()


# --- CSV ------------------------------------------------------------------------------------


def _write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.write_text("\n".join(",".join(str(v) for v in row) for row in rows) + "\n")
    return path


@pytest.fixture
def table(tmp_path: Path) -> Path:
    """40 rows: two features, a constant column, a string label and a numeric target."""
    rows: list[list[object]] = [["a", "b", "const", "label", "value"]]
    for i in range(40):
        rows.append([i, (i * 7) % 11 - 3.5, 2.0, ["cat", "dog", "bird"][i % 3], 0.5 * i + 1])
    return _write_csv(tmp_path / "table.csv", rows)


def test_csv_classification_with_string_labels(table: Path) -> None:
    dm = CSVDataModule(table, target="label", features=["a", "b"], batch_size=8)
    assert (dm.task, dm.input_shape, dm.num_classes, dm.target_dim) == (
        "classification",
        (2,),
        3,
        None,
    )
    assert dm.classes == ["bird", "cat", "dog"]
    assert (dm.num_train, len(dm.val_set), len(dm.test_set)) == (32, 4, 4)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 2) and x.dtype == torch.float32 and y.dtype == torch.int64
    a_raw = dm.train_set.tensors[0][:, 0] * dm.feature_std[0] + dm.feature_mean[0]
    expected = [["cat", "dog", "bird"][round(a) % 3] for a in a_raw.tolist()]
    assert [dm.classes[i] for i in dm.train_set.tensors[1].tolist()] == expected


def test_csv_integer_labels_sort_numerically(tmp_path: Path) -> None:
    rows: list[list[object]] = [["x", "y"]] + [[i, [10, 2, 1][i % 3]] for i in range(12)]
    dm = CSVDataModule(_write_csv(tmp_path / "ints.csv", rows), target="y")
    assert dm.classes == [1, 2, 10]


def test_csv_integer_labels_written_as_floats_are_one_class_each(tmp_path: Path) -> None:
    labels = ["1.0", "2.0", "10.0", "1"]
    rows: list[list[object]] = [["x", "y"]] + [[i, labels[i % 4]] for i in range(12)]
    dm = CSVDataModule(_write_csv(tmp_path / "floats.csv", rows), target="y")
    assert dm.classes == [1, 2, 10]


def test_csv_one_feature_name_a_byte_order_mark_and_other_encodings(
    tmp_path: Path, table: Path
) -> None:
    one = CSVDataModule(table, target="label", features="a")  # dataset.features=a
    assert one.features == ["a"] and one.input_shape == (1,)
    with pytest.raises(ValueError, match=r"dataset\.features names 'a' twice"):
        CSVDataModule(table, target="label", features=["a", "a"])
    excel = tmp_path / "excel.csv"
    excel.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # Excel's "CSV UTF-8"
    assert CSVDataModule(excel, target="label").features == ["a", "b", "const", "value"]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("caf\u00e9,label\n1,a\n2,b\n3,a\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8 text .*save it as UTF-8"):
        CSVDataModule(latin, target="label")


def test_csv_regression_and_train_only_standardization(table: Path) -> None:
    dm = CSVDataModule(table, target="value", task="regression", features=["a", "b", "const"])
    raw = CSVDataModule(
        table, target="value", task="regression", features=["a", "b", "const"], standardize=False
    )
    assert (dm.input_shape, dm.target_dim, dm.num_classes) == ((3,), 1, None)
    x, y = dm.train_set.tensors
    raw_x, raw_y = raw.train_set.tensors
    assert y.shape == (32, 1) and y.dtype == torch.float32
    assert torch.allclose(dm.feature_mean, raw_x.mean(0))
    assert torch.allclose(dm.feature_std[:2], raw_x[:, :2].std(0, correction=0))
    assert dm.feature_std[2].item() == 1.0, "a constant column keeps scale 1"
    assert torch.allclose(x[:, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x[:, :2].std(0, correction=0), torch.ones(2), atol=1e-5)
    assert torch.allclose(dm.target_mean, raw_y.mean(0))
    assert torch.allclose(y * dm.target_std + dm.target_mean, raw_y, atol=1e-5)
    # validation rows are transformed with the training statistics
    raw_val_x = raw.val_set.tensors[0]
    expected_val = (raw_val_x - dm.feature_mean) / dm.feature_std
    assert torch.allclose(dm.val_set.tensors[0], expected_val)


def test_csv_split_is_seeded(table: Path) -> None:
    a, b, c = (CSVDataModule(table, target="label", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    assert not torch.equal(a.test_set.tensors[0], c.test_set.tensors[0])


def test_csv_errors(tmp_path: Path, table: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        CSVDataModule(tmp_path / "missing.csv", target="y")
    with pytest.raises(ValueError, match=r"'price'.*available: a, b, const, label, value"):
        CSVDataModule(table, target="price")
    with pytest.raises(ValueError, match="unknown task 'ranking'"):
        CSVDataModule(table, target="label", task="ranking")
    with pytest.raises(ValueError, match="val_fraction must be a number in \\(0, 1\\), got 'abc'"):
        CSVDataModule(table, target="label", val_fraction="abc")
    bad = _write_csv(tmp_path / "bad.csv", [["a", "y"], [1, 0], ["oops", 1], [3, 0]])
    with pytest.raises(ValueError, match=r"line 3, column 'a'.*'oops'"):
        CSVDataModule(bad, target="y")
    huge = _write_csv(tmp_path / "huge.csv", [["a", "y"], [1, 0], ["1e39", 1], [3, 0]])
    with pytest.raises(ValueError, match=r"line 3, column 'a': '1e39' does not fit float32"):
        CSVDataModule(huge, target="y")
    for label, message in (("", "missing class label ''"), ("0.35", "'0.35' is not a class label")):
        labelled = _write_csv(tmp_path / "l.csv", [["a", "y"], [1, 0], [2, label], [3, 1]])
        with pytest.raises(ValueError, match=rf"line 3, column 'y': {message}"):
            CSVDataModule(labelled, target="y")
    only_target = _write_csv(tmp_path / "only.csv", [["y"], [0], [1], [0]])
    with pytest.raises(ValueError, match=r"no feature column .* besides the target 'y'"):
        CSVDataModule(only_target, target="y")
    with pytest.raises(ValueError, match="no feature column"):
        CSVDataModule(bad, target="y", features=[])
    lines = table.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",n/a"
    table.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"line 3, column 'value'.*'n/a'"):
        CSVDataModule(table, target="value", task="regression", features=["a", "b"])


def test_mnist_labels_outside_0_to_9_are_named(tmp_path: Path) -> None:
    for split, count in (("train", 4), ("t10k", 2)):
        (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(
            _idx_bytes((count, 28, 28), bytes(count * 28 * 28))
        )
        labels = bytes([1, 12, 3, 4][:count])
        (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes((count,), labels))
    datamodule = MNISTDataModule(tmp_path, download=False, val_size=1)
    with pytest.raises(ValueError, match=r"corrupt MNIST labels in .*train-labels.*: label 12"):
        datamodule.setup("fit")
