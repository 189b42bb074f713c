"""The Lightning + Hydra template's conventions: debug=, tags=, callbacks= and logger= presets,
the config tree at start, trainer.fast_dev_run without a +."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from bbb_lightning import summary
from bbb_lightning.cli.errors import UserError
from bbb_lightning.cli.preset_checks import OPTIONAL_LOGGERS
from bbb_lightning.train import train
from bbb_testing import QUICK, compose_config, events, run_cli

QUIET = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false"]
QUIET += ["extras.print_config=false"]


def test_fast_dev_run_without_a_plus_prints_the_config_tree_and_ends_with_a_note(tmp_path):
    """One batch of each stage through the CLI: the tree at start, no checkpoint (Lightning's
    own on_train_end wrote last.ckpt in fast_dev_run), metrics.json, the tags saved."""
    result = run_cli("trainer.fast_dev_run=true", "tags=[baseline,v2]", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    tree = result.stdout.split("CONFIG", 1)[1]
    for branch in ("dataset", "model", "prior", "trainer", "callbacks", "top-level"):
        assert re.search(rf"^[├└]── {branch}$", tree, flags=re.MULTILINE), branch
    assert "fast_dev_run: true" in tree
    # resolved: ${optimized_metric} and ${metric_mode:${optimized_metric}}
    assert re.search(r"monitor: val/nll\s+│\s+mode: min", tree)
    saved = (run_dir / "config_tree.log").read_text()
    assert saved.startswith("CONFIG") and "- baseline" in saved
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "tensorboard").exists()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and "test/nll" in metrics and "best/val/nll" not in metrics
    notes = [line for line in result.stderr.splitlines() if "fast_dev_run: a check of 1" in line]
    assert len(notes) == 1 and "no checkpoint" in notes[0]
    assert yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["tags"] == [
        "baseline",
        "v2",
    ]


@pytest.mark.parametrize("preset", ["fdr", "limit", "overfit", "profiler"])
def test_debug_presets_run_through_train(tmp_path, preset):
    shorter = ["trainer.max_epochs=2"] if preset == "overfit" else []
    cfg = compose_config(tmp_path, f"debug={preset}", *QUIET, *shorter)
    assert cfg.trainer.detect_anomaly and cfg.trainer.accelerator == "cpu"
    assert cfg.logger == {}  # debug runs log nowhere unless logger=... is given
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = train(cfg)
    assert "test/nll" in metrics and "val/nll" in metrics
    checkpoints = tmp_path / "checkpoints"
    if preset == "fdr":
        assert metrics["epochs"] == 1 and not checkpoints.exists()
    elif preset == "limit":  # 3 epochs of 3 batches, the best of them tested
        assert metrics["epochs"] == 3 and (checkpoints / "last.ckpt").is_file()
        assert "best/val/nll" in metrics
    elif preset == "overfit":  # the same batches every epoch: Lightning had nothing to swap
        assert metrics["epochs"] == 2 and not checkpoints.exists()
        assert not [w for w in caught if "overfit" in str(w.message)]
    else:
        assert "training_step" in (tmp_path / "fit-profile.txt").read_text()
        assert (tmp_path / "test-profile.txt").is_file()


def test_a_command_line_logger_beats_the_debug_presets_none():
    cfg = compose_config("unused", "debug=limit", "logger=csv")
    assert list(cfg.logger) == ["csv"]


def test_composed_callbacks_and_many_loggers_record_the_tags(tmp_path, capsys):
    """callbacks=[...] of presets, logger=many (TensorBoard and CSV); early stopping stops at
    its threshold, the LR monitor writes, the deeper model summary lists the Bayesian layers;
    the tags reach TensorBoard's HParams tab and the sweep summary."""
    cfg = compose_config(
        tmp_path / "0",
        "callbacks=[default,early_stopping,lr_monitor,model_summary]",
        "callbacks.early_stopping.stopping_threshold=1e9",
        "logger=many",
        "tags=[baseline,v2]",
        "trainer.max_epochs=3",
        "callbacks.progress_bar=null",
        "extras.print_config=false",
    )
    metrics = train(cfg)
    assert metrics["epochs"] == 1  # any val/nll is below 1e9: stopped after the first epoch
    assert "BayesianLinear" in capsys.readouterr().out  # depth 3: the net's layers
    assert (tmp_path / "0" / "csv" / "metrics.csv").is_file()
    accumulator = events(tmp_path / "0")
    assert "lr-Adam" in accumulator.Tags()["scalars"]
    (session,) = (
        data.session_start_info.hparams
        for meta in accumulator.summary_metadata.values()
        if meta.plugin_data.plugin_name == "hparams"
        and (data := HParamsPluginData.FromString(meta.plugin_data.content)).HasField(
            "session_start_info"
        )
    )
    assert session["tags"].string_value == "baseline, v2"

    # the job as a multirun leaves it: its config and overrides in .hydra/
    (tmp_path / "0" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "0" / ".hydra" / "config.yaml")
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- logger=many\n")
    summary.main([str(tmp_path)])
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("| job"))
    assert header.startswith("| job | status | overrides | tags |")
    assert "| baseline, v2 |" in table


