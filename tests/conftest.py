"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bbb_lightning.train import train
from bbb_testing import compose_config

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """A local MNIST copy: ``$BBB_MNIST_DIR``, else ``shared/data/MNIST`` beside the repo."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "MNIST"
    root = Path(os.environ.get("BBB_MNIST_DIR", default))
    for name in _MNIST_FILES:
        paths = [folder / f"{name}{ext}" for folder in (root, root / "raw") for ext in ("", ".gz")]
        if not any(path.is_file() for path in paths):
            pytest.skip(f"no local MNIST copy in {root} (set BBB_MNIST_DIR to one)")
    return root


TRAIN_QUICK = [
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    "logger=none",
    "extras.print_config=false",
]
MNIST_QUICK = [
    "dataset=mnist",
    "model=mlp",
    "+dataset.limit_train=2000",
    "trainer.max_epochs=1",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def _trained_run(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """A training run dir as the command line leaves it (with .hydra/config.yaml)."""
    run_dir = tmp_path_factory.getbasetemp() / "bbb_trained_runs" / name
    cfg = compose_config(run_dir, *TRAIN_QUICK, *overrides)
    train(cfg)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A toy-regression run trained once per session (3 epochs)."""
    return _trained_run(tmp_path_factory, "toy", "trainer.max_epochs=3")


@pytest.fixture(scope="session")
def mnist_run(tmp_path_factory, mnist_dir) -> Path:
    """An MNIST MLP run trained once per session (2,000 images, 1 epoch)."""
    return _trained_run(tmp_path_factory, "mnist", *MNIST_QUICK, f"dataset.data_dir={mnist_dir}")
