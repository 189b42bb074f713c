"""docs/extending.md's recipe, proven by use: a posterior defined in this test file (one
class, nothing else) and the shipped radial posterior train through ``python -m
bbb_lightning.train``, with their sigma and SNR histograms in TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal

from bbb_lightning.bayes import VariationalPosterior
from bbb_lightning.bayes.priors import Prior
from bbb_testing import QUICK, events, run_cli

TESTS = Path(__file__).parent


class ExpNormal(VariationalPosterior):
    """q(w) = N(mu, exp(rho)^2): a user's posterior, written only against the base class."""

    def __init__(self, initial_value: Tensor, prior: Prior, rho_init: float = -4.0) -> None:
        super().__init__(prior)
        self.mu = nn.Parameter(initial_value.detach().clone())
        self.rho = nn.Parameter(torch.full_like(self.mu, rho_init))

    @property
    def mean(self) -> Tensor:
        return self.mu

    def distribution(self) -> Normal:
        return Normal(self.mu, self.rho.exp())

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        return self.distribution().rsample(sample_shape)

    def set_mean_(self, value: Tensor) -> None:
        with torch.no_grad():
            self.mu.copy_(value)


def _trained(tmp_path: Path, *overrides: str) -> Path:
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    result = run_cli(*QUICK, "hydra.run.dir=run", *overrides, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(value == value for value in metrics.values())  # no NaN
    histograms = events(run_dir).Tags()["histograms"]
    for name in ("weights/sigma/net.layers.1.weight", "weights/snr/net.layers.1.weight"):
        assert any(tag.startswith(name) for tag in histograms), histograms
    return run_dir


# The recipe's one YAML, in a config folder of the user's own (hydra.searchpath).
EXP_NORMAL_YAML = """\
_target_: test_extending.ExpNormal
_partial_: true
rho_init: -4.0
estimator: reparameterization
"""


@pytest.mark.slow
def test_a_posterior_from_a_test_file_trains_through_the_entry_point(tmp_path: Path) -> None:
    conf = tmp_path / "my_conf"
    (conf / "posterior").mkdir(parents=True)
    (conf / "posterior" / "exp_normal.yaml").write_text(EXP_NORMAL_YAML)
    _trained(tmp_path, f"hydra.searchpath=[file://{conf}]", "posterior=exp_normal")


@pytest.mark.slow
def test_the_radial_posterior_trains_through_the_entry_point(tmp_path: Path) -> None:
    _trained(tmp_path, "posterior=radial")
