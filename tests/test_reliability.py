"""Reliability: non-finite guard, exact resume after SIGKILL, reproducibility, nothing lost."""

from __future__ import annotations

import functools
import hashlib
import json
import signal
import subprocess
import sys
import time

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from bbb_lightning.bayes import GaussianPrior, MeanFieldNormal
from bbb_lightning.cli.errors import UserError
from bbb_lightning.storage.checkpoints import ModelCheckpoint
from bbb_lightning.train import train
from bbb_lightning.training.guard import NonFiniteError, first_nonfinite
from bbb_lightning.training.module import BayesByBackprop
from bbb_lightning.training.objectives import GaussianLikelihood
from bbb_testing import SqrtAtZero, compose_config, events, fit_briefly, run_cli

QUIET = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def _without_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "fit_seconds"}


# -- non-finite loss and gradients -------------------------------------------------------------
@pytest.mark.parametrize(
    ("tensors", "named"),
    [
        ([[1.0, 2.0], [3.0, -4.0]], None),
        ([[3e38, 3e38], [1.0, 2.0]], None),  # the sum overflows, no element is non-finite
        ([[1.0, 2.0], [1.0, float("nan")]], "t1"),
        ([[float("inf"), float("-inf")], [1.0, 2.0]], "t0"),  # inf - inf: the sum is NaN
        ([[1.0, float("-inf")], [float("nan"), 0.0]], "t0"),
    ],
)
def test_first_nonfinite_names_the_first_tensor_with_a_nan_or_infinity(tensors, named):
    given = [(f"t{i}", torch.tensor(values)) for i, values in enumerate(tensors)]
    assert first_nonfinite([*given, ("absent", None)]) == named


def _model(net: nn.Module, on_nonfinite: str) -> BayesByBackprop:
    return BayesByBackprop(
        net=net,
        likelihood=GaussianLikelihood(noise="fixed", noise_std=0.5),
        prior=GaussianPrior(),
        posterior=functools.partial(MeanFieldNormal, rho_init=-3.0),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01),
        on_nonfinite=on_nonfinite,
    )


class SnapshotWeights(pl.Callback):
    def __init__(self) -> None:
        self.weights: dict[int, list[torch.Tensor]] = {}

    def _mu(self, pl_module: BayesByBackprop) -> torch.Tensor:
        return pl_module.net[0].weight_posterior.mu.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[batch_idx] = [self._mu(pl_module)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[batch_idx].append(self._mu(pl_module))


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nan_target_is_skipped_and_counted(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    y[5] = float("nan")  # the second of four minibatches
    model = _model(nn.Sequential(nn.Linear(2, 1)), "skip")
    snapshots = SnapshotWeights()
    fit_briefly(model, x, y, tmp_path, callbacks=[snapshots])
    assert model.skipped_steps == 1
    before, after = snapshots.weights[1]
    assert torch.equal(before, after)  # the bad step changed nothing
    assert not torch.equal(*snapshots.weights[2])  # the next one trained on
    assert _finite(model)


def test_nan_target_stops_with_the_step_the_term_and_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(16, 2), torch.randn(16, 1)
    y[5] = float("nan")
    model = _model(nn.Sequential(nn.Linear(2, 1)), "stop")
    with pytest.raises(
        NonFiniteError, match=r"^non-finite NLL \(nll=nan, kl=.*\) at step 1; "
    ) as error:
        fit_briefly(model, x, y, tmp_path)
    (saved,) = tmp_path.glob("nonfinite-step1-last-good.ckpt")
    assert str(saved) in str(error.value)
    state = torch.load(saved, weights_only=False)["state_dict"]
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    assert _finite(model)


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_infinite_gradient_with_a_finite_loss_is_caught(tmp_path, mode):
    torch.manual_seed(0)
    model = _model(nn.Sequential(nn.Linear(2, 1), SqrtAtZero()), mode)
    x, y = torch.randn(8, 2), torch.randn(8, 1)
    if mode == "stop":
        expected = r"non-finite gradient of net\.0\.weight_posterior"
        with pytest.raises(NonFiniteError, match=expected):
            fit_briefly(model, x, y, tmp_path)
    else:
        fit_briefly(model, x, y, tmp_path)
        assert model.skipped_steps == 2
    assert _finite(model)


def test_cli_reports_a_diverging_run_in_one_line(tmp_path):
    result = run_cli("optimizer.lr=1e30", "hydra.run.dir=run", *QUIET, cwd=tmp_path)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert "at step" in line and "likely causes" in line
    assert "Traceback" not in result.stderr


# -- reproducibility and resume ------------------------------------------------------------------
def test_same_seed_gives_identical_metrics(tmp_path):
    runs = [train(compose_config(tmp_path / name, "trainer.max_epochs=3", *QUIET)) for name in "ab"]
    assert _without_timing(runs[0]) == _without_timing(runs[1])
    other = train(compose_config(tmp_path / "c", "trainer.max_epochs=3", "seed=1", *QUIET))
    assert _without_timing(other) != _without_timing(runs[0])


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    overrides = ["trainer.max_epochs=40", "kl.warmup_steps=60", "kl.weighting=minibatch", *QUIET]
    reference = train(compose_config(tmp_path / "reference", *overrides))

    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "bbb_lightning.train", f"hydra.run.dir={killed_dir}", *overrides],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() or torch.load(last, weights_only=False)["epoch"] < 10:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed_dir / "metrics.json").exists()  # it really was cut off

    resumed = train(compose_config(tmp_path / "resumed", *overrides, f"ckpt_path={last}"))
    assert _without_timing(resumed) == pytest.approx(_without_timing(reference), rel=1e-6)


