"""End to end through the real config and entry points: runs, files, TensorBoard, errors."""

from __future__ import annotations

import json

import pytest
import torch

from bbb_lightning.bayes import kl_divergence, posterior_mean
from bbb_lightning.cli.errors import UserError
from bbb_lightning.train import train
from bbb_lightning.training.guard import NonFiniteError
from bbb_lightning.training.module import BayesByBackprop
from bbb_testing import QUICK, compose_config, events, hparams_plugin, run_cli


def test_default_run_writes_metrics_checkpoints_and_tensorboard(tmp_path):
    cfg = compose_config(tmp_path, *QUICK, "callbacks.regression_figure.every_n_epochs=1")
    metrics = train(cfg)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert {"test/nll", "test/rmse", "val/nll", "val/rmse"} <= set(metrics)
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()

    accumulator = events(tmp_path)
    tags = accumulator.Tags()
    for name in ("loss", "nll", "kl", "kl_weight", "elbo"):
        steps = [event.value for event in accumulator.Scalars(f"train/{name}_step")]
        epochs = [event.value for event in accumulator.Scalars(f"train/{name}_epoch")]
        assert len(steps) == 8 and len(epochs) == 2  # 512 examples in 4 batches of 128, 2 epochs
        for epoch, mean in enumerate(epochs):  # equal batches: the mean of the step values
            assert mean == pytest.approx(sum(steps[4 * epoch : 4 * epoch + 4]) / 4, rel=1e-5)
    scalars = set(tags["scalars"])
    assert {"val/nll", "val/rmse", "z_hparams/test/nll", "z_hparams/best/val/nll"} <= scalars
    # the Scalars tab opens on the first two groups: the curves, not `epoch`, `hp/*` or `test/*`
    assert sorted({tag.split("/")[0] for tag in scalars}) == [
        "train",
        "val",
        "weights",
        "z_hparams",
    ]
    assert any(tag.startswith("weights/sigma/net.") for tag in tags["histograms"])
    assert set(tags["images"]) == {"val/predictive"}  # no classification figures
    # the per-layer KL of the final network sums to its KL
    model = BayesByBackprop.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    layer_kls = [accumulator.Scalars(t)[-1] for t in scalars if t.startswith("weights/kl/")]
    assert len(layer_kls) == 3 and {event.step for event in layer_kls} == {8}
    total = float(kl_divergence(model.net))
    assert sum(event.value for event in layer_kls) == pytest.approx(total, rel=1e-5)
    experiment, session = hparams_plugin(accumulator)
    # the sizes filled from the dataset, not the config's null
    assert session.hparams["model.net.input_shape"].string_value == "[1]"
    assert session.hparams["model.net.num_outputs"].number_value == 1
    assert session.hparams["likelihood.target_dim"].number_value == 1
    columns = [info.display_name for info in experiment.metric_infos]
    assert columns == [  # the tab shows the first five
        *("best/val/nll", "test/nll", "test/rmse", "val/nll", "val/rmse", "epochs", "fit_seconds")
    ]
    for info in experiment.metric_infos:
        assert metrics[info.display_name] == pytest.approx(
            accumulator.Scalars(info.name.tag)[-1].value, rel=1e-6
        )


@pytest.mark.parametrize(
    ("overrides", "figure_steps"),
    [
        (["trainer.max_epochs=3", "callbacks.regression_figure.every_n_epochs=2"], [8, 12]),
        # no epoch limit, stopped by max_steps: the final figure only (it was one per epoch)
        (["trainer.max_epochs=-1", "+trainer.max_steps=12"], [12]),
    ],
)
def test_the_regression_figure_every_n_epochs_and_at_the_end(tmp_path, overrides, figure_steps):
    train(compose_config(tmp_path, *overrides, "callbacks.progress_bar=null"))
    images = events(tmp_path).Images("val/predictive")
    assert [image.step for image in images] == figure_steps  # 4 steps per epoch


def test_checkpoint_reloads_without_arguments(tmp_path):
    train(compose_config(tmp_path, *QUICK, "logger=csv"))
    model = BayesByBackprop.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(
        model.state_dict()["net.layers.1.weight_posterior.mu"],
        state["net.layers.1.weight_posterior.mu"],
    )
    x = torch.linspace(0, 0.5, 7).unsqueeze(1)
    with posterior_mean(model.net):
        assert model(x, 1).shape == (1, 7, 1)