@pytest.mark.skipif(
    all(importlib.util.find_spec(extra.module) for extra in OPTIONAL_LOGGERS.values()),
    reason="wandb and mlflow are both installed: no missing package to report",
)
def test_missing_logger_packages_and_callback_needs_stop_the_cli_at_once(tmp_path):
    """Each chosen logger whose package is missing is one line with its pip install, beside the
    other problems of the config, before anything slow (seeding, data, kernels)."""
    missing = [e for e in OPTIONAL_LOGGERS.values() if not importlib.util.find_spec(e.module)]
    result = run_cli(
        "logger=[tensorboard,wandb,mlflow]",
        "callbacks=[default,early_stopping]",
        "trainer.limit_val_batches=0",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == len(missing) + 1, result.stderr
    for extra in missing:
        (line,) = [line for line in errors if f"logger.{extra.name}:" in line]
        assert line.endswith(
            f'is not installed: pip install "bbb-lightning[{extra.name}]" (or drop it: '
            "logger=tensorboard)"
        )
    assert any(
        "callbacks.early_stopping monitors val/nll, and this run does not validate" in line
        for line in errors
    )
    assert "Traceback" not in result.stderr and "Seed set" not in result.stderr
    assert "CONFIG" not in result.stdout  # the tree comes only after the checks pass


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["callbacks=[default,lr_monitor]", "logger=none"],
            "callbacks.lr_monitor writes the learning rate to a logger and this run has none",
        ),
        (  # after the data and model are built, before training
            ["callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/accuracy"],
            "callbacks.early_stopping.monitor='val/accuracy' is not allowed: one of ['val/nll', "
            "'val/rmse']",
        ),
    ],
)
def test_a_callback_without_what_it_needs_is_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train(compose_config(tmp_path / "run", *QUICK, *overrides))
    assert not (tmp_path / "run").exists()


def test_the_extras_are_those_the_missing_package_lines_name():
    tomllib = pytest.importorskip("tomllib")
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as handle:
        extras = tomllib.load(handle)["project"]["optional-dependencies"]
    for extra in OPTIONAL_LOGGERS.values():
        assert extras[extra.name] == [extra.requirement]


def test_wandb_offline_writes_its_run_into_the_run_dir(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (the wandb extra)")
    train(compose_config(tmp_path, *QUICK, "trainer.max_epochs=1", "logger=wandb",
                         "logger.wandb.offline=true", "tags=[baseline]"))  # fmt: skip
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_mlflow_records_the_run_and_its_tags(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (the mlflow extra)")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    train(compose_config(tmp_path / "run", *QUICK, "trainer.max_epochs=1", "logger=mlflow",
                         f"logger.mlflow.tracking_uri={store}", "tags=[baseline,v2]"))  # fmt: skip
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("bbb-lightning").experiment_id])
    assert run.data.tags["tags"] == "baseline, v2"
    assert "val/nll" in run.data.metrics
