"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
