"""Helpers shared by the end-to-end tests: compose the real config, run the real CLI."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

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
    *args: str,
    cwd: Path,
    entry: str = "train",
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess:
    """``python -m bbb_lightning.<entry> <args>`` in ``cwd`` (``env`` added), output captured;
    ``preexec_fn`` runs in the child before it starts (a resource limit, dropped privileges)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", f"bbb_lightning.{entry}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=preexec_fn,
    )


def obey_file_permissions() -> None:
    """For a child process (``preexec_fn``): when it runs as root, drop the capabilities that let
    root write into a directory without write permission (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)
    from its bounding set, so that after ``exec`` it obeys permission bits like any user."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for capability in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def can_obey_file_permissions(directory: Path) -> bool:
    """Whether a child started with :func:`obey_file_permissions` is refused a write into the
    read-only ``directory`` (False where root cannot drop its capabilities)."""
    probe = [sys.executable, "-c", f"open({str(directory / 'probe')!r}, 'w')"]
    try:
        result = subprocess.run(probe, preexec_fn=obey_file_permissions, capture_output=True)
    except subprocess.SubprocessError:
        return False
    return result.returncode != 0 and not (directory / "probe").exists()


class WidthNet(nn.Module):
    """A user's network, ``model.net._target_=bbb_testing.WidthNet``: one hidden layer of
    ``width`` units, and none of the default MLP's ``hidden`` / ``activation`` arguments.
    ``outputs``: its number of outputs (default: the likelihood's); ``as_tuple``: it returns
    (outputs, x) instead of one tensor."""

    def __init__(
        self,
        input_shape: list[int],
        num_outputs: int,
        width: int = 8,
        outputs: int | None = None,
        as_tuple: bool = False,
    ) -> None:
        super().__init__()
        self.hidden = nn.Linear(input_shape[0], width)
        self.out = nn.Linear(width, outputs or num_outputs)
        self.as_tuple = as_tuple

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        out = self.out(torch.relu(self.hidden(x)))
        return (out, x) if self.as_tuple else out


class SqrtAtZero(nn.Module):
    """Finite output, infinite gradient at any scale: d sqrt(u) / du at u = 0."""

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        return out + torch.sqrt(out - out.detach())


class NaNOnRank(WidthNet):
    """:class:`WidthNet` whose training outputs are NaN on data-parallel process ``rank`` from its
    ``after``-th training forward on (a non-finite loss on one process only)."""

    def __init__(self, input_shape: list[int], num_outputs: int, rank: int = 1, after: int = 2):
        super().__init__(input_shape, num_outputs)
        self.rank, self.after, self.calls = rank, after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.training and torch.distributed.is_initialized():
            self.calls += 1
            if torch.distributed.get_rank() == self.rank and self.calls >= self.after:
                out = out * float("nan")
        return out


def fit_briefly(
    model: pl.LightningModule,
    x: torch.Tensor,
    y: torch.Tensor,
    root: Path,
    callbacks: list[pl.Callback] | None = None,
    plugins: list | None = None,
    epochs: int = 1,
) -> pl.Trainer:
    """``epochs`` epochs of (x, y) in batches of 4 on the CPU: no logger, checkpoint, progress
    bar or summary."""
    trainer = pl.Trainer(
        accelerator="cpu",
        plugins=plugins,
        callbacks=callbacks,
        max_epochs=epochs,
        logger=False,
        default_root_dir=root,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=4))
    return trainer


def write_uci_set(root: Path, name: str = "toyset", rows: int = 80, splits: int = 2) -> Path:
    """A small set in the layout of the UCI splits: 3 inputs (columns 0, 1, 3), the target in
    column 2, ``splits`` random 90 % / 10 % splits, a 7-unit protocol net. Every value is
    distinct, so each standardised row can be traced back to its row of ``data.txt``."""
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[5.0, -3.0, 100.0], scale=[2.0, 0.5, 30.0], size=(rows, 3))
    y = 40.0 + 12.0 * np.sin(x[:, 0]) + 0.1 * x[:, 2] + rng.normal(0.0, 1.5, rows)
    data = np.column_stack([x[:, 0], x[:, 1], y, x[:, 2]])
    folder = root / name
    folder.mkdir(parents=True)
    np.savetxt(folder / "data.txt", data, fmt="%.10f", delimiter=" \t")
    np.savetxt(folder / "index_features.txt", [0, 1, 3], fmt="%d")
    np.savetxt(folder / "index_target.txt", [2], fmt="%d")
    for split in range(splits):
        order = rng.permutation(rows)
        num_test = rows // 10
        np.savetxt(folder / f"index_train_{split}.txt", order[num_test:], fmt="%d")
        np.savetxt(folder / f"index_test_{split}.txt", order[:num_test], fmt="%d")
    for file, value in (("n_splits.txt", splits), ("n_hidden.txt", 7), ("n_epochs.txt", 40)):
        (folder / file).write_text(f"{value}\n")
    return folder
