"""``bbb_lightning.predict``: input formats and shapes, output formats, the uncertainty
decomposition against ``torch.distributions``, raw units, and the command line."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Categorical

from bbb_lightning.config_checks import UserError
from bbb_lightning.data import MNISTDataModule
from bbb_lightning.data.idx import read_idx
from bbb_lightning.predict import fit_input_shape, predict, read_input
from bbb_testing import compose_config


def run_predict(output_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    return predict(compose_config(output_dir, *overrides, config_name="predict"))


@pytest.fixture(scope="module")
def mnist_inputs(mnist_dir, tmp_path_factory) -> dict[str, Path]:
    """The first 20 test digits: normalised and flat (.npy), and raw uint8 pixels (.pt)."""
    folder = tmp_path_factory.mktemp("inputs")
    datamodule = MNISTDataModule(mnist_dir, download=False)
    datamodule.setup("test")
    np.save(folder / "flat.npy", datamodule.test_set.tensors[0][:20].reshape(20, -1).numpy())
    raw = read_idx(next(Path(mnist_dir).glob("**/t10k-images-idx3-ubyte*")))[:20]
    torch.save(raw, folder / "raw.pt")
    return {"flat": folder / "flat.npy", "raw": folder / "raw.pt"}


def test_classification_outputs_and_their_decomposition(tmp_path, mnist_run, mnist_inputs):
    output = tmp_path / "p.pt"
    common = [f"ckpt_path={mnist_run}", "eval_samples=6"]
    results = run_predict(
        tmp_path, *common, f"input={mnist_inputs['flat']}", f"output={output}", "save_samples=true"
    )
    saved = torch.load(output)
    assert set(saved) == {
        "probs",
        "prediction",
        "entropy",
        "expected_entropy",
        "mutual_information",
        "sample_probs",
    }
    probs, sample_probs = saved["probs"], saved["sample_probs"]
    assert probs.shape == (20, 10) and sample_probs.shape == (6, 20, 10)
    assert torch.allclose(sample_probs.mean(0), probs)
    assert torch.allclose(probs.sum(-1), torch.ones(20))
    assert torch.equal(saved["prediction"], probs.argmax(-1))
    assert torch.allclose(saved["entropy"], Categorical(probs=probs).entropy(), atol=1e-5)
    aleatoric = Categorical(probs=sample_probs).entropy().mean(0)
    assert torch.allclose(saved["expected_entropy"], aleatoric, atol=1e-5)
    assert torch.allclose(saved["mutual_information"], saved["entropy"] - aleatoric, atol=1e-5)
    assert torch.equal(results["probs"], probs)

    # Raw pixels with raw=true: the same inputs to the model, so the same predictive (same seed).
    raw = run_predict(tmp_path, *common, f"input={mnist_inputs['raw']}", "raw=true")
    assert torch.allclose(raw["probs"], probs, atol=1e-5)
    assert (tmp_path / "predictions.pt").is_file()  # the default output, in the run dir

    # A table: CSV with a header, the same numbers; samples beside it.
    table = tmp_path / "p.csv"
    run_predict(
        tmp_path, *common, f"input={mnist_inputs['flat']}", f"output={table}", "save_samples=true"
    )
    with table.open() as handle:
        rows = list(csv.reader(handle))
    assert rows[0][:2] == ["probs_0", "probs_1"] and rows[0][-1] == "mutual_information"
    assert len(rows) == 21 and rows[1][10] == str(int(probs[0].argmax()))
    values = torch.tensor([[float(v) for v in row[:10]] for row in rows[1:]])
    assert torch.allclose(values, probs, atol=1e-6)
    assert np.load(tmp_path / "p.samples.npz")["sample_probs"].shape == (6, 20, 10)


def test_regression_outputs(tmp_path, toy_run):
    inputs = tmp_path / "x.csv"
    inputs.write_text("x\n" + "\n".join(f"{v:.3f}" for v in np.linspace(-0.2, 1.2, 15)) + "\n")
    output = tmp_path / "p.npz"
    run_predict(
        tmp_path,
        f"ckpt_path={toy_run}",
        f"input={inputs}",
        f"output={output}",
        "eval_samples=8",
        "save_samples=true",
    )
    saved = {key: torch.from_numpy(value) for key, value in np.load(output).items()}
    assert saved["mean"].shape == (15, 1) and saved["sample_mean"].shape == (8, 15, 1)
    # The law of total variance over the saved draws.
    assert torch.allclose(saved["mean"], saved["sample_mean"].mean(0), atol=1e-6)
    assert torch.allclose(
        saved["epistemic_var"], saved["sample_mean"].var(0, unbiased=False), atol=1e-6
    )
    assert torch.allclose(saved["aleatoric_var"], saved["sample_std"].square().mean(0), atol=1e-6)
    assert torch.allclose(saved["total_var"], saved["epistemic_var"] + saved["aleatoric_var"])

    matrix = tmp_path / "p.npy"
    run_predict(
        tmp_path, f"ckpt_path={toy_run}", f"input={inputs}", f"output={matrix}", "eval_samples=8"
    )
    table = np.load(matrix)
    assert table.shape == (15, 4)  # mean, epistemic_var, aleatoric_var, total_var
    assert np.allclose(table[:, 0], saved["mean"][:, 0].numpy(), atol=1e-6)


def test_input_shapes_and_formats(tmp_path, mnist_run):
    assert fit_input_shape(torch.zeros(28, 28), (1, 28, 28)).shape == (1, 1, 28, 28)
    assert fit_input_shape(torch.zeros(3, 28, 28), (1, 28, 28)).shape == (3, 1, 28, 28)
    assert fit_input_shape(torch.zeros(4, 3), (3,)).shape == (4, 3)
    np.save(tmp_path / "bad.npy", np.zeros((3, 10)))
    message = r"shape \(3, 10\) does not fit the model: expected \(N, 1, 28, 28\) or \(N, 784\)"
    with pytest.raises(UserError, match=message):
        run_predict(tmp_path, f"ckpt_path={mnist_run}", f"input={tmp_path / 'bad.npy'}")
    with pytest.raises(UserError, match=r"unknown suffix '\.txt'"):
        read_input(tmp_path / "x.txt")
    (tmp_path / "nan.csv").write_text("1,2\nnan,3\n")
    with pytest.raises(UserError, match="non-finite"):
        read_input(tmp_path / "nan.csv")
    (tmp_path / "words.csv").write_text("a,b\nc,d\n")
    with pytest.raises(UserError, match="cannot read an array of numbers"):
        read_input(tmp_path / "words.csv")
    with pytest.raises(UserError, match=r"unknown suffix '\.json'"):
        run_predict(tmp_path, f"ckpt_path={mnist_run}", "input=x.npy", "output=out.json")


def test_cli_writes_into_its_run_dir(tmp_path, toy_run):
    np.save(tmp_path / "x.npy", np.linspace(0, 0.5, 9, dtype=np.float32))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bbb_lightning.predict",
            f"ckpt_path={toy_run}",
            "input=x.npy",
            "eval_samples=5",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (output,) = (tmp_path / "outputs" / "predict").glob("*/*/predictions.pt")
    assert torch.load(output)["mean"].shape == (9, 1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["batch_size=0"], r"^batch_size=0 is not allowed: an integer >= 1$"),
        (["device=foo"], r"^device='foo' is not allowed: cpu, cuda or auto$"),
        (["output=/proc/nope/p.pt"], r"^output='/proc/nope/p\.pt': cannot create its directory"),
        (["input=EMPTY"], r"^input='.*empty\.npy' holds no examples$"),
    ],
)
def test_bad_settings_are_one_line_before_sampling(tmp_path, toy_run, overrides, message):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 1), dtype=np.float32))
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.zeros((3, 1), dtype=np.float32))
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(UserError, match=message):
        run_predict(tmp_path, f"ckpt_path={toy_run}", f"input={inputs}", *overrides)