def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(tmp_path):
    """last.ckpt from the validation after 4 of an epoch's 8 minibatches (max_steps stops the
    run there): the resumed run trains on minibatches 5 to 8 of that epoch, where Lightning
    alone would restart the epoch's order and train on minibatches 1 to 4 again."""
    overrides = [
        "trainer.max_epochs=2",
        "dataset.batch_size=64",
        "kl.weighting=minibatch",
        "kl.warmup_steps=5",
        "+trainer.val_check_interval=0.5",
        *QUIET,
    ]
    reference = train(compose_config(tmp_path / "reference", *overrides))
    train(compose_config(tmp_path / "cut", *overrides, "+trainer.max_steps=4"))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    resumed = train(compose_config(tmp_path / "resumed", *overrides, f"ckpt_path={last}"))
    assert _without_timing(resumed) == pytest.approx(_without_timing(reference), rel=1e-6)
    # the epoch means logged for the interrupted epoch cover all of its minibatches
    assert _epoch_scalars(tmp_path / "resumed") == pytest.approx(
        _epoch_scalars(tmp_path / "reference"), rel=1e-6
    )


@pytest.mark.parametrize(
    ("overrides", "last_step"),
    [
        # the best val/nll (here, with mode=max, the worst: epoch 0) is not the last epoch
        (["trainer.max_epochs=3", "callbacks.model_checkpoint.mode=max"], 12),
        # max_steps ends the run mid-epoch, after the last validation
        (["trainer.max_epochs=3", "+trainer.max_steps=6"], 6),
    ],
)
def test_last_checkpoint_is_the_latest_state(tmp_path, overrides, last_step):
    """Lightning 2.6 rewrites last.ckpt only when it saves a top-k file: it stayed at the best
    epoch, and a resume from it repeated every later epoch. Ours is the run's final state."""
    train(compose_config(tmp_path, *overrides, *QUIET))
    folder = tmp_path / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=False)
    assert last["global_step"] == last_step  # 4 minibatches per epoch
    best = [path for path in folder.glob("epoch*.ckpt")]
    assert len(best) == 1  # top-1 by val/nll, as configured
    assert torch.load(best[0], weights_only=False)["global_step"] == 4  # epoch 0