@pytest.mark.parametrize(
    "overrides",
    [
        ["prior=scale_mixture", "kl.weighting=minibatch"],
        ["prior=laplace", "posterior.estimator=flipout"],
        ["prior=empirical", "posterior.estimator=reparameterization", "num_samples=3"],
        ["likelihood.noise=heteroscedastic", "kl.reduction=mean", "kl.warmup_steps=5"],
        ["model=cnn", "dataset=mnist", "+dataset.limit_train=256", "trainer.limit_val_batches=2"],
    ],
    ids=["scale-mixture", "laplace-flipout", "empirical-S3", "heteroscedastic", "mnist-cnn"],
)
def test_config_choices_train(tmp_path, mnist_dir, overrides):
    cfg = compose_config(
        tmp_path,
        "trainer.max_epochs=1",
        "trainer.limit_test_batches=2",
        "callbacks.progress_bar=null",
        f"dataset.data_dir={mnist_dir}" if "dataset=mnist" in overrides else "seed=1",
        *overrides,
    )
    metrics = train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())


def test_mnist_mlp_learns(tmp_path, mnist_dir):
    cfg = compose_config(
        tmp_path,
        "dataset=mnist",
        "model=mlp",
        f"dataset.data_dir={mnist_dir}",
        "+dataset.limit_train=5000",
        "trainer.max_epochs=2",
        "callbacks.progress_bar=null",
    )
    metrics = train(cfg)
    assert metrics["test/accuracy"] > 0.85
    assert 0 <= metrics["test/ece"] < 0.1
    accumulator = events(tmp_path)
    tags = accumulator.Tags()
    assert {"train/accuracy", "train/ece", "val/accuracy", "val/ece"} <= set(tags["scalars"])
    # each validation epoch (40 steps of 128): a reliability diagram, the most uncertain
    # examples, the KL of each of the MLP's three layers
    assert {"val/reliability", "val/most_uncertain"} == set(tags["images"])
    for tag in ("val/reliability", "val/most_uncertain"):
        assert [image.step for image in accumulator.Images(tag)] == [40, 80]
    layers = {tag for tag in tags["scalars"] if tag.startswith("weights/kl/")}
    assert layers == {f"weights/kl/net.layers.{i}" for i in (1, 3, 5)}


def test_csv_dataset(tmp_path):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=generator)
    label = (x[:, 0] + x[:, 1] > 0).long()
    table = tmp_path / "table.csv"
    rows = ["a,b,c,label"] + [
        f"{a:.4f},{b:.4f},{c:.4f},{'yes' if y else 'no'}"
        for (a, b, c), y in zip(x.tolist(), label, strict=True)
    ]
    table.write_text("\n".join(rows) + "\n")
    cfg = compose_config(
        tmp_path / "run",
        "dataset=csv",
        f"dataset.path={table}",
        "dataset.target=label",
        "model=mlp_small",
        "trainer.max_epochs=20",
        "optimizer.lr=0.01",
        "callbacks.progress_bar=null",
    )
    metrics = train(cfg)
    assert metrics["test/accuracy"] > 0.8


