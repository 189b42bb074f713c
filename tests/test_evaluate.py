"""End to end: train tiny runs once, evaluate them (CLI and in-process), check every number,
figure, TensorBoard image and export, and the one-line errors."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from bbb_lightning.cli.errors import UserError
from bbb_lightning.data import MNISTDataModule, ToyRegressionDataModule
from bbb_lightning.data.idx import read_idx
from bbb_lightning.evaluate import evaluate
from bbb_lightning.storage.runs import resolve_checkpoint
from bbb_testing import compose_config, run_cli
from conftest import _trained_run

CONF = Path(__file__).parents[1] / "src" / "bbb_lightning" / "conf"

# Small but complete evaluations.
FAST = [
    "analyses=all",
    "eval_samples=4",
    "sample_counts=[1,2,4]",
    "attack.limit=64",
    "attack.num_samples=3",
    "attack.num_draws=2",
    "attack.gradient_draws=3",
    "attack.pgd_steps=3",
    "attack.epsilons=[0.0,0.1]",
]
CLASSIFICATION_FIGURES = {
    "reliability",
    "metric_vs_samples",
    "uncertainty_in_vs_out",
    "posterior_sigma_snr",
    "pruning",
    "attacks",
    "input_gradients",
}


def tensorboard_tags(run_dir: Path) -> dict:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator.Tags()


def mean_network_score(export_dir: Path, x: torch.Tensor) -> torch.Tensor:
    scripted = torch.jit.load(str(export_dir / "posterior_mean.torchscript.pt"))
    with torch.no_grad():
        return scripted(x)


# -- classification (MNIST), through the command line -----------------------------------------
def test_mnist_evaluation_cli(tmp_path, mnist_run):
    out = tmp_path / "evaluation"
    overrides = [f"ckpt_path={mnist_run}", "limit_test=300", *FAST, f"hydra.run.dir={out}"]
    result = run_cli(*overrides, cwd=tmp_path, entry="evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())

    test_keys = ["accuracy", "nll", "ece", "mce", "brier", "entropy", "expected_entropy"]
    test_keys += ["mutual_information"]
    ood_keys = ["entropy_auroc", "entropy_aupr", "mi_auroc", "mi_aupr", "entropy"]
    ood_keys += ["mutual_information"]
    expected = {f"test/{key}" for key in test_keys} | {f"ood/noise/{key}" for key in ood_keys}
    expected |= {f"samples/{m}/S={s}" for m in ("accuracy", "nll") for s in (1, 2, 4)}
    expected |= {f"pruning/accuracy/p={p}" for p in (0, 50, 75, 95, 98)}
    expected |= {
        f"attack/{method}/{setting}/eps={eps}"
        for method in ("fgsm", "pgd")
        for setting in ("mean", "draw", "predictive")
        for eps in ("0", "0.1")
    }
    expected |= {"gradient/expected_l2", "gradient/draw_l2", "gradient/coherence"}
    assert expected <= set(metrics), sorted(expected - set(metrics))

    assert metrics["test/num_examples"] == 300
    assert 0.6 < metrics["test/accuracy"] <= 1
    assert 0 <= metrics["test/ece"] <= metrics["test/mce"] <= 1
    assert 0 <= metrics["test/brier"] <= 2
    assert metrics["test/entropy"] == pytest.approx(
        metrics["test/expected_entropy"] + metrics["test/mutual_information"], rel=1e-5
    )
    # The main predictive and the S=4 point of the curve use the same draws.
    assert metrics["samples/accuracy/S=4"] == metrics["test/accuracy"]
    assert metrics["samples/nll/S=4"] == pytest.approx(metrics["test/nll"])
    # Gaussian noise images are far from digits: the predictive entropy flags them.
    assert metrics["ood/noise/entropy_auroc"] > 0.8
    assert all(0 <= metrics[f"ood/noise/{key}"] <= 1 for key in ood_keys[:4])
    for method in ("fgsm", "pgd"):
        for setting in ("mean", "draw", "predictive"):
            clean = metrics[f"attack/{method}/{setting}/eps=0"]
            assert metrics[f"attack/{method}/{setting}/eps=0.1"] < clean
    assert 0 < metrics["gradient/coherence"] <= 1

    # Pruning 0 % is the posterior-mean network: recompute its accuracy from the exported file,
    # fed the raw test pixels transformed as the manifest says.
    manifest = json.loads((out / "export" / "manifest.json").read_text())
    data_dir = OmegaConf.load(mnist_run / ".hydra" / "config.yaml").dataset.data_dir
    datamodule = MNISTDataModule(data_dir, download=False)
    datamodule.setup("test")
    pixels = read_idx(next(Path(data_dir).glob("**/t10k-images-idx3-ubyte*")))[:300]
    units = manifest["input"]
    x = ((pixels.float() - units["offset"]) / units["scale"]).reshape(-1, *manifest["input_shape"])
    assert torch.equal(x, datamodule.test_set.tensors[0][:300])
    y = datamodule.test_set.tensors[1][:300]
    assert manifest["classes"] == list(range(10))
    accuracy = (mean_network_score(out / "export", x).argmax(-1) == y).float().mean().item()
    assert metrics["pruning/accuracy/p=0"] == pytest.approx(accuracy)

    figures = {path.stem for path in (out / "figures").glob("*.png")}
    assert figures >= CLASSIFICATION_FIGURES
    tags = tensorboard_tags(out)
    assert {f"figures/{name}" for name in CLASSIFICATION_FIGURES} <= set(tags["images"])
    assert {"test/accuracy", "ood/noise/entropy_auroc", "samples/accuracy"} <= set(tags["scalars"])
    assert any(tag.startswith("snr/") for tag in tags["histograms"])
    assert set(manifest["files"]) == {"posterior_mean", "posterior_draw", "pruned_95"}
    info = json.loads((out / "evaluation.json").read_text())
    assert info["ood"] == "noise"
    assert info["checkpoint"].endswith(".ckpt") and "last" not in Path(info["checkpoint"]).name


# -- regression (toy), in process -------------------------------------------------------------
def test_toy_regression_evaluation(tmp_path, toy_run):
    cfg = compose_config(tmp_path, f"ckpt_path={toy_run}", *FAST, config_name="evaluate")
    metrics = evaluate(cfg)
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    keys = ["rmse", "nll", "gaussian_nll", "epistemic_var", "aleatoric_var", "coverage_50"]
    expected = {f"test/{key}" for key in [*keys, "coverage_90", "coverage_95"]}
    expected |= {f"samples/{m}/S={s}" for m in ("rmse", "nll") for s in (1, 2, 4)}
    expected |= {f"pruning/rmse/p={p}" for p in (0, 50, 75, 95, 98)}
    assert expected <= set(metrics), sorted(expected - set(metrics))
    assert not any(key.startswith(("ood/", "attack/", "gradient/")) for key in metrics)
    assert 0 <= metrics["test/coverage_50"] <= metrics["test/coverage_90"]
    assert metrics["test/coverage_90"] <= metrics["test/coverage_95"] <= 1
    assert metrics["test/epistemic_var"] > 0 and metrics["test/aleatoric_var"] > 0
    assert metrics["samples/rmse/S=4"] == pytest.approx(metrics["test/rmse"])

    data = ToyRegressionDataModule()  # the run's dataset config is the default one
    x, y = data.test_set.tensors
    rmse = (mean_network_score(tmp_path / "export", x) - y).square().mean().sqrt().item()
    assert metrics["pruning/rmse/p=0"] == pytest.approx(rmse, rel=1e-5)

    figures = {"predictive", "metric_vs_samples", "posterior_sigma_snr", "pruning"}
    assert figures <= {path.stem for path in (tmp_path / "figures").glob("*.png")}
    assert {f"figures/{name}" for name in figures} <= set(tensorboard_tags(tmp_path)["images"])
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["task"] == "regression" and len(manifest["noise_std"]) == 1


def test_empty_sample_counts_and_no_pruned_export(tmp_path, toy_run):
    """sample_counts=[] skips the metric-vs-samples curve; export.pruned_fraction=null exports
    no pruned network (both as documented)."""
    overrides = [*FAST, "sample_counts=[]", "export.pruned_fraction=null", "pruning_fractions=[]"]
    cfg = compose_config(tmp_path, f"ckpt_path={toy_run}", *overrides, config_name="evaluate")
    metrics = evaluate(cfg)
    assert "test/rmse" in metrics and not any(key.startswith("samples/") for key in metrics)
    figures = {path.stem for path in (tmp_path / "figures").glob("*.png")}
    assert "predictive" in figures and "metric_vs_samples" not in figures
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"posterior_mean", "posterior_draw"}


# -- out-of-distribution sets -----------------------------------------------------------------
def write_idx_images(path: Path, images: torch.Tensor) -> None:
    """An IDX file of unsigned bytes: magic 0x00000803, the sizes, then the pixels (gzipped
    when the name ends in .gz, as the published files are)."""
    header = bytes([0, 0, 8, images.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in images.shape
    )
    raw = header + images.to(torch.uint8).numpy().tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.mark.parametrize("ood", ["rotated", "flipped"])
def test_ood_sets(tmp_path, mnist_run, ood):
    cfg = compose_config(
        tmp_path / "out",
        f"ckpt_path={mnist_run}",
        "limit_test=100",
        *FAST,
        f"ood={ood}",
        "ood.num_examples=40",
        "attack.enabled=false",
        "export.enabled=false",
        "pruning_fractions=[]",
        "figures=false",
        config_name="evaluate",
    )
    metrics = evaluate(cfg)
    for key in ("entropy_auroc", "entropy_aupr", "mi_auroc", "mi_aupr"):
        assert 0 <= metrics[f"ood/{ood}/{key}"] <= 1
    assert not list((tmp_path / "out").glob("figures/*.png"))


def test_fashion_mnist_from_torchvisions_layout_through_the_cli(tmp_path, mnist_run, mnist_dir):
    """ood=fashion_mnist reads root/FashionMNIST/raw/t10k-images-idx3-ubyte.gz (no download:
    a copy is there). The file written holds MNIST's own first test digits, so the set is not
    out of distribution: normalised as the run's images, the AUROC is 1/2 within sampling noise
    (two samples of 100: standard error 0.04); a wrong normalisation would tell them apart."""
    digits = read_idx(next(mnist_dir.glob("**/t10k-images-idx3-ubyte*")))[:100]
    raw = tmp_path / "vision_root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_images(raw / "t10k-images-idx3-ubyte.gz", digits)
    out = tmp_path / "evaluation"
    result = run_cli(
        f"ckpt_path={mnist_run}", "limit_test=100", "ood=fashion_mnist",
        f"ood.path={tmp_path / 'vision_root'}", "eval_samples=8", "figures=false",
        f"hydra.run.dir={out}", cwd=tmp_path, entry="evaluate",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    # the default analyses=standard: a line per phase, no attacks, pruning or export
    phases = [line for line in result.stderr.splitlines() if line.startswith("evaluate [")]
    assert phases == [
        "evaluate [1/3] the test predictive, S=10",
        "evaluate [2/3] out of distribution: fashion_mnist",
        "evaluate [3/3] posterior sigma and SNR",
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(key.startswith(("attack/", "pruning/", "gradient/")) for key in metrics)
    assert {"samples/accuracy/S=1", "samples/accuracy/S=10"} <= set(metrics)
    assert not (out / "export").exists()
    assert not any(key.startswith("ood/") and "/fashion_mnist/" not in key for key in metrics)
    assert abs(metrics["ood/fashion_mnist/entropy_auroc"] - 0.5) < 0.15
    assert metrics["ood/fashion_mnist/entropy"] == pytest.approx(metrics["test/entropy"], rel=0.2)
    assert json.loads((out / "evaluation.json").read_text())["ood"] == "fashion_mnist"


def test_missing_ood_dataset_names_the_path(tmp_path, mnist_run):
    overrides = ["limit_test=10", *FAST, "ood=fashion_mnist", f"ood.path={tmp_path / 'nowhere'}"]
    cfg = compose_config(
        tmp_path, f"ckpt_path={mnist_run}", *overrides, "ood.download=false",
        config_name="evaluate",
    )  # fmt: skip
    with pytest.raises(UserError, match=r"nowhere.*FashionMNIST/raw; ood\.download=false") as info:
        evaluate(cfg)
    assert "\n" not in str(info.value)


def test_a_cifar_ood_set_on_an_mnist_run_is_one_line(tmp_path, mnist_run):
    cfg = compose_config(
        tmp_path, f"ckpt_path={mnist_run}", "limit_test=10", *FAST, "ood=cifar100",
        config_name="evaluate",
    )  # fmt: skip
    message = r"^ood=cifar100 needs a CIFAR run .*MNISTDataModule with inputs \(1, 28, 28\)"
    with pytest.raises(UserError, match=message) as info:
        evaluate(cfg)
    assert "\n" not in str(info.value) and not (tmp_path / "metrics.json").exists()


def test_an_image_ood_set_on_a_run_without_images_names_the_choice(tmp_path, tmp_path_factory):
    table = tmp_path / "table.csv"
    table.write_text("a,b,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(40)))
    run = _trained_run(
        tmp_path_factory,
        "csv_ood",
        "dataset=csv",
        f"dataset.path={table}",
        "dataset.target=label",
        "model=mlp_small",
        "trainer.max_epochs=1",
    )
    overrides = ["limit_test=10", *FAST, "ood=fashion_mnist"]
    cfg = compose_config(tmp_path, f"ckpt_path={run}", *overrides, config_name="evaluate")
    message = r"^ood\.kind=idx \(ood=fashion_mnist .*CSVDataModule: use ood=noise or ood=none$"
    with pytest.raises(UserError, match=message):
        evaluate(cfg)


# -- checkpoints and errors -------------------------------------------------------------------
def test_resolve_checkpoint_prefers_the_recorded_best(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    with pytest.raises(UserError, match="no checkpoints"):
        resolve_checkpoint(tmp_path)
    (folder / "last.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == (folder / "last.ckpt", tmp_path)
    for epoch in (1, 4):
        (folder / f"epoch{epoch:03d}.ckpt").write_bytes(b"")
    best = {
        "callbacks": {
            "ModelCheckpoint{'monitor': 'val/nll'}": {"best_model_path": "/x/epoch001.ckpt"}
        }
    }
    torch.save(best, folder / "last.ckpt")
    assert resolve_checkpoint(tmp_path)[0] == folder / "epoch001.ckpt"
    assert resolve_checkpoint(folder / "epoch004.ckpt") == (folder / "epoch004.ckpt", tmp_path)


def test_resolve_checkpoint_of_a_run_without_the_checkpoint_callback(tmp_path):
    """callbacks=none: Lightning's own checkpoint callback writes under the logger's folder;
    the run directory and that file both name the run (the file's run directory was taken to
    be tensorboard/, which holds no .hydra/config.yaml)."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    folder = tmp_path / "tensorboard" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "epoch=0-step=2.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == (folder / "epoch=0-step=2.ckpt", tmp_path)
    assert resolve_checkpoint(folder / "epoch=0-step=2.ckpt") == (
        folder / "epoch=0-step=2.ckpt",
        tmp_path,
    )
    (tmp_path / "checkpoints").mkdir()  # our own callback's folder comes first
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path)[0] == tmp_path / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("names", "latest"),
    [
        (["epoch=8-step=36.ckpt", "epoch=11-step=48.ckpt"], "epoch=11-step=48.ckpt"),
        (["epoch=3-step=9.ckpt", "epoch=3-step=10.ckpt"], "epoch=3-step=10.ckpt"),
        (
            ["epoch=2-step=9.ckpt", "epoch=10-step=10.ckpt", "epoch=9-step=99.ckpt"],
            "epoch=10-step=10.ckpt",
        ),
        (["epoch=8-step=36-v1.ckpt", "epoch=8-step=36.ckpt"], "epoch=8-step=36-v1.ckpt"),
        (["epoch=8-step=36-v2.ckpt", "epoch=8-step=36-v10.ckpt"], "epoch=8-step=36-v10.ckpt"),
        (
            ["epoch=9-val_loss=0.50.ckpt", "epoch=10-val_loss=0.90.ckpt"],
            "epoch=10-val_loss=0.90.ckpt",
        ),
        (["step=9.ckpt", "step=10.ckpt"], "step=10.ckpt"),
        (["epoch999.ckpt", "epoch1000.ckpt"], "epoch1000.ckpt"),
        (["manual.ckpt", "epoch=1-step=4.ckpt"], "epoch=1-step=4.ckpt"),
    ],
)
def test_resolve_checkpoint_takes_the_latest_by_the_numbers_in_the_names(tmp_path, names, latest):
    """After an in-place resume of a callbacks=none run, Lightning's folder holds the checkpoint
    of both runs: the later epoch (then step, then -vN) is taken, not the last name as text
    ('epoch=8' sorts after 'epoch=11' as text, so evaluate and predict took the stale one)."""
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    folder = tmp_path / "tensorboard" / "checkpoints"
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_bytes(b"")
    assert resolve_checkpoint(tmp_path) == (folder / latest, tmp_path)