@pytest.mark.parametrize(
    ("change", "expected_group", "keeps_state"),
    [
        (["optimizer.lr=0.1"], {"lr": 0.1, "fused": True}, True),
        (["optimizer=sgd", "optimizer.lr=0.05"], {"lr": 0.05, "momentum": 0.9}, False),
    ],
)
def test_a_resumed_run_trains_with_the_configured_optimizer(
    tmp_path, change, expected_group, keeps_state
):
    """Lightning restored the checkpoint's optimizer over the configured one: a resume with a
    new learning rate kept the old one, and one with another optimizer failed at its first
    step (KeyError: 'momentum'). Adam's moments and step counts carry over to Adam."""
    train(compose_config(tmp_path / "first", "trainer.max_epochs=1", *QUIET))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    overrides = ["trainer.max_epochs=2", f"ckpt_path={last}", *change, *QUIET]
    train(compose_config(tmp_path / "resumed", *overrides))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    (optimizer,) = resumed["optimizer_states"]
    (group,) = optimizer["param_groups"]
    assert {key: group[key] for key in expected_group} == expected_group
    steps = {float(state["step"]) for state in optimizer["state"].values() if "step" in state}
    assert steps == ({8.0} if keeps_state else set())  # 4 minibatches per epoch


def test_a_resumed_run_keeps_its_place_in_the_learning_rate_schedule(tmp_path):
    """With scheduler=..., the resumed optimizer took the configured (base) learning rate
    back: a run resumed after a milestone trained at the undecayed rate. It resumes where the
    schedule was, exactly as an uninterrupted run; a new base rate rescales the schedule."""
    schedule = ["scheduler=multistep", "scheduler.milestones=[1,2]", *QUIET]
    reference = train(compose_config(tmp_path / "reference", "trainer.max_epochs=3", *schedule))
    rates = [event.value for event in events(tmp_path / "reference").Scalars("train/lr")]
    assert rates == pytest.approx([rates[0], rates[0] / 10, rates[0] / 100], rel=1e-6)
    train(compose_config(tmp_path / "cut", "trainer.max_epochs=2", *schedule))
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    resumed = [f"ckpt_path={last}", "trainer.max_epochs=3", *schedule]
    metrics = train(compose_config(tmp_path / "resumed", *resumed))
    assert _without_timing(metrics) == pytest.approx(_without_timing(reference), rel=1e-6)
    train(compose_config(tmp_path / "new_base", *resumed, "optimizer.lr=0.05"))
    (event,) = events(tmp_path / "new_base").Scalars("train/lr")
    assert event.value == pytest.approx(0.05 / 100, rel=1e-6)  # the new base at epoch 2


def _epoch_scalars(run_dir) -> dict[str, float]:
    """The per-epoch training scalars a run logged to TensorBoard: "name@step" -> value."""
    accumulator = events(run_dir)
    names = [f"train/{name}_epoch" for name in ("loss", "nll", "kl", "kl_weight", "elbo")]
    return {
        f"{name}@{event.step}": event.value
        for name in (*names, "train/rmse")
        for event in accumulator.Scalars(name)
    }


# -- nothing lost ---------------------------------------------------------------------------------
def test_a_new_run_never_overwrites_an_earlier_one(tmp_path):
    train(compose_config(tmp_path, "trainer.max_epochs=1", *QUIET))
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="already holds a run"):
        train(compose_config(tmp_path, "trainer.max_epochs=1", *QUIET))
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_the_entry_point_refuses_before_hydra_writes_over_an_earlier_run(tmp_path):
    """Hydra writes .hydra/ and train.log before the task runs: the refusal must come first."""
    run = ["hydra.run.dir=run", "trainer.max_epochs=1", *QUIET]
    assert run_cli(*run, cwd=tmp_path).returncode == 0
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}
    again = run_cli(*run, "dataset=mnist", cwd=tmp_path)
    assert again.returncode == 1
    assert sum("already holds a run" in line for line in again.stderr.splitlines()) == 1
    assert "Traceback" not in again.stderr
    after = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in after} == before


