"""The UCI regression protocol: the loader, the metrics in the target's units, the multirun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bbb_lightning.cli.errors import UserError
from bbb_lightning.data import UCIDataModule
from bbb_lightning.data import uci as uci_module
from bbb_lightning.summary import main as summary_main
from bbb_lightning.summary import mean_and_standard_error
from bbb_lightning.train import train
from bbb_lightning.training.module import BayesByBackprop
from bbb_lightning.training.seeding import derive_seed
from bbb_testing import QUICK, compose_config, run_cli, write_uci_set

SHARED_UCI = Path(__file__).resolve().parents[2] / "shared" / "data" / "UCI"
QUIET = [*QUICK, "logger=none"]


@pytest.fixture
def uci_dir(tmp_path: Path) -> Path:
    write_uci_set(tmp_path / "UCI")
    return tmp_path / "UCI"


def _rows_of(data: np.ndarray, x: torch.Tensor, dm: UCIDataModule) -> list[int]:
    """The data.txt row of each standardised input row of ``x``."""
    raw = (x.double() * dm.feature_std.double() + dm.feature_mean.double()).numpy()
    inputs = data[:, [0, 1, 3]]
    found = [int(np.argmin(np.abs(inputs - row).sum(1))) for row in raw]
    assert np.allclose(inputs[found], raw, rtol=1e-5, atol=1e-4)
    return found


def test_validation_comes_from_the_training_rows_and_the_test_rows_are_the_split(uci_dir):
    dm = UCIDataModule("toyset", split=1, data_dir=uci_dir, val_fraction=0.2, download=False)
    dm.setup("fit")
    data = np.loadtxt(uci_dir / "toyset" / "data.txt")
    train_index = np.loadtxt(uci_dir / "toyset" / "index_train_1.txt", dtype=int)
    test_index = np.loadtxt(uci_dir / "toyset" / "index_test_1.txt", dtype=int)
    fit = _rows_of(data, dm.train_set.tensors[0], dm)
    val = _rows_of(data, dm.val_set.tensors[0], dm)
    assert _rows_of(data, dm.test_set.tensors[0], dm) == test_index.tolist()  # in file order
    assert sorted(fit + val) == sorted(train_index.tolist())  # validation out of training only
    assert len(val) == round(0.2 * len(train_index)) and not set(fit) & set(val)
    assert (dm.input_shape, dm.n_hidden, dm.n_splits, dm.net_defaults) == (
        (3,),
        7,
        2,
        {"hidden": [7]},
    )
    other = UCIDataModule("toyset", split=1, data_dir=uci_dir, val_fraction=0.2, seed=1)
    other.setup()
    assert sorted(_rows_of(data, other.val_set.tensors[0], other)) != sorted(val)  # seeded


def test_inputs_and_target_are_standardised_with_the_fitted_rows_only(uci_dir):
    dm = UCIDataModule("toyset", split=0, data_dir=uci_dir, download=False)
    dm.setup("fit")
    data = np.loadtxt(uci_dir / "toyset" / "data.txt")
    fit = _rows_of(data, dm.train_set.tensors[0], dm)
    expected_mean = data[fit].mean(0)  # float64, from the file
    expected_std = data[fit].std(0)
    np.testing.assert_allclose(dm.feature_mean, expected_mean[[0, 1, 3]], rtol=1e-6)
    np.testing.assert_allclose(dm.feature_std, expected_std[[0, 1, 3]], rtol=1e-6)
    np.testing.assert_allclose(dm.target_mean, expected_mean[[2]], rtol=1e-6)
    np.testing.assert_allclose(dm.target_std, expected_std[[2]], rtol=1e-6)
    x, y = dm.train_set.tensors
    assert torch.allclose(x.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(0, correction=0), torch.ones(3), atol=1e-5)
    assert y.shape == (len(fit), 1) and abs(float(y.mean())) < 1e-5
    # the held-out parts are not standardised on themselves (they would be exactly 0 mean)
    for part in (dm.val_set, dm.test_set):
        assert float(part.tensors[1].mean().abs()) > 1e-3
    test_index = np.loadtxt(uci_dir / "toyset" / "index_test_0.txt", dtype=int)
    raw_y = dm.test_set.tensors[1].double() * dm.target_std.double() + dm.target_mean.double()
    np.testing.assert_allclose(raw_y[:, 0], data[test_index, 2], rtol=1e-6)


def test_missing_files_name_the_path(uci_dir):
    (uci_dir / "toyset" / "index_test_1.txt").unlink()
    dm = UCIDataModule("toyset", split=1, data_dir=uci_dir, download=False)
    dm.prepare_data()  # nothing to do without download
    with pytest.raises(FileNotFoundError) as error:
        dm.setup()
    message = str(error.value)
    assert "\n" not in message and str(uci_dir / "toyset" / "index_test_1.txt") in message
    for download in (True, False):  # refused before a download of the split's files
        split = UCIDataModule("toyset", split=2, data_dir=uci_dir, download=download)
        with pytest.raises(ValueError, match=r"dataset split must be in \[0, 2\) for toyset"):
            split.prepare_data()
            split.setup()
    cfg = compose_config(
        uci_dir / "run", "dataset=uci", "dataset.name=nosuchset", f"dataset.data_dir={uci_dir}",
        "dataset.download=false", *QUIET,
    )  # fmt: skip
    with pytest.raises(UserError, match=f"UCI file not found: {uci_dir / 'nosuchset'}/"):
        train(cfg)
    assert not (uci_dir / "run" / "metrics.json").exists()


def test_download_fills_a_missing_copy_and_a_failed_one_names_the_path(
    uci_dir, tmp_path, monkeypatch
):
    # the public copy's layout (<name>/data/<file>), served from a local folder by file://
    public = tmp_path / "public"
    (public / "toyset").mkdir(parents=True)
    (uci_dir / "toyset").rename(public / "toyset" / "data")
    monkeypatch.setattr(uci_module, "UCI_URL", f"file://{public}/{{name}}/data/{{file}}")
    local = tmp_path / "local"
    dm = UCIDataModule("toyset", split=1, data_dir=local)
    dm.prepare_data()
    dm.setup()
    assert (local / "toyset" / "index_train_1.txt").is_file()
    assert not (local / "toyset" / "index_train_0.txt").exists()  # only this split's files
    assert len(dm.test_set) == 8 and not list((local / "toyset").glob("*.part"))
    broken = UCIDataModule("toyset", split=0, data_dir=local)
    (public / "toyset" / "data" / "index_test_0.txt").unlink()
    with pytest.raises(FileNotFoundError) as error:
        broken.prepare_data()
    assert str(local / "toyset" / "index_test_0.txt") in str(error.value)
    assert "downloading file://" in str(error.value) and "\n" not in str(error.value)


def test_test_rmse_and_log_likelihood_are_in_the_targets_units(uci_dir, tmp_path):
    """metrics.json's test/raw_rmse and test/raw_ll against float64 from data.txt: the
    predictive mixture of the S draws, each N(m_s std + mean, (sigma_s std)^2)."""
    cfg = compose_config(
        tmp_path / "run", "experiment=uci", "dataset.name=toyset", f"dataset.data_dir={uci_dir}",
        "dataset.batch_size=16", "eval_samples=7", *QUIET,
    )  # fmt: skip
    metrics = train(cfg)
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    model = BayesByBackprop.load_from_checkpoint(best).eval()
    assert model.hparams["net"]["hidden"] == [7]  # the protocol's n_hidden.txt
    dm = UCIDataModule("toyset", split=0, data_dir=uci_dir)
    dm.setup()
    x, _ = dm.test_set.tensors  # 8 rows: one test batch
    torch.manual_seed(derive_seed(0, "test", 0))  # the draws of the run's test pass
    with torch.no_grad():
        mean, std = model.likelihood.mean_and_std(model(x, 7))
    data = np.loadtxt(uci_dir / "toyset" / "data.txt")
    y = torch.from_numpy(data[np.loadtxt(uci_dir / "toyset" / "index_test_0.txt", dtype=int), 2])
    loc = mean[..., 0].double() * dm.target_std.double() + dm.target_mean.double()
    scale = std[..., 0].double() * dm.target_std.double()
    log_p = torch.distributions.Normal(loc, scale).log_prob(y)  # (S, B)
    ll = (torch.logsumexp(log_p, 0) - math.log(7)).mean()
    rmse = (loc.mean(0) - y).square().mean().sqrt()
    assert metrics["test/raw_ll"] == pytest.approx(float(ll), rel=1e-4, abs=1e-4)
    assert metrics["test/raw_rmse"] == pytest.approx(float(rmse), rel=1e-4)
    assert metrics["test/raw_rmse"] == pytest.approx(
        metrics["test/rmse"] * float(dm.target_std), rel=1e-4
    )


def test_mean_and_standard_error_against_numpy():
    values = [0.3, -1.2, 2.5, 0.7, 1.1]
    mean, se = mean_and_standard_error(values)
    assert mean == pytest.approx(np.mean(values))
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(5))


@pytest.mark.slow
def test_multirun_over_splits_and_summary_mean_and_standard_error(uci_dir, tmp_path, capsys):
    """The protocol's command through the real entry point (2 splits, 2 epochs), then summary."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m", "experiment=uci", "dataset.name=toyset", f"dataset.data_dir={uci_dir}",
        "dataset.split=range(2)", f"hydra.sweep.dir={sweep}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lls = [json.loads((sweep / job / "metrics.json").read_text())["test/raw_ll"] for job in "01"]
    summary_main([str(sweep)])
    out = capsys.readouterr().out
    mean, se = mean_and_standard_error(lls)
    assert f"Every job: `experiment=uci dataset.name=toyset dataset.data_dir={uci_dir}" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| - | 2 | ")]
    cells = row.split(" | ")
    header = next(line for line in out.splitlines() if line.startswith("| overrides | splits"))
    column = header.split(" | ").index("test/raw_ll")
    assert cells[1] == "2" and cells[column] == f"{mean:.4g} ± {se:.2g}"
    assert "dataset.split" not in row and (sweep / "summary_splits.csv").is_file()


@pytest.mark.skipif(not (SHARED_UCI / "concrete").is_dir(), reason=f"no UCI copy in {SHARED_UCI}")
def test_concrete_split_through_the_entry_point(tmp_path):
    """The real set: one split, two epochs of experiment=uci through python -m ...train."""
    result = run_cli(
        "experiment=uci", "dataset.name=concrete", f"dataset.data_dir={SHARED_UCI}",
        "dataset.split=3", f"hydra.run.dir={tmp_path / 'run'}", *QUIET,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # 2 epochs: far from the protocol's numbers, but in the target's units (MPa, std 16.7)
    assert 3.0 < metrics["test/raw_rmse"] < 17.0 and -5.0 < metrics["test/raw_ll"] < -2.0
