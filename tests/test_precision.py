"""Mixed precision: bfloat16 autocast through the real entry point for every estimator, and
float16 with a gradient scaler, whose overflowing steps the non-finite guard leaves to it."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from bbb_lightning.bayes import GaussianPrior
from bbb_lightning.train import train
from bbb_lightning.training.guard import NonFiniteError
from bbb_lightning.training.module import BayesByBackprop
from bbb_lightning.training.objectives import GaussianLikelihood
from bbb_testing import QUICK, SqrtAtZero, compose_config, fit_briefly


@pytest.mark.parametrize("estimator", ["local", "reparameterization", "flipout"])
@pytest.mark.parametrize("num_samples", [1, 3])
def test_bf16_mixed_trains_through_the_entry_point(tmp_path, estimator, num_samples):
    cfg = compose_config(
        tmp_path, *QUICK, "logger=none", "trainer.precision=bf16-mixed",
        f"posterior.estimator={estimator}", f"num_samples={num_samples}",
    )  # fmt: skip
    metrics = train(cfg)
    assert {"test/nll", "val/nll", "test/rmse"} <= set(metrics)
    assert all(math.isfinite(value) for value in metrics.values())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("estimator", ["local", "reparameterization", "flipout"])
def test_under_bf16_autocast_the_network_runs_in_bfloat16_and_the_likelihood_in_float32(
    tmp_path, estimator
):
    model = _model(nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1)), estimator)
    network, likelihood = [], []
    model.net.register_forward_hook(lambda module, args, out: network.append(out.dtype))
    log_prob = model.likelihood.log_prob

    def recording_log_prob(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        likelihood.append(outputs.dtype)
        return log_prob(outputs, y)

    model.likelihood.log_prob = recording_log_prob
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    fit_briefly(model, x, y, tmp_path, plugins=[MixedPrecision("bf16-mixed", "cpu")])
    assert network == [torch.bfloat16] * 4
    assert likelihood == [torch.float32] * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x, 3).dtype == torch.float32  # what validation, test and predict use


def test_float16_overflow_is_left_to_the_gradient_scaler(tmp_path):
    """A scale of 2^24 overflows float16 gradients: the scaler skips those steps and halves
    the scale until they fit, then training proceeds; the guard must not stop the run."""
    torch.manual_seed(0)
    model = _model(nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1)), "local")
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)
    x, y = torch.randn(128, 2), torch.randn(128, 1)
    fit_briefly(
        model, x, y, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], epochs=2
    )
    assert scaler.get_scale() < 2.0**24  # steps were skipped
    after = list(model.parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after)
    assert not all(torch.equal(b, a) for b, a in zip(before, after, strict=True))


def test_a_gradient_infinite_at_any_scale_stops_once_the_scale_is_below_one(tmp_path):
    """From a scale of 4 the scaler skips steps 0, 1, 2 (scales 4, 2, 1); at step 3 the scale
    is 1/2, the scaled gradient is smaller than the true one, and the guard stops the run."""
    model = _model(nn.Sequential(nn.Linear(2, 1), SqrtAtZero()), "reparameterization")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    x, y = torch.randn(32, 2), torch.randn(32, 1)
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of net\.0\..* at step 3;"):
        fit_briefly(
            model, x, y, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
        )


def _model(net: nn.Module, estimator: str) -> BayesByBackprop:
    return BayesByBackprop(
        net=net,
        likelihood=GaussianLikelihood(noise="fixed", noise_std=0.5),
        prior=GaussianPrior(),
        posterior={
            "_target_": "bbb_lightning.bayes.MeanFieldNormal",
            "_partial_": True,
            "rho_init": -3.0,
            "estimator": estimator,
        },
        optimizer={"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.01, "fused": True},
    )