def test_a_multirun_refuses_a_sweep_dir_that_holds_an_earlier_one_before_writing(tmp_path):
    """Hydra writes multirun.yaml and each job's .hydra/ and train.log before the task runs,
    and SweepSummary rewrites summary.md after it: the refusal must come before all of them."""
    sweep = tmp_path / "sweep"
    run = ["-m", "prior=gaussian,laplace", f"hydra.sweep.dir={sweep}", *QUIET]
    fast = ["trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    first = run_cli(*run, *fast, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert {sweep / "multirun.yaml", sweep / "summary.md", sweep / "0" / "train.log"} <= set(files)

    def state(paths):
        return {p: (p.stat().st_mtime_ns, hashlib.md5(p.read_bytes()).hexdigest()) for p in paths}

    before = state(files)
    again = run_cli(*run, *fast, "trainer.max_epochs=2", cwd=tmp_path)
    assert again.returncode == 1
    errors = [line for line in again.stderr.splitlines() if "already holds a multirun" in line]
    assert errors == [
        f"[bbb_lightning.cli.hydra_callbacks][ERROR] - hydra.sweep.dir={str(sweep)!r} is not "
        "allowed: "
        "it already holds a multirun (multirun.yaml, 0/, 1/); choose a new hydra.sweep.dir (or "
        "leave it to its default multirun/<date>/<time>), or resume one of its jobs with "
        "hydra.run.dir=<its job dir> ckpt_path=<its checkpoints/last.ckpt>"
    ], again.stderr[-2000:]
    assert "Traceback" not in again.stderr
    assert state(p for p in sweep.rglob("*") if p.is_file()) == before


def test_resuming_into_its_own_directory_keeps_the_runs_network_and_data(tmp_path):
    """Hydra would rewrite the run's saved config, from which evaluate rebuilds the network."""
    run = ["hydra.run.dir=run", "trainer.max_epochs=1", *QUIET]
    assert run_cli(*run, cwd=tmp_path).returncode == 0
    saved = (tmp_path / "run" / ".hydra" / "config.yaml").read_bytes()
    resume = ["ckpt_path=run/checkpoints/last.ckpt", "trainer.max_epochs=2"]
    changed = run_cli(*run, *resume, "model.net.hidden=[8]", cwd=tmp_path)
    assert changed.returncode == 1 and "with other model settings than its own" in changed.stderr
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_bytes() == saved
    assert run_cli(*run, *resume, cwd=tmp_path).returncode == 0  # more epochs: a resume


@pytest.mark.slow
def test_a_failing_multirun_job_does_not_stop_the_others(tmp_path):
    result = run_cli(
        "-m",
        "prior.scale=-1.0,1.0",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *QUIET,
        cwd=tmp_path,
    )
    assert result.returncode != 0  # the sweep as a whole reports the failure
    assert json.loads((tmp_path / "sweep" / "1" / "metrics.json").read_text())["test/nll"]
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    # printed at the end, where it is written; the overrides all jobs share named once
    assert f"The sweep ({tmp_path / 'sweep' / 'summary.md'}, also summary.csv):" in result.stdout
    assert summary in result.stdout
    assert "Every job: `trainer.max_epochs=1 callbacks.progress_bar=null" in summary
    assert "| 0 | failed | prior.scale=-1.0 |" in summary
    assert "prior.scale=-1.0 is not allowed: a finite number > 0" in summary
    assert "| 1 | ok | prior.scale=1.0" in summary


def test_a_run_resumed_elsewhere_keeps_the_earlier_directorys_best(tmp_path):
    """Lightning restarts its top-k bookkeeping in a new directory: the resumed run tested the
    best epoch after the resume although an earlier one, in the first directory, was better."""
    earlier = tmp_path / "first" / "epoch001.ckpt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"a checkpoint")
    saved = ModelCheckpoint(dirpath=tmp_path / "first", monitor="val/nll", mode="min")
    saved.best_model_path, saved.best_model_score = str(earlier), torch.tensor(1.0)
    resumed = ModelCheckpoint(dirpath=tmp_path / "second", monitor="val/nll", mode="min")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        resumed.load_state_dict(saved.state_dict())
    assert resumed.best() == (str(earlier), torch.tensor(1.0))  # nothing better here yet
    resumed.best_model_path, resumed.best_model_score = "second/e2.ckpt", torch.tensor(1.5)
    assert resumed.best() == (str(earlier), torch.tensor(1.0))
    resumed.best_model_score = torch.tensor(0.5)  # a better epoch after the resume
    assert resumed.best() == ("second/e2.ckpt", torch.tensor(0.5))
    again = ModelCheckpoint(dirpath=tmp_path / "third", monitor="val/nll", mode="min")
    resumed.best_model_score = torch.tensor(1.5)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        again.load_state_dict(resumed.state_dict())  # carried on through a second resume
    assert again.best() == (str(earlier), torch.tensor(1.0))
    earlier.unlink()
    assert again.best() == ("", None)  # gone from disk: not tested