def test_resolve_checkpoint_orders_names_without_numbers_by_modification_time(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, mtime in (("b.ckpt", 2_000_000), ("a.ckpt", 1_000_000), ("c.ckpt", 3_000_000)):
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (mtime, mtime))
    assert resolve_checkpoint(tmp_path)[0] == folder / "c.ckpt"
    os.utime(folder / "a.ckpt", (4_000_000, 4_000_000))
    assert resolve_checkpoint(tmp_path)[0] == folder / "a.ckpt"


def test_corrupt_checkpoint_is_one_user_error(tmp_path, toy_run):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text((toy_run / ".hydra" / "config.yaml").read_text())
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"last\.ckpt' is not allowed: not a checkpoint \(not a"):
        evaluate(compose_config(tmp_path / "out", f"ckpt_path={run}", config_name="evaluate"))


def test_cli_errors_are_one_line(tmp_path):
    result = run_cli("ckpt_path=/nonexistent/run", cwd=tmp_path, entry="evaluate")
    assert result.returncode != 0
    assert "ckpt_path='/nonexistent/run': no such run directory" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("sample_counts=5", r"^sample_counts=5 is not allowed: a list of integers >= 1"),
        ("pruning_fractions=abc", r"^pruning_fractions='abc' is not allowed: a list of numbers"),
        ("calibration_bins=0", r"^calibration_bins=0 is not allowed: an integer >= 1"),
        ("export.pruned_fraction=2", r"^export\.pruned_fraction=2 is not allowed: in \[0, 1\]"),
        ("attack.epsilons=[nan]", r"^attack\.epsilons=\[nan\] is not allowed"),
        (  # was an OverflowError traceback from the curve's step round(1000 * eps)
            "attack.epsilons=[0.1,inf]",
            r"^attack\.epsilons=\[0\.1, inf\] is not allowed: a list of finite numbers >= 0$",
        ),
        ("figures=no", r"^figures='no' is not allowed: true or false$"),
        ("attack.enabled=maybe", r"^attack\.enabled='maybe' is not allowed: true or false$"),
        ("export.enabled=1", r"^export\.enabled=1 is not allowed: true or false$"),
        (
            "attack.pgd_step_size=-1",
            r"^attack\.pgd_step_size=-1 is not allowed: a finite number > 0$",
        ),
        ("attack.pgd_step_size=abc", r"^attack\.pgd_step_size='abc' is not allowed: a finite"),
        ("ood.num_examples=-5", r"^ood\.num_examples=-5 is not allowed: an integer >= 1, or null"),
        ("ood.num_examples=abc", r"^ood\.num_examples='abc' is not allowed: an integer >= 1"),
        ("ood.num_examples=0", r"^ood\.num_examples=0 is not allowed: an integer >= 1"),
        ("ood=rotated ood.angle=abc", r"^ood\.angle='abc' is not allowed: a finite number"),
        ("ood=cifar100 ood.name=cifar20", r"^ood\.name='cifar20' is not allowed: one of cifar10"),
        ("ood=fashion_mnist ood.download=1", r"^ood\.download=1 is not allowed: true or false$"),
        ("ood=noise ood.name=a/b", r"^ood\.name='a/b' is not allowed: a name for the keys"),
    ],
)
def test_bad_settings_are_one_line_before_any_work(tmp_path, override, message):
    overrides = override.split()
    cfg = compose_config(tmp_path, "ckpt_path=/any/run", *overrides, config_name="evaluate")
    with pytest.raises(UserError, match=message):
        evaluate(cfg)


