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

from bbb_lightning.cli.errors import UserError
from bbb_lightning.data import MNISTDataModule
from bbb_lightning.data.idx import read_idx
from bbb_lightning.predict import fit_input_shape, predict, read_input
from bbb_testing import compose_config
from conftest import _trained_run


def run_predict(output_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
    return predict(compose_config(output_dir, *overrides, config_name="predict"))


def write_csv(path: Path, header: list[str], rows) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.fixture(scope="module")
def csv_table(tmp_path_factory) -> Path:
    """120 rows of features a, b, c on very different scales, a numeric target y and a class."""
    generator = np.random.default_rng(0)
    a, b, c = (
        generator.normal(5, 1, 120),
        generator.normal(-20, 5, 120),
        generator.normal(300, 50, 120),
    )
    y = 2 * a - 0.5 * b + 0.01 * c
    kind = np.where(a > 5, "big", "small")
    rows = [[f"{v:.5f}" for v in row[:4]] + [row[4]] for row in zip(a, b, c, y, kind, strict=True)]
    return write_csv(
        tmp_path_factory.mktemp("table") / "table.csv", ["a", "b", "c", "y", "kind"], rows
    )


def train_on_csv(tmp_path_factory, name: str, table: Path, *overrides: str) -> Path:
    return _trained_run(
        tmp_path_factory,
        name,
        "dataset=csv",
        f"dataset.path={table}",
        "trainer.max_epochs=2",
        "model=mlp_small",
        *overrides,
    )


@pytest.fixture(scope="module")
def csv_regression_run(tmp_path_factory, csv_table) -> Path:
    """A run on features [a, b, c] (kind: an extra column) and the target y."""
    overrides = ["dataset.target=y", "dataset.task=regression", "likelihood=gaussian"]
    return train_on_csv(
        tmp_path_factory, "csv_regression", csv_table, *overrides, "dataset.features=[a,b,c]"
    )


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


def test_inputs_in_other_units_than_the_training_data_are_named(tmp_path, mnist_run, mnist_inputs):
    """Pixels 0..255 to a run trained on normalised ones silently gave probabilities of
    exactly 0 and 1. The inputs' range is checked against the training inputs' (kept in the
    checkpoint): one line naming both and raw=true; check_input_range=false predicts anyway."""
    common = [f"ckpt_path={mnist_run}", "eval_samples=2", f"input={mnist_inputs['raw']}"]
    with pytest.raises(UserError) as error:
        run_predict(tmp_path, *common)
    (line,) = error.value.problems
    assert line.startswith(f"input={str(mnist_inputs['raw'])!r}: values span [0, 255] in the ")
    assert "far outside the training inputs' [-0.4242, 2.821]; pass raw=true for inputs in " in line
    assert line.endswith(
        "raw units (pixel values 0..255), or check_input_range=false to predict anyway"
    )
    forced = run_predict(tmp_path, *common, "check_input_range=false")
    assert forced["probs"].shape == (20, 10)
    assert run_predict(tmp_path, *common, "raw=true")["probs"].shape == (20, 10)


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
    # a CSV's errors name the line and the column: its name, or its number without a header
    for name, text, message in [
        ("nan", "1,2\nnan,3\n", r"line 2, column '1': expected a finite number"),
        ("words", "a,b\nc,d\n", r"line 2, column 'a': expected a finite num"),
        ("ragged", "1,2\n\n3\n", r"line 3: 1 fields, the first row has 2$"),
        ("huge", "x\n1e39\n", r"line 2, column 'x': '1e39' does not fit"),
    ]:
        (tmp_path / f"{name}.csv").write_text(text)
        with pytest.raises(UserError, match=rf"{name}\.csv {message}"):
            read_input(tmp_path / f"{name}.csv")
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
        (["raw=no"], r"^raw='no' is not allowed: true or false$"),
        (["save_samples=1"], r"^save_samples=1 is not allowed: true or false$"),
        (
            ["input=SCALAR"],
            r"^input='.*scalar\.npy': shape \(\) \(one number\) does not fit the model: "
            r"expected \(N, 1\)$",
        ),
    ],
)
def test_bad_settings_are_one_line_before_sampling(tmp_path, toy_run, overrides, message):
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 1), dtype=np.float32))
    scalar = tmp_path / "scalar.npy"
    np.save(scalar, np.float32(0.5))
    inputs = tmp_path / "x.npy"
    np.save(inputs, np.zeros((3, 1), dtype=np.float32))
    overrides = [o.replace("EMPTY", str(empty)).replace("SCALAR", str(scalar)) for o in overrides]
    with pytest.raises(UserError, match=message):
        run_predict(tmp_path, f"ckpt_path={toy_run}", f"input={inputs}", *overrides)


