"""What a new user meets first: typos, several mistakes at once, the likelihood of a task."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bbb_lightning.cli.command_line import command_line_problems
from bbb_lightning.cli.errors import UserError
from bbb_lightning.cli.resolvers import fresh_directory
from bbb_lightning.train import train
from bbb_testing import QUICK, compose_config, run_cli


def test_the_cli_names_a_mistyped_key_and_choice_in_one_line_each(tmp_path):
    result = run_cli("trainer.max_epoch=2", "prior=gausian", cwd=tmp_path)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert len(lines) == 2, result.stderr
    key, choice = sorted(lines, key=lambda line: "prior=" in line)  # Hydra checks choices first
    assert "trainer.max_epoch=2: no key trainer.max_epoch; did you mean trainer.max_epochs" in key
    assert choice.endswith(
        "prior=gausian: no choice 'gausian' in prior; did you mean prior=gaussian? (the "
        "choices: empirical, gaussian, laplace, scale_mixture)"
    )
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "outputs").exists()  # stopped before Hydra made a run directory


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (  # the key is in another choice of the group
            ["prior.sigma=-1"],
            ["prior.sigma=-1: no key prior.sigma; did you mean prior=scale_mixture prior.sigma2 "
             "or prior=scale_mixture prior.sigma1? (the keys of prior: loc, scale)"],
        ),
        (  # an argument of the target that the config does not list: the + that adds it
            ["trainer.max_steps=4"],
            ["trainer.max_steps=4: trainer does not list max_steps, an argument of "
             "lightning.pytorch.Trainer: add it with +trainer.max_steps=4"],
        ),
        (  # a sweep: every value of a swept group, the key of a swept value, both together
            ["-m", "prior=gaussian,gausian", "kl.weightin=uniform,minibatch"],
            ["kl.weightin=uniform,minibatch: no key kl.weightin; did you mean kl.weighting? "
             "(the keys of kl: weighting, reduction, scale, warmup_steps, monte_carlo)",
             "prior=gaussian,gausian: no choice 'gausian' in prior; did you mean prior=gaussian? "
             "(the choices: empirical, gaussian, laplace, scale_mixture)"],
        ),
        (["hydra/launcher=slurmm"], ["hydra/launcher=slurmm: no choice 'slurmm' in "
                                     "hydra/launcher; did you mean hydra/launcher=slurm? (the "
                                     "choices: basic, "]),
        (["~model.net.hiddn"], ["~model.net.hiddn: no key model.net.hiddn; did you mean "
                                "model.net.hidden? (the keys of model.net: input_shape, "]),
        (["model.net.hidden=[8"], ["model.net.hidden=[8: not an override (no viable alternative"]),
        (["priors=x"], ["priors=x: no key priors; did you mean prior or posterior?"]),
        (  # a choice in a list of a group's options
            ["callbacks=[default,early_stoping]"],
            ["callbacks=[default,early_stoping]: no choice 'early_stoping' in callbacks; did you "
             "mean callbacks=early_stopping? (the choices: default, diagnostics, early_stopping, "],
        ),
        (["-m", "prior=gaussian,laplace", "hparams_search=optuna", "trainer.max_epochs=1"], []),
    ],
)  # fmt: skip
def test_mistyped_overrides_are_named_with_the_nearest_real_ones(argv, expected):
    problems = command_line_problems("config", argv)
    assert len(problems) == len(expected)
    for problem, start in zip(problems, expected, strict=True):
        assert problem.startswith(start), problem
        assert "\n" not in problem


def test_an_added_trainer_key_is_checked_against_the_trainer_before_it_is_built(tmp_path):
    with pytest.raises(UserError) as error:
        train(compose_config(tmp_path / "run", *QUICK, "+trainer.max_epoch=2"))
    message = str(error.value)
    assert message.startswith(
        "trainer._target_=lightning.pytorch.Trainer takes no argument 'max_epoch' (did you mean "
        "'max_epochs'?) (it takes accelerator, "
    )
    assert message.endswith("drop it with '~trainer.max_epoch'")
    assert not (tmp_path / "run").exists()


def test_independent_problems_are_reported_together_before_the_data_is_read(tmp_path):
    cfg = compose_config(
        tmp_path / "run", *QUICK, "dataset=csv", "dataset.path=missing.csv", "prior.scale=-1",
        "kl.weighting=linear",
    )  # fmt: skip
    with pytest.raises(UserError) as error:
        train(cfg)
    assert error.value.problems == [
        "dataset.target is required and has no default: set dataset.target=... on the command line",
        "kl.weighting='linear' is not allowed: one of ['uniform', 'minibatch']",
        f"dataset.path='missing.csv' is not allowed: no such file (relative to {tmp_path.cwd()})",
        "prior.scale=-1 is not allowed: a finite number > 0",
    ]


def test_a_csv_regression_chooses_the_gaussian_likelihood_by_itself(tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("a,y\n" + "".join(f"{i / 40},{2 * i / 40 + 1}\n" for i in range(40)))
    cfg = compose_config(
        tmp_path / "run", *QUICK, "logger=none", "dataset=csv", f"dataset.path={table}",
        "dataset.target=y", "dataset.task=regression", "model=mlp_small",
        "likelihood.noise=fixed",
    )  # fmt: skip
    metrics = train(cfg)
    assert {"test/rmse", "test/raw_rmse"} <= set(metrics)
    # the run saves the likelihood it chose, not "auto": evaluate and predict rebuild it
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["hyper_parameters"]["likelihood"] == {
        "_target_": "bbb_lightning.training.objectives.GaussianLikelihood",
        "target_dim": 1,
        "noise": "fixed",
        "noise_std": 0.1,
    }


def test_a_run_directory_is_named_by_the_second_and_never_shared(tmp_path):
    """Run directories had microseconds (``01-07-36-396672``) where the README says
    ``<time>``: now ``outputs/<date>/<HH-MM-SS>``, and a second run started in the same second
    gets ``-2`` (each process creates its own, so two never share one)."""
    result = run_cli("trainer.max_epochs=1", *QUICK[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d", f"{run_dir.parent.name}/{run_dir.name}")
    assert (run_dir / "metrics.json").is_file()
    base = str(tmp_path / "outputs" / "day" / "12-00-00")
    assert [fresh_directory(base) for _ in range(3)] == [base, f"{base}-2", f"{base}-3"]
    assert all(Path(path).is_dir() for path in (base, f"{base}-2", f"{base}-3"))