@pytest.mark.parametrize("entry", ["evaluate", "predict", "train"])
def test_help_lists_only_the_groups_the_entry_point_composes(tmp_path, entry):
    """Hydra's default help lists every group on the search path, train's included."""
    result = run_cli("--help", cwd=tmp_path, entry=entry)
    assert result.returncode == 0
    if entry == "train":  # every group of its folders but evaluate's ood, with every option
        listed = {
            group: sorted(options.split(", "))
            for group, options in (
                line.split(": ", 1)
                for line in result.stdout.split("== Configuration groups ==")[1]
                .split("== Config ==")[0]
                .splitlines()[2:]
                if line
            )
        }
        folders = {
            folder.name: sorted(p.stem for p in folder.glob("*.yaml"))
            for folder in CONF.iterdir()
            if folder.is_dir() and folder.name not in ("hydra", "ood", "analyses", "__pycache__")
        }
        assert listed == folders
        assert "hydra/launcher=basic" in result.stdout and "slurm" in result.stdout
        assert "--hydra-help" in result.stdout
        return
    assert "prior:" not in result.stdout and "optimizer:" not in result.stdout
    assert "ckpt_path: ???" in result.stdout
    ood_options = sorted(p.stem for p in (CONF / "ood").glob("*.yaml"))
    lines = result.stdout.splitlines()
    ood_line = [line for line in lines if line.startswith("ood:") and "one of" in line]
    if entry == "predict":
        assert not ood_line
    else:
        (line,) = ood_line
        assert sorted(line.split("one of ")[1].split(", ")) == ood_options


def test_posterior_figure_of_a_diverged_run_leaves_out_infinite_ratios():
    """A diverged run's last good state holds sigma = 0 (softplus of a rho of -1e30), so an SNR
    of inf: the figure's histograms hold the finite values (as TensorBoard's do); numpy's
    histogram raised 'supplied range ... is not finite' and evaluate ended in a traceback."""
    from bbb_lightning.evaluation.figures import close, posterior_histograms

    sigma = torch.tensor([0.0, 1e-3, 1e-2, 1e-1])
    snr = torch.tensor([1.0, 2.0]).abs() / torch.tensor([0.0, 1.0])  # inf, 2
    figure = posterior_histograms({"w": sigma}, {"w": snr})
    sigma_axis, snr_axis = figure.axes
    counts = [sum(patch.get_height() for patch in axis.patches) for axis in figure.axes]
    assert counts == [4, 1]  # sigma 0 counts as 1e-30; the inf ratio is left out
    assert snr_axis.patches[0].get_x() <= torch.tensor(2.0).log10() <= snr_axis.get_xlim()[1]
    assert sigma_axis.get_xlim()[0] <= -30
    close(figure)
