"""Exported networks: state dicts load into the plain architecture, TorchScript files load with
``torch.jit.load`` alone (no import of this package) and give the same outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from bbb_lightning.bayes import bayesianize, posterior_mean_network
from bbb_lightning.export import export_posterior
from bbb_lightning.nets import MLP
from bbb_lightning.pruning import prune_by_snr

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
