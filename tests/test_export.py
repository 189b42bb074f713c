"""Exported networks: state dicts load into the plain architecture, TorchScript files load with
``torch.jit.load`` alone (no import of this package) and give the same outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from bbb_lightning.bayes import bayesianize, posterior_mean_network
from bbb_lightning.data import CSVDataModule
from bbb_lightning.evaluate import evaluate
from bbb_lightning.evaluation.export import export_posterior
from bbb_lightning.evaluation.pruning import prune_by_snr
from bbb_lightning.models.nets import MLP
from bbb_testing import compose_config
from conftest import _trained_run

LOAD_WITH_TORCH_ONLY = """
import json, sys, torch
paths, x_path, out_path = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
x = torch.load(x_path)
outputs = {name: torch.jit.load(path)(x) for name, path in paths.items()}
assert not any(name.startswith("bbb_lightning") for name in sys.modules), "package imported"
torch.save(outputs, out_path)
"""


def test_export_posterior_state_dicts_and_torchscript(tmp_path):
    torch.manual_seed(0)
    net = bayesianize(MLP([1, 4, 4], num_outputs=3, hidden=[8]))
    example = torch.randn(2, 1, 4, 4)
    files = export_posterior(net, tmp_path / "export", example, pruned_fraction=0.5)
    assert set(files) == {"posterior_mean", "posterior_draw", "pruned_50"}

    x = torch.randn(7, 1, 4, 4)  # another batch size than the traced example
    references = {"posterior_mean": posterior_mean_network(net)(x), "pruned_50": None}
    references["pruned_50"] = prune_by_snr(net, 0.5)(x)
    for name, reference in references.items():
        plain = MLP([1, 4, 4], num_outputs=3, hidden=[8])
        plain.load_state_dict(torch.load(files[name]["state_dict"]))
        assert torch.allclose(plain(x), reference, atol=1e-6)

    # One posterior draw, fixed once exported: not the mean, and the same on every call.
    draw = MLP([1, 4, 4], num_outputs=3, hidden=[8])
    draw.load_state_dict(torch.load(files["posterior_draw"]["state_dict"]))
    assert not torch.allclose(draw(x), references["posterior_mean"])

    torch.save(x, tmp_path / "x.pt")
    scripts = {name: paths["torchscript"] for name, paths in files.items()}
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            LOAD_WITH_TORCH_ONLY,
            json.dumps(scripts),
            str(tmp_path / "x.pt"),
            str(tmp_path / "out.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outputs = torch.load(tmp_path / "out.pt")
    for name, reference in references.items():
        assert torch.allclose(outputs[name], reference, atol=1e-6)
    assert torch.allclose(outputs["posterior_draw"], draw(x), atol=1e-6)


def test_manifest_units_turn_raw_csv_rows_into_predictions(tmp_path, tmp_path_factory):
    """With only the manifest and the TorchScript file, raw CSV rows give the posterior-mean
    network's predictions in the target's units, as evaluate scored them."""
    generator = np.random.default_rng(0)
    a, b, c = (
        generator.normal(5, 1, 100),
        generator.normal(-20, 5, 100),
        generator.normal(300, 50, 100),
    )
    y = 2 * a - 0.5 * b + 0.01 * c + 40
    table = tmp_path / "table.csv"
    with table.open("w", newline="") as handle:  # the columns in another order than features
        csv.writer(handle).writerows([["c", "y", "b", "a"], *zip(c, y, b, a, strict=True)])
    dataset = [
        "dataset=csv",
        f"dataset.path={table}",
        "dataset.target=y",
        "dataset.task=regression",
    ]
    run = _trained_run(
        tmp_path_factory,
        "csv_export",
        *dataset,
        "dataset.features=[a,b,c]",
        "likelihood=gaussian",
        "model=mlp_small",
        "trainer.max_epochs=2",
    )
    overrides = ["eval_samples=2", "sample_counts=[]", "pruning_fractions=[0.0]", "figures=false"]
    overrides.append("export.enabled=true")
    out = tmp_path / "evaluation"
    metrics = evaluate(compose_config(out, f"ckpt_path={run}", *overrides, config_name="evaluate"))
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    units, target = manifest["input"], manifest["target"]
    assert units["features"] == ["a", "b", "c"] and target["name"] == "y"
    assert "standardised" in target["transform"] and "standardised" in manifest["outputs"]

    # By hand: the raw columns by name, standardised, the network, back to the target's units.
    with table.open() as handle:
        header, *rows = list(csv.reader(handle))
    raw = torch.tensor(
        [[float(row[header.index(name)]) for name in units["features"]] for row in rows]
    )
    x = (raw - torch.tensor(units["mean"])) / torch.tensor(units["std"])
    network = torch.jit.load(
        str(out / "export" / manifest["files"]["posterior_mean"]["torchscript"])
    )
    with torch.no_grad():
        prediction = network(x)[:, 0] * target["std"][0] + target["mean"][0]
    truth = torch.tensor([float(row[header.index("y")]) for row in rows])

    # The test rows evaluate scored: the same inputs, and its RMSE (in standardised units).
    datamodule = CSVDataModule(table, "y", task="regression", features=["a", "b", "c"])
    _, _, test = datamodule._split(len(rows), 0.1, 0.1)
    assert torch.allclose(x[test], datamodule.test_set.tensors[0], atol=1e-5)
    rmse = ((prediction[test] - truth[test]) / target["std"][0]).square().mean().sqrt().item()
    assert metrics["pruning/rmse/p=0"] == pytest.approx(rmse, rel=1e-4)
