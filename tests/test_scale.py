"""Scale: DDP correctness on CPU (gloo), Hydra + DDP run directories, Optuna, SLURM, summaries."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_module

from bbb_lightning.summary import _job_row, collect, metric_mode
from bbb_lightning.summary import main as summary_main
from bbb_testing import compose_config, events, hparams_plugin, run_cli

PROBE = Path(__file__).parent / "scripts" / "ddp_probe.py"
QUIET = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def _probe(out_dir: Path, batch_size: int, trainer: str, *overrides: str) -> list[dict]:
    out_dir.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            str(PROBE),
            str(out_dir),
            str(batch_size),
            f"trainer={trainer}",
            *overrides,
        ],
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = sorted(out_dir.glob("rank*.pt"))
    return [torch.load(path, weights_only=False) for path in ranks]


@pytest.mark.slow
def test_two_processes_give_the_one_process_loss_gradients_and_kl_schedule(tmp_path):
    (single_record,) = _probe(tmp_path / "single", batch_size=8, trainer="cpu")
    ddp_records = _probe(tmp_path / "ddp", batch_size=4, trainer="ddp_cpu")
    single, rank0, rank1 = (record["steps"] for record in (single_record, *ddp_records))
    assert len(single) == len(rank0) == len(rank1) == 3
    losses = zip(*(record["losses"] for record in (single_record, *ddp_records)), strict=True)
    for (one, *pair), (one_loss, *pair_losses) in zip(
        zip(single, rank0, rank1, strict=True), losses, strict=True
    ):
        assert one["step"] == pair[0]["step"] == pair[1]["step"]
        # M, the minibatch index and the warm-up step are global: the same weight everywhere
        assert one["kl_weight"] == pair[0]["kl_weight"] == pair[1]["kl_weight"]
        # each rank's loss is its half of the global batch; their mean is the global loss
        assert sum(pair_losses) / 2 == pytest.approx(one_loss, rel=1e-6)
        for name, grad in one["grads"].items():
            # after DDP's averaging both ranks hold the same gradient, equal to one process's:
            # rho only feels the KL, so a KL counted once per rank would double its gradient
            assert torch.equal(pair[0]["grads"][name], pair[1]["grads"][name])
            torch.testing.assert_close(pair[0]["grads"][name], grad, rtol=1e-5, atol=1e-6)
    # the logged epoch mean covers every example of every process: the one-process mean
    epoch_mean = sum(single_record["losses"]) / len(single_record["losses"])
    for record in (single_record, *ddp_records):
        assert record["loss_epoch"] == pytest.approx(epoch_mean, rel=1e-5)
    single_metrics = json.loads((tmp_path / "single" / "run" / "metrics.json").read_text())
    ddp_metrics = json.loads((tmp_path / "ddp" / "run" / "metrics.json").read_text())
    assert ddp_metrics["val/nll"] == pytest.approx(single_metrics["val/nll"], rel=1e-4)
    assert ddp_metrics["test/nll"] == pytest.approx(single_metrics["test/nll"], rel=1e-4)
    # each test example is evaluated once, by one of the processes: the ranks split the test set
    test_set = single_record["test_inputs"]
    shards = [record["test_inputs"] for record in ddp_records]
    assert all(0 < len(shard) < len(test_set) for shard in shards)
    ddp_inputs = torch.cat(shards)
    assert torch.equal(ddp_inputs.flatten().sort().values, test_set.flatten().sort().values)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("large", "small", "accumulate", "limits"),
    [
        (8, 4, 2, ("trainer.limit_train_batches=3", "trainer.limit_train_batches=6")),
        # 512 examples: 2 steps of 384 + 128, against 4 minibatches of 128 in steps of 3 and 1
        (384, 128, 3, ("trainer.limit_train_batches=1.0",) * 2),
    ],
    ids=["a-divides", "last-step-of-one-minibatch"],
)
def test_gradient_accumulation_gives_the_large_batch_loss_gradients_and_kl_schedule(
    tmp_path, large, small, accumulate, limits
):
    """a minibatches of B accumulated into one optimizer step = one step with batch a B: the
    same KL weight (Blundell's, i and M counted in optimizer steps) and the same gradients,
    also for an epoch's last step of fewer than a minibatches."""
    weighting = ("kl.weighting=minibatch", "kl.warmup_steps=2")
    (one,) = _probe(tmp_path / "large", large, "cpu", *weighting, limits[0])
    (accumulated,) = _probe(
        tmp_path / "accumulated",
        small,
        "cpu",
        *weighting,
        f"+trainer.accumulate_grad_batches={accumulate}",
        limits[1],
    )
    assert len(one["steps"]) == len(accumulated["steps"]) in (2, 3)
    for reference, step in zip(one["steps"], accumulated["steps"], strict=True):
        assert reference["step"] == step["step"]
        assert reference["kl_weight"] == pytest.approx(step["kl_weight"], rel=1e-12)
        for name, grad in reference["grads"].items():
            torch.testing.assert_close(step["grads"][name], grad, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_run_writes_one_directory_from_rank_zero(tmp_path):
    result = run_cli("trainer=ddp_cpu", "trainer.max_epochs=2", *QUIET, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in (tmp_path / "outputs").glob("*/*/metrics.json")]
    assert len(list((tmp_path / "outputs").glob("*/*"))) == 1  # no directory per rank
    assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 ran, in this directory
    writers = {path.name.split(".")[4] for path in (run_dir / "tensorboard").glob("events.*")}
    assert len(writers) == 1  # every event file from one process (the pid in the name)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "epoch001.ckpt",
        "last.ckpt",
    ]


@pytest.mark.slow
def test_a_non_finite_loss_on_one_process_ends_the_ddp_run_in_one_line(tmp_path):
    """Rank 1's loss is NaN, rank 0's finite: both stop at the same step, and the run reports
    rank 1's term once, naming the process (not rank 0's finite values as non-finite)."""
    net = ["model.net._target_=bbb_testing.NaNOnRank", "~model.net.hidden", "~model.net.activation"]
    tests = str(Path(__file__).parent)
    result = run_cli(
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "hydra.run.dir=run",
        *net,
        *QUIET,
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])},
    )
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if "non-finite" in line]
    assert "non-finite NLL (nll=nan, kl=" in line and ") on process 1 at step 1;" in line
    assert "Traceback" not in result.stderr
    saved = list((tmp_path / "run" / "checkpoints").glob("nonfinite-step1-last-good.ckpt"))
    assert len(saved) == 1 and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_a_ddp_run_resumed_mid_epoch_logs_the_uninterrupted_epoch_means(tmp_path):
    """last.ckpt after 2 of an epoch's 4 minibatches per process: the resumed run's epoch means
    (loss, ..., rmse) cover the minibatches of both processes before and after the cut."""
    overrides = [
        "trainer=ddp_cpu",
        "trainer.max_epochs=2",
        "dataset.batch_size=64",
        "kl.weighting=minibatch",
        "kl.warmup_steps=3",
        "+trainer.val_check_interval=0.5",
        *QUIET,
    ]
    for name, extra in (("reference", []), ("cut", ["+trainer.max_steps=2"])):
        result = run_cli(f"hydra.run.dir={name}", *overrides, *extra, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    resume = "ckpt_path=cut/checkpoints/last.ckpt"
    result = run_cli("hydra.run.dir=resumed", *overrides, resume, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    def epoch_scalars(run: str) -> dict[str, float]:
        accumulator = events(tmp_path / run)
        names = [f"train/{name}_epoch" for name in ("loss", "nll", "kl", "elbo")]
        return {
            f"{name}@{event.step}": event.value
            for name in (*names, "train/rmse")
            for event in accumulator.Scalars(name)
        }

    reference = epoch_scalars("reference")
    assert len(reference) == 10
    assert epoch_scalars("resumed") == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_ddp_multirun_keeps_each_job_in_its_own_directory(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "-m",
        "prior=gaussian,laplace",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={sweep}",
        *QUIET,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        assert (sweep / job / "train_ddp_process_1.log").is_file()
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_optuna_search_runs_three_trials(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "trainer.max_epochs=2",
        f"hydra.sweep.dir={sweep}",
        *QUIET,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    best = (sweep / "optimization_results.yaml").read_text()
    best_value = float(best.split("best_value:")[1])
    # the objective is each trial's best validation NLL (its tested checkpoint's), not the last
    assert best_value == pytest.approx(min(t["best/val/nll"] for t in trials), rel=1e-6)
    for name in ("prior.pi", "prior.sigma1", "prior.sigma2", "optimizer.lr", "num_samples"):
        assert name in best
    # each trial in the HParams tab is named by the searched values, listed first
    searched = ["prior.pi", "prior.sigma1", "prior.sigma2", "optimizer.lr"]
    searched += ["posterior.rho_init", "num_samples"]
    for i in range(3):
        experiment, session = hparams_plugin(events(sweep / str(i)))
        name = session.group_name.split(" · ")[0]
        assert sorted(item.split("=")[0] for item in name.split()) == sorted(searched)
        assert {info.name for info in experiment.hparam_infos if info.differs} == set(searched)
    rows = [line for line in (sweep / "summary.md").read_text().splitlines() if _is_job_row(line)]
    assert len(rows) == 3 and rows[0].count("| ok |") == 1  # the best trial heads the table


@pytest.mark.slow
def test_optuna_search_of_ddp_trials_starts_no_sweep_on_other_ranks(tmp_path):
    """hparams_search=optuna sets hydra.mode=MULTIRUN in the config: rank 1, relaunched with the
    trial's overrides, must run that trial, not a study of its own in multirun/<date>/<time>."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=1",
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        f"hydra.sweep.dir={sweep}",
        *QUIET,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (sweep / "0" / "metrics.json").is_file()
    assert (sweep / "0" / "train_ddp_process_1.log").is_file()  # rank 1 ran in the trial's dir
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()


def test_a_failing_optuna_trial_does_not_end_the_study(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "kl.scale=-1",  # every trial stops at its config check
        f"hydra.sweep.dir={sweep}",
        *QUIET,
        cwd=tmp_path,
    )
    lines = (sweep / "summary.md").read_text().splitlines()
    summary = [line for line in lines if _is_job_row(line)]
    assert len(summary) == 2 and all("| failed |" in row for row in summary), result.stderr[-2000:]
    assert "kl.scale=-1 is not allowed" in summary[0]


def test_slurm_launcher_maps_nodes_and_gpus_to_the_trainer():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4"]
    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert (cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.strategy) == (2, 4, "ddp")


def test_summary_command_sorts_jobs_by_the_metric(tmp_path, capsys):
    for job, nll in (("0", 0.5), ("1", 0.2), ("2", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        if nll is not None:
            (tmp_path / job / "metrics.json").write_text(json.dumps({"val/nll": nll}))
        else:
            (tmp_path / job / "error.txt").write_text("UserError: broken\n")
    summary_main([str(tmp_path)])
    table = capsys.readouterr().out.splitlines()[4:]
    assert [row.split(" | ")[0] for row in table] == ["| 1", "| 0", "| 2"]
    assert "failed" in table[2] and "UserError: broken" in table[2]
    assert (tmp_path / "summary.csv").read_text().splitlines()[1].startswith("1,ok,seed=1")

    with pytest.raises(SystemExit):
        summary_main([str(tmp_path), "--sort", "val/foo"])
    error = capsys.readouterr().err
    assert "--sort 'val/foo' is not a column; the columns are: job, status" in error
    with pytest.raises(SystemExit):
        summary_main([str(tmp_path / "0")])  # one run, not a sweep
    assert "holds no job directories" in capsys.readouterr().err


def test_summary_ranks_by_the_best_validation_value_in_the_metrics_direction(tmp_path):
    """best/<metric> (the tested checkpoint's) before the last epoch's value; accuracy largest
    first; a job that wrote metrics.json and then failed (non-finite final metrics) is failed."""
    jobs = {
        "0": {"val/accuracy": 0.9, "best/val/accuracy": 0.91},
        "1": {"val/accuracy": 0.5, "best/val/accuracy": 0.95},
        "2": {"val/accuracy": 0.99, "best/val/accuracy": float("nan")},
    }
    for job, metrics in jobs.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (tmp_path / job / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "2" / "error.txt").write_text("NonFiniteError: non-finite best/val/accuracy\n")
    rows = [row["job"] for row in collect(tmp_path, "val/accuracy", descending=True)]
    assert rows == ["1", "0", "2"]
    assert _job_row(tmp_path / "2")["status"] == "failed"
    assert metric_mode("val/accuracy") == "max" and metric_mode("val/ece") == "min"


@pytest.mark.parametrize(("metric", "mode"), [("val/nll", "min"), ("val/accuracy", "max")])
def test_the_best_checkpoint_and_the_search_follow_the_metrics_direction(tmp_path, metric, mode):
    cfg = compose_config(tmp_path, "dataset=mnist", f"optimized_metric={metric}")
    checkpoint = hydra.utils.instantiate(cfg.callbacks.model_checkpoint)
    assert checkpoint.mode == mode and checkpoint.monitor == metric
    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        search = compose(
            "config",
            overrides=["hparams_search=optuna", f"optimized_metric={metric}"],
            return_hydra_config=True,
        )
    assert search.hydra.sweeper.direction == {"min": "minimize", "max": "maximize"}[mode]


def test_trainer_configs_compose(tmp_path):
    for trainer, accelerator in (("gpu", "gpu"), ("ddp", "gpu"), ("ddp_cpu", "cpu")):
        cfg = compose_config(tmp_path, f"trainer={trainer}", "trainer.precision=bf16-mixed")
        assert cfg.trainer.accelerator == accelerator
        assert cfg.trainer.precision == "bf16-mixed"


def _is_job_row(line: str) -> bool:
    """A row of summary.md's table of jobs: ``| <job number> | <status> | ...``."""
    return re.match(r"\| \d+ \| ", line) is not None