def test_csv_columns_are_matched_by_name(tmp_path, csv_regression_run, csv_table):
    with csv_table.open() as handle:
        _, *rows = list(csv.reader(handle))[:11]
    table = np.array([[float(v) for v in row[:4]] for row in rows])  # a, b, c, y
    common = [f"ckpt_path={csv_regression_run}", "eval_samples=4", "raw=true"]

    # No header: the columns in the run's order, as documented.
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(f"{v:.5f}" for v in row[:3]) for row in table) + "\n")
    expected = run_predict(tmp_path, *common, f"input={plain}")["mean"]

    # A header in another order, with the target and another column: matched by name.
    shuffled = write_csv(
        tmp_path / "shuffled.csv",
        ["kind", "c", "y", "a", "b"],
        [[row[4], row[2], row[3], row[0], row[1]] for row in rows],
    )
    assert torch.allclose(run_predict(tmp_path, *common, f"input={shuffled}")["mean"], expected)
    assert torch.allclose(
        read_input(shuffled, ["a", "b", "c"], "y"), torch.tensor(table[:, :3]).float()
    )

    # Excel's "CSV UTF-8": a byte-order mark before the header, whose first column is a feature
    excel = write_csv(
        tmp_path / "excel.csv", ["a", "b", "c"], [[row[0], row[1], row[2]] for row in rows]
    )
    excel.write_bytes(b"\xef\xbb\xbf" + excel.read_bytes())
    assert torch.equal(read_input(excel, ["a", "b", "c"], "y"), torch.tensor(table[:, :3]).float())

    missing = write_csv(tmp_path / "missing.csv", ["c", "a", "y"], [[1, 2, 3]])
    message = r"^input='.*missing\.csv': no column 'b'; the run expects the feature columns a, b, c"
    with pytest.raises(UserError, match=message):
        run_predict(tmp_path, *common, f"input={missing}")


def test_csv_classification_outputs_the_class_labels(tmp_path, tmp_path_factory, csv_table):
    # dataset.features=null: every column but the target, a, b, c and y, read from the table.
    run = train_on_csv(tmp_path_factory, "csv_classification", csv_table, "dataset.target=kind")
    inputs = write_csv(
        tmp_path / "x.csv",
        ["y", "kind", "c", "b", "a"],
        [[0, "big", 300, -20, 3], [9, "", 300, -20, 7]],
    )
    classes = ["big", "small"]  # sorted: the order of the datamodule's class indices
    for suffix in (".csv", ".npz", ".pt"):
        output = tmp_path / f"p{suffix}"
        common = [f"ckpt_path={run}", f"input={inputs}", f"output={output}", "raw=true"]
        results = run_predict(tmp_path, *common)  # the table's own feature values
        labels = [classes[int(i)] for i in results["prediction"]]
        assert results["label"] == labels
        if suffix == ".csv":
            with output.open() as handle:
                header, *rows = list(csv.reader(handle))
            assert header[2:4] == ["prediction", "label"]
            assert [row[3] for row in rows] == labels
        elif suffix == ".npz":
            assert np.load(output)["label"].tolist() == labels
        else:
            assert torch.load(output)["label"] == labels
