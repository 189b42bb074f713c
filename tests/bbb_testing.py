"""Helpers shared by the end-to-end tests: compose the real config, run the real CLI."""

from __future__ import annotations

import ctypes
import os
import signal as signal_module
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

QUICK = [
    "trainer.max_epochs=2",
    "callbacks.progress_bar=null",
    "trainer.enable_model_summary=false",
    "extras.print_config=false",
]


def compose_config(output_dir: Path, *overrides: str, config_name: str = "config"):
    """The real composed config (``config``, ``evaluate`` or ``predict``) writing to output_dir."""
    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        return compose(config_name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    accumulator.Reload()
    return accumulator


def hparams_plugin(accumulator: EventAccumulator) -> tuple[Any, Any]:
    """The HParams plugin's experiment and session start info in a run's events."""
    found = {}
    for tag, meta in accumulator.summary_metadata.items():
        if meta.plugin_data.plugin_name == "hparams":
            found[tag] = HParamsPluginData.FromString(meta.plugin_data.content)
    return found["_hparams_/experiment"].experiment, found[
        "_hparams_/session_start_info"
    ].session_start_info


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


class SignalAt(pl.Callback):
    """Send ``signal`` (a name: ``SIGTERM``) to this process at ``hook`` (``on_train_batch_end``,
    ``on_validation_batch_end`` or ``on_train_epoch_end``) of training epoch ``epoch`` at its
    ``batch`` (the batch index within the epoch or the validation; ignored for epoch ends):
    ``callbacks.signal_at._target_=bbb_testing.SignalAt``. A real signal, handled by the handlers
    Lightning installs, at a chosen point of training."""

    def __init__(self, hook: str, epoch: int, batch: int = 0, signal: str = "SIGTERM") -> None:
        self.hook, self.epoch, self.batch, self.signal = hook, epoch, batch, signal
        self.sent = False

    def _maybe_send(self, trainer: pl.Trainer, hook: str, batch: int) -> None:
        if self.sent or trainer.sanity_checking or hook != self.hook:
            return
        if trainer.current_epoch == self.epoch and batch == self.batch:
            self.sent = True
            os.kill(os.getpid(), getattr(signal_module, self.signal))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._maybe_send(trainer, "on_train_batch_end", batch_idx)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        self._maybe_send(trainer, "on_validation_batch_end", batch_idx)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._maybe_send(trainer, "on_train_epoch_end", self.batch)


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


def python2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2's ``cPickle.dump(obj, f, 2)`` wrote the CIFAR batches:
    ``bytes`` as Python 2 ``str`` (SHORT_BINSTRING / BINSTRING, no ``_codecs`` call), uint8
    numpy arrays as numpy 1.x reduced them (``numpy.core.multiarray._reconstruct``, a dtype
    state ``(3, '|', ...)``). Supports dicts, lists, bytes, ints and 2-D uint8 arrays."""
    import pickle
    import struct

    def string(value: bytes) -> bytes:
        if len(value) < 256:
            return pickle.SHORT_BINSTRING + bytes([len(value)]) + value
        return pickle.BINSTRING + struct.pack("<i", len(value)) + value

    def integer(value: int) -> bytes:
        if 0 <= value < 256:
            return pickle.BININT1 + bytes([value])
        return pickle.BININT + struct.pack("<i", value)

    def encode(value: object) -> bytes:
        if isinstance(value, bytes):
            return string(value)
        if isinstance(value, int):
            return integer(value)
        if isinstance(value, list):
            return pickle.EMPTY_LIST + pickle.MARK + b"".join(map(encode, value)) + pickle.APPENDS
        if isinstance(value, dict):
            items = b"".join(encode(k) + encode(v) for k, v in value.items())
            return pickle.EMPTY_DICT + pickle.MARK + items + pickle.SETITEMS
        if not isinstance(value, np.ndarray):
            raise TypeError(f"python2_pickle: unsupported {type(value).__name__}")
        assert value.dtype == np.uint8 and value.ndim == 2
        array = pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n"
        array += pickle.GLOBAL + b"numpy\nndarray\n" + integer(0) + pickle.TUPLE1 + string(b"b")
        array += pickle.TUPLE3 + pickle.REDUCE
        dtype = pickle.GLOBAL + b"numpy\ndtype\n" + string(b"u1") + integer(0) + integer(1)
        dtype += pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + integer(3) + string(b"|")
        dtype += pickle.NONE * 3 + integer(-1) + integer(-1) + integer(0) + pickle.TUPLE
        dtype += pickle.BUILD
        shape = integer(value.shape[0]) + integer(value.shape[1]) + pickle.TUPLE2
        state = pickle.MARK + integer(1) + shape + dtype + pickle.NEWFALSE
        state += string(value.tobytes()) + pickle.TUPLE
        return array + state + pickle.BUILD

    return pickle.PROTO + b"\x02" + encode(obj) + pickle.STOP


def write_cifar_batches(
    root: Path, name: str = "cifar10", per_batch: int = 12, layout: str = "folder", seed: int = 0
) -> Path:
    """Tiny CIFAR files in the exact format of the originals (:func:`python2_pickle` of a dict
    with ``data`` uint8 ``(N, 3072)``, ``labels`` / ``fine_labels`` a list, ``filenames``, ...;
    CIFAR-100 also ``coarse_labels``). ``layout``: ``folder`` (root/cifar-10-batches-py/,
    torchvision's root), ``flat`` (the batch files in root) or ``archive``
    (root/cifar-10-python.tar.gz only). Returns what data_dir names."""
    import tarfile

    from bbb_lightning.data.pickle_batches import CIFAR_SETS

    spec = CIFAR_SETS[name]
    rng = np.random.default_rng(seed)
    folder = root / spec.folder if layout != "flat" else root
    folder.mkdir(parents=True, exist_ok=True)
    for file in (*spec.train, *spec.test):
        labels = [int(v) for v in rng.integers(0, spec.num_classes, per_batch)]
        content = {
            b"batch_label": f"{file} of the test set".encode(),
            spec.label_key.encode(): labels,
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [f"image_{file}_{i}.png".encode() for i in range(per_batch)],
        }
        if name == "cifar100":
            content[b"coarse_labels"] = [v // 5 for v in labels]
        (folder / file).write_bytes(python2_pickle(content))
    names = [f"class{i}".encode() for i in range(spec.num_classes)]
    (folder / spec.meta).write_bytes(python2_pickle({spec.names_key.encode(): names}))
    if layout != "archive":
        return root
    with tarfile.open(root / spec.archive, "w:gz") as tar:
        tar.add(folder, arcname=spec.folder)
    for file in folder.iterdir():
        file.unlink()
    folder.rmdir()
    return root