def test_cli_runs_from_any_directory_into_outputs(tmp_path):
    result = run_cli(*QUICK, "trainer.max_epochs=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (metrics_file,) = (tmp_path / "outputs").glob("*/*/metrics.json")
    run_dir = metrics_file.parent
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # extras.print_config=false: no config tree printed or saved
    assert "CONFIG" not in result.stdout and not (run_dir / "config_tree.log").exists()
    experiment, session = hparams_plugin(events(run_dir))
    # a single run is named by its overrides (what it prints left out); their keys come first
    overrides = [o for o in QUICK if not o.startswith("extras.")] + ["trainer.max_epochs=1"]
    assert session.group_name.startswith(" ".join(overrides) + " · ")
    differing = {info.name for info in experiment.hparam_infos if info.differs}
    assert differing == {
        "trainer.max_epochs",
        "callbacks.progress_bar",
        "trainer.enable_model_summary",
    }
    assert session.hparams["trainer.enable_model_summary"].bool_value is False


@pytest.mark.slow
def test_multirun_gives_one_run_per_combination(tmp_path):
    result = run_cli(
        "-m",
        "prior=gaussian,scale_mixture",
        "kl.weighting=uniform,minibatch",
        "trainer.max_epochs=1",
        "callbacks.progress_bar=null",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    job_dirs = sorted(p for p in (tmp_path / "multirun").iterdir() if p.is_dir())
    assert [p.name for p in job_dirs] == ["0", "1", "2", "3"]
    seen = set()
    trial_names = []
    for job in job_dirs:
        assert json.loads((job / "metrics.json").read_text())["test/nll"] > -10
        experiment, session = hparams_plugin(events(job))
        # the HParams tab: the swept choices first, the trial named by them (not 0/tensorboard)
        differing = [info.name for info in experiment.hparam_infos if info.differs]
        assert sorted(differing) == ["kl.weighting", "prior"]
        assert session.hparams["prior"].string_value in ("gaussian", "scale_mixture")
        trial_names.append(session.group_name.split(" · ")[0])
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(
            tuple(
                line for line in overrides.splitlines() if "prior=" in line or "weighting" in line
            )
        )
    assert len(seen) == 4
    assert trial_names == [
        f"prior={prior} kl.weighting={weighting}"
        for prior in ("gaussian", "scale_mixture")
        for weighting in ("uniform", "minibatch")
    ]


BAD_INPUTS = [  # docs/errors.md, row by row
    (
        "kl.weighting=linear",
        "kl.weighting='linear' is not allowed: one of ['uniform', 'minibatch']",
    ),
    ("kl.scale=-1", "kl.scale=-1 is not allowed: a number >= 0"),
    ("num_samples=0", "num_samples=0 is not allowed: an integer >= 1"),
    ("eval_samples=abc", "eval_samples='abc' is not allowed: an integer >= 1"),
    ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed: a number > 0"),
    ("trainer.max_epochs=-5", "trainer.max_epochs=-5 is not allowed: an integer >= 1"),
    ("posterior.estimator=magic", "posterior.estimator='magic' is not allowed"),
    ("prior.scale=-1", "prior.scale=-1 is not allowed: a finite number > 0"),
    ("prior=scale_mixture prior.pi=1.5", "prior.pi=1.5 is not allowed: a number in (0, 1)"),
    ("posterior.rho_init=[1,0]", "posterior.rho_init=[1, 0] is not allowed: a number or [low, "),
    ("dataset.batch_size=abc", "dataset.batch_size='abc' is not allowed: an integer >= 1"),
    ("model.net.activation=foo", "model.net.activation='foo' is not allowed: one of relu"),
    ("dataset.noise_std=-1", "dataset.noise_std=-1 is not allowed: a number >= 0"),
    ("dataset=mnist dataset.data_dir=/nonexistent dataset.download=false", "/nonexistent"),
    ("dataset=csv dataset.path=missing.csv dataset.target=y", "missing.csv"),
    ("dataset=csv dataset.path={table} dataset.target=nope", "target column 'nope' not in"),
    ("model.net.input_shape=[3]", "an input of shape (1,) does not fit the network"),
    ("trainer=gpu", "trainer.accelerator='gpu' is not allowed: no CUDA GPU on this machine"),
    ("ckpt_path=/nonexistent.ckpt", "ckpt_path='/nonexistent.ckpt' is not allowed"),
    ("ckpt_path={damaged}", "is not allowed: not a checkpoint (not a zip archive"),
    ("on_nonfinite=ignore", "on_nonfinite='ignore' is not allowed: one of ['stop', 'skip']"),
    ("retain_freed_memory=maybe", "retain_freed_memory='maybe' is not allowed: true or false"),
    ("optimizer.fused=maybe", "optimizer.fused='maybe' is not allowed: true or false"),
    ("kl.monte_carlo=maybe", "kl.monte_carlo='maybe' is not allowed: true or false"),
    (
        "+trainer.accumulate_grad_batches=0",
        "trainer.accumulate_grad_batches=0 is not allowed: an integer >= 1",
    ),
    (
        "trainer.check_val_every_n_epoch=0",
        "trainer.check_val_every_n_epoch=0 is not allowed: an integer >= 1",
    ),
    (
        "trainer.log_every_n_steps=-1",
        "trainer.log_every_n_steps=-1 is not allowed: an integer >= 1",
    ),
    (
        "trainer.min_epochs=5 trainer.max_epochs=2",
        "trainer.min_epochs=5 is not allowed: at most trainer.max_epochs=2",
    ),
    ("trainer.min_epochs=-1", "trainer.min_epochs=-1 is not allowed: null or an integer >= 0"),
    ("trainer.deterministic=maybe", "trainer.deterministic='maybe' is not allowed: true, false"),
    ("trainer.enable_model_summary=3", "trainer.enable_model_summary=3 is not allowed: true or"),
    ("trainer.fast_dev_run=-1", "trainer.fast_dev_run=-1 is not allowed: true, false or an int"),
    ("trainer.overfit_batches=1.5", "trainer.overfit_batches=1.5 is not allowed: 0 (off), an"),
    ("trainer.profiler=fancy", "trainer.profiler='fancy' is not allowed: null, one of ['simple'"),
    ("trainer.detect_anomaly=maybe", "trainer.detect_anomaly='maybe' is not allowed: true or fa"),
    ("tags=baseline", "tags='baseline' is not allowed: a list of names, e.g. tags=[baseline,"),
    ("extras.print_config=maybe", "extras.print_config='maybe' is not allowed: true or false"),
    ("+trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5 is not allowed: null"),
    (
        "+trainer.val_check_interval=100",
        "trainer.val_check_interval=100 is not allowed: an epoch has 4 training batches",
    ),
    (
        "trainer.limit_train_batches=0.01",
        "trainer.limit_train_batches=0.01 is not allowed: it keeps less than one of the 4",
    ),
    (
        "trainer.limit_val_batches=0.001",
        "trainer.limit_val_batches=0.001 is not allowed: it keeps less than one of the 2 valid",
    ),
    (
        "trainer.limit_test_batches=0.001",
        "trainer.limit_test_batches=0.001 is not allowed: it keeps less than one of the 2 test",
    ),
    (
        "callbacks.posterior_histograms.every_n_epochs=0",
        "callbacks.posterior_histograms.every_n_epochs=0 is not allowed: an integer >= 1",
    ),
    (
        "callbacks.classification_figures.num_examples=0",
        "callbacks.classification_figures.num_examples=0 is not allowed: an integer >= 1",
    ),
    ("posterior.rho_init=abc", "posterior.rho_init='abc' is not allowed: a number or [low,"),
    (  # was a traceback from inside training (a tensor of 0 elements)
        "model.net.hidden=[0]",
        "model.net.hidden=[0] is not allowed: a list of integers >= 1",
    ),
]


@pytest.mark.parametrize(("override", "message"), BAD_INPUTS)
def test_bad_input_is_named_before_anything_runs(tmp_path, override, message):
    table = tmp_path / "table.csv"
    table.write_text("a,y\n1,0\n2,1\n")
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(b"PK\x03\x04 not really a checkpoint")
    overrides = override.format(table=table, damaged=damaged).split()
    if "gpu" in override and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError) as error:
        train(compose_config(tmp_path / "run", *overrides))
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()  # nothing was written


@pytest.mark.parametrize(("override", "message"), [BAD_INPUTS[0], BAD_INPUTS[7], BAD_INPUTS[11]])
def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path, override, message):
    result = run_cli(*override.split(), cwd=tmp_path)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_reports_a_bad_native_switch_in_one_line(tmp_path):
    result = run_cli(cwd=tmp_path, env={"BBB_LIGHTNING_NATIVE": "fast"})
    assert result.returncode == 1
    message = "BBB_LIGHTNING_NATIVE must be 0 or 1 (or false/true, off/on), got 'fast'"
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_choice_lists_the_options(tmp_path):
    result = run_cli("prior=cauchy", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "prior=cauchy: no choice 'cauchy' in prior (the choices: empirical, gaussian, laplace, "
        "scale_mixture)"
    ) in result.stderr


def test_a_run_with_excluded_parameters_writes_readable_checkpoints(tmp_path):
    """include/exclude reach the module as plain lists: its saved hyperparameters must load with
    ``weights_only=True`` (Lightning's test of the best checkpoint, evaluate, predict)."""
    metrics = train(compose_config(tmp_path, *QUICK, "logger=none", "model.exclude=[layers.3.*]"))
    assert "test/nll" in metrics
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["exclude"] == ["layers.3.*"]
    model = BayesByBackprop.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert isinstance(model.net.layers[3], torch.nn.Linear)  # kept deterministic


@pytest.mark.parametrize(
    "overrides",
    [
        [*QUICK, "optimizer.lr=100"],  # signal-to-noise ratios beyond TensorBoard's buckets
        ["trainer.max_epochs=2", "callbacks=none"],  # Lightning's own checkpoint: no best score
        [*QUICK, "trainer.precision=64-true"],  # the figure's grid in the network's dtype
        [*QUICK, "trainer.precision=bf16-true"],
    ],
)
def test_runs_that_used_to_crash_after_training_finish(tmp_path, overrides):
    metrics = train(compose_config(tmp_path, *overrides))
    assert "test/nll" in metrics and (tmp_path / "metrics.json").is_file()


def test_histogram_values_fit_tensorboard_buckets():
    from bbb_lightning.training.callbacks import histogram_values

    values = histogram_values(torch.tensor([1.0, float("inf"), float("nan"), -1e30, 1e25]))
    assert torch.equal(values, torch.tensor([1.0, -9e19, 9e19]))
    assert histogram_values(torch.tensor([float("nan")])) is None


def test_a_mandatory_value_left_unset_is_named_in_one_line(tmp_path):
    cfg = compose_config(tmp_path, "dataset=csv", "dataset.path=data.csv")
    with pytest.raises(UserError, match=r"^dataset\.target is required and has no default"):
        train(cfg)


def test_a_run_that_ends_with_non_finite_metrics_fails_after_writing_them(tmp_path):
    """on_nonfinite=skip drops every step after a diverging one: the run must not end with
    exit status 0 and NaN metrics."""
    cfg = compose_config(tmp_path, *QUICK, "optimizer.lr=1e30", "on_nonfinite=skip")
    with pytest.raises(NonFiniteError, match=r"^non-finite [\w/]+=(nan|inf) at the end") as error:
        train(cfg)
    assert "test/nll" in json.loads((tmp_path / "metrics.json").read_text())
    # the run's count, as logged at its last step (8 steps, the first one finite), not that of
    # the best checkpoint, which the test loads
    skipped = events(tmp_path).Scalars("train/skipped_steps")[-1].value
    assert skipped == 7
    assert f"({skipped:.0f} training steps were skipped as non-finite)" in str(error.value)


USER_NET = ["model.net._target_=bbb_testing.WidthNet", "~model.net.hidden", "~model.net.activation"]


def test_a_users_network_trains_once_the_default_arguments_are_dropped(tmp_path):
    metrics = train(compose_config(tmp_path, *QUICK, *USER_NET, "+model.net.width=16"))
    assert "test/nll" in metrics


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.net._target_=bbb_testing.WidthNet"],
            r"^model\.net\._target_=bbb_testing\.WidthNet takes no arguments 'hidden', "
            r"'activation' \(it takes as_tuple, input_shape, num_outputs, outputs, width\); drop "
            r"them with '~model\.net\.hidden' '~model\.net\.activation'$",
        ),
        (
            [*USER_NET, "+model.net.outputs=5"],
            r"^model\.net returns shape \(2, 5\) for a batch of 2; the likelihood needs one "
            r"tensor of shape \(2, 1\) \(num_outputs=1\)$",
        ),
        ([*USER_NET, "+model.net.as_tuple=true"], r"^model\.net returns a tuple for a batch of 2"),
    ],
)
def test_a_users_network_that_does_not_fit_is_named_in_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(compose_config(tmp_path, *QUICK, *overrides))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=inf", r"^optimizer\.lr=inf is not allowed: a finite number$"),
        ("prior.loc=nan", r"^prior\.loc=nan is not allowed: a finite number$"),
        ("posterior.rho_init=[-5,inf]", r"^posterior\.rho_init\[1\]=inf is not allowed"),
        (
            "optimized_metric=val/foo",
            r"^optimized_metric='val/foo' is not allowed: one of \['val/nll', 'val/rmse'\]$",
        ),
        ("optimizer=sgd optimizer.momentum=-1", r"^optimizer: Invalid momentum value: -1$"),
        ("trainer.limit_train_batches=0", r"^trainer\.limit_train_batches=0 is not allowed"),
        ("trainer.limit_test_batches=0", r"^trainer\.limit_test_batches=0 is not allowed"),
        ("trainer.limit_val_batches=-1", r"^trainer\.limit_val_batches=-1 is not allowed"),
        # Lightning took -1 as "no clipping" without a word
        ("trainer.gradient_clip_val=-1", r"^trainer\.gradient_clip_val=-1 is not allowed: null"),
    ],
)
def test_settings_that_used_to_fail_late_are_one_line_at_start(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        train(compose_config(tmp_path, *QUICK, *override.split()))
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("task", "likelihood", "message"),
    [
        ("regression", "categorical", "needs a classification dataset .*: add likelihood=gaussian"),
        ("classification", "gaussian", "needs a regression dataset .*: add likelihood=categorical"),
    ],
)
def test_a_likelihood_that_does_not_fit_the_task_is_named(tmp_path, task, likelihood, message):
    table = tmp_path / "t.csv"
    table.write_text("a,y\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    cfg = compose_config(
        tmp_path / "run", *QUICK, "dataset=csv", f"dataset.path={table}", "dataset.target=y",
        f"dataset.task={task}", f"likelihood={likelihood}", "model=mlp_small",
    )  # fmt: skip
    with pytest.raises(UserError, match=message):
        train(cfg)


def test_resuming_with_another_network_is_named_before_training(tmp_path):
    train(compose_config(tmp_path / "first", *QUICK, "logger=none"))
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cfg = compose_config(tmp_path / "second", *QUICK, "model.net.hidden=[8]", f"ckpt_path={last}")
    expected = (
        r"its network does not match this config \(net\.layers\.1\.bias_posterior\.mu: \(64,\) "
        r"in the checkpoint, \(8,\) here\)"  # the line docs/errors.md shows
    )
    with pytest.raises(UserError, match=expected):
        train(cfg)


def test_a_run_directory_as_ckpt_path_resumes_that_run_in_place(tmp_path):
    """``train ckpt_path=<run dir>`` was refused, and a resume from its last.ckpt wrote a new
    run directory, splitting the TensorBoard curves. It resumes the run where it is, with the
    run's own overrides, and its curves continue in the one tensorboard/ folder."""
    first = run_cli(
        "hydra.run.dir=run", "model.net.hidden=[8]", "trainer.max_epochs=1",
        "callbacks.progress_bar=null", cwd=tmp_path, env={"PYTHONWARNINGS": "default"},
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    # the summary names the variational tensors; no FLOPs of 0, no tips, no torch deprecations
    assert "Variational tensors: 4, holding 25 weights (MeanFieldNormal)" in first.stdout
    for noise in ("FLOPs", "litlogger", "LeafSpec", "exists and is not empty"):
        assert noise not in first.stdout + first.stderr
    resumed = run_cli("ckpt_path=run", "trainer.max_epochs=2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming the run in run in place from last.ckpt with its overrides " in resumed.stderr
    assert "model.net.hidden=[8]" in resumed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no new run directory
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs"] == 2
    steps = [event.step for event in events(tmp_path / "run").Scalars("train/loss_epoch")]
    assert steps == [3, 7]  # both epochs' points on one curve (4 batches an epoch)

    (tmp_path / "bare" / ".hydra").mkdir(parents=True)
    (tmp_path / "bare" / ".hydra" / "config.yaml").write_text("{}\n")
    refused = run_cli("ckpt_path=bare", cwd=tmp_path)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "ckpt_path='bare' is not allowed: the run directory holds no checkpoints/last.ckpt to "
            "resume from (name one of its checkpoints instead)"
        )
    )
