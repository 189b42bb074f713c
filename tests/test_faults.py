"""Faults a cluster deals out, each provoked for real on a real run (docs/errors.md, "Faults"):
a full disk, a read-only directory, damaged checkpoints, two runs in one directory, a finished
run resumed, preemption (SIGTERM, SLURM's requeue) and a lost data-parallel process."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bbb_lightning.cli.errors import UserError
from bbb_lightning.evaluate import evaluate
from bbb_lightning.storage.run_lock import LOCK_NAME
from bbb_lightning.train import train
from bbb_testing import can_obey_file_permissions, compose_config, obey_file_permissions, run_cli

QUIET = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false", "logger=none"]


def _files(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` (hidden ones too) -> the md5 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _error_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


# -- a full disk -----------------------------------------------------------------------------------
def _file_size_limit(limit: int):
    """A ``preexec_fn``: files of the child may grow to ``limit`` bytes; a write beyond fails
    with EFBIG (``File too large``), as on a full disk (Python ignores SIGXFSZ)."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return apply


def test_a_full_disk_leaves_no_partial_checkpoint_and_the_earlier_ones_intact(tmp_path):
    """Resumed in place with a file-size limit below a checkpoint's size, the run cannot write
    its next checkpoint: Lightning wrote straight onto ``last.ckpt``, truncating it to the limit
    (a later resume or evaluate failed on it)."""
    run = tmp_path / "run"
    train(compose_config(run, "trainer.max_epochs=1", *QUIET))
    before = _files(run)
    checkpoint_size = (run / "checkpoints" / "last.ckpt").stat().st_size
    resume = [f"hydra.run.dir={run}", f"ckpt_path={run}/checkpoints/last.ckpt"]
    result = run_cli(
        *resume,
        "trainer.max_epochs=2",
        *QUIET,
        cwd=tmp_path,
        preexec_fn=_file_size_limit(checkpoint_size // 2),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr, "could not write")
    assert re.search(
        rf"could not write {re.escape(str(run))}/checkpoints/(epoch001|last)\.ckpt \(File too "
        rf"large\); [\d.]+ (bytes|KB|MB|GB|TB) free on the file system of .*checkpoints; no "
        "partial file was left",
        line,
    ), line
    assert "Traceback" not in result.stderr
    after = _files(run)
    assert {name: after[name] for name in before} == before  # checkpoints, metrics.json intact
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch000.ckpt", "last.ckpt"]


# -- a read-only output directory ----------------------------------------------------------------
def test_a_read_only_output_directory_is_one_line_naming_it(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        if not can_obey_file_permissions(run):
            pytest.skip("this process cannot give up root's right to write anywhere")
        result = run_cli(
            f"hydra.run.dir={run}", *QUIET, cwd=tmp_path, preexec_fn=obey_file_permissions
        )
    finally:
        run.chmod(0o755)
    assert result.returncode == 1
    assert _error_lines(result.stderr, "ERROR") == [
        f"[bbb_lightning.cli.hydra_callbacks][ERROR] - output directory {str(run)!r} is not "
        "writable "
        f"(it: Permission denied); choose another hydra.run.dir, or make {run} writable"
    ], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert list(run.iterdir()) == []


# -- damaged checkpoints ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (b"", "not a checkpoint (empty)"),
        (os.urandom(4096), "not a checkpoint (not a zip archive: 4096 bytes of something else"),
    ],
    ids=["zero-byte", "random-bytes"],
)
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(
    tmp_path, toy_run, damage, problem
):
    """torch said ``mmap can only be used with files saved with ...`` for both. Resuming from a
    damaged ``last.ckpt`` names the best epoch's file; evaluating a run directory whose best
    checkpoint is damaged names ``last.ckpt`` (12 steps: 3 epochs of 4 minibatches)."""
    for damaged in ("last.ckpt", "epoch"):
        run = tmp_path / damaged
        shutil.copytree(toy_run, run)
        folder = run / "checkpoints"
        (best,) = folder.glob("epoch*.ckpt")  # top-1 by val/nll
        best_step = 4 * (int(best.stem.removeprefix("epoch")) + 1)
        if damaged == "last.ckpt":
            (folder / "last.ckpt").write_bytes(damage)
            with pytest.raises(UserError) as error:
                train(compose_config(run, f"ckpt_path={folder / 'last.ckpt'}", *QUIET))
            bad, intact, step = folder / "last.ckpt", best, best_step
        else:
            best.write_bytes(damage)
            with pytest.raises(UserError) as error:
                evaluate(compose_config(run / "eval", f"ckpt_path={run}", config_name="evaluate"))
            bad, intact, step = best, folder / "last.ckpt", 12
        message = str(error.value)
        assert message.startswith(f"ckpt_path='{bad}' is not allowed: {problem}")
        assert message.endswith(
            f"; the newest intact checkpoint beside it is {intact} (step {step}): use that one"
        )


# -- two runs into one directory -------------------------------------------------------------------
def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_second_run_into_the_same_directory_stops_naming_the_first(tmp_path):
    """Both were let in (the refusal saw only runs that had written checkpoints): checkpoints
    interleaved as last.ckpt / last-v1.ckpt, and metrics.json was whichever finished last.
    The lock of a run killed with SIGKILL stays behind as a file and is taken over."""
    run = tmp_path / "run"
    first = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bbb_lightning.train",
            f"hydra.run.dir={run}",
            "trainer.max_epochs=2000",
            *QUIET,
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        lock = run / LOCK_NAME
        last = run / "checkpoints" / "last.ckpt"
        _wait_for(last.is_file, first, "its first checkpoint")  # it is training
        assert f'"pid": {first.pid}' in lock.read_text()
        overrides = (run / ".hydra" / "overrides.yaml").read_bytes()
        second = run_cli(f"hydra.run.dir={run}", "seed=1", *QUIET, cwd=tmp_path)
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 1
    (line,) = _error_lines(second.stderr, "ERROR")
    assert line.startswith(
        f"[bbb_lightning.cli.hydra_callbacks][ERROR] - output directory {str(run)!r} is in use by "
        f"another run (pid {first.pid} on host {socket.gethostname()}, started "
    ), line
    assert line.endswith("); wait for it to end, or choose another hydra.run.dir"), line
    assert "Traceback" not in second.stderr
    assert (run / ".hydra" / "overrides.yaml").read_bytes() == overrides  # not the second's
    assert not (run / "metrics.json").exists()

    # the first was killed: its lock file says so, and is stale
    assert f'"pid": {first.pid}' in lock.read_text()
    epochs = torch.load(last, weights_only=False)["epoch"] + 1
    resumed = [f"ckpt_path={last}", f"trainer.max_epochs={epochs}", *QUIET]
    assert train(compose_config(run, *resumed))["epochs"] == epochs
    assert not lock.exists()  # released at the end of the run


# -- a finished run resumed in place ---------------------------------------------------------------
def test_resuming_a_finished_run_in_place_keeps_its_metrics(tmp_path):
    """It exited 0 and rewrote metrics.json without val/nll and val/rmse."""
    run = tmp_path / "run"
    train(compose_config(run, "trainer.max_epochs=1", *QUIET))
    before = _files(run)
    assert "val/nll" in json.loads((run / "metrics.json").read_text())
    last = run / "checkpoints" / "last.ckpt"
    result = run_cli(
        f"hydra.run.dir={run}", f"ckpt_path={last}", "trainer.max_epochs=1", *QUIET, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = _error_lines(result.stderr, "Nothing left to train")
    assert line.endswith(
        f"Nothing left to train: {last} is at the end of training (it has trained 1 epochs, "
        f"trainer.max_epochs=1); {run / 'metrics.json'} is kept as it was (raise "
        "trainer.max_epochs to train on)"
    ), line
    after = _files(run)
    assert {name: after[name] for name in before} == before
