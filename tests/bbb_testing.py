"""Helpers shared by the end-to-end tests: compose the real config, run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

QUICK = [
    "trainer.max_epochs=2",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
]


def compose_config(output_dir: Path, *overrides: str, config_name: str = "config"):
    """The real composed config (``config``, ``evaluate`` or ``predict``) writing to output_dir."""
    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        return compose(config_name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def run_cli(
    *args: str, cwd: Path, entry: str = "train", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """``python -m bbb_lightning.<entry> <args>`` in ``cwd`` (``env`` added), output captured."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"bbb_lightning.{entry}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
