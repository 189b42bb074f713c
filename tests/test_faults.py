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
from hydra import compose, initialize_config_module

from bbb_lightning.cli.errors import UserError
from bbb_lightning.evaluate import evaluate
from bbb_lightning.storage.checkpoint_files import checkpoint_problem
from bbb_lightning.storage.run_lock import LOCK_NAME
from bbb_lightning.train import train
from bbb_lightning.training.faults import RunFault
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
    kept = [name for name in before if name.startswith("checkpoints/") or name == "metrics.json"]
    assert {name: after[name] for name in kept} == {name: before[name] for name in kept}
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


# -- preemption (SIGTERM) --------------------------------------------------------------------------
def _without_timing(metrics: dict[str, float]) -> dict[str, float]:
    return {name: value for name, value in metrics.items() if name != "fit_seconds"}


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


def _assert_same_weights(one: Path, other: Path) -> None:
    ours, theirs = _weights(one), _weights(other)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize(
    ("hook", "batch", "step", "where"),
    [
        ("on_train_batch_end", 1, 6, "batch 2 of 4)"),
        ("on_validation_batch_end", 0, 8, "batch 4 of 4, at the validation)"),
        ("on_train_epoch_end", 0, 8, "batch 4 of 4, at the end of the epoch)"),
    ],
    ids=["mid-epoch", "mid-validation", "epoch-end"],
)
def test_a_run_stopped_by_sigterm_resumes_as_if_never_stopped(tmp_path, hook, batch, step, where):
    """A real SIGTERM to this process at a chosen point of epoch 1 (of 3; 4 minibatches and 2
    validation batches per epoch), handled by Lightning's handler: the state of that step is
    saved, and a resume from it ends with the uninterrupted run's metrics and weights. Lightning
    alone exited with status 0 and saved nothing; resumed from a mid-validation state it would
    have skipped that validation."""
    # a checkpoint per validation: one not run after the resume is a file missing
    overrides = ["trainer.max_epochs=3", "+callbacks.model_checkpoint.save_top_k=-1", *QUIET]
    reference = train(compose_config(tmp_path / "reference", *overrides))
    run = tmp_path / "run"
    signal_at = "+callbacks.signal_at."
    signalled = [f"{signal_at}_target_=bbb_testing.SignalAt", f"{signal_at}hook={hook}"]
    signalled += [f"{signal_at}epoch=1", f"{signal_at}batch={batch}"]
    with pytest.raises(RunFault) as fault:
        train(compose_config(run, *overrides, *signalled))
    last = run / "checkpoints" / "last.ckpt"
    assert fault.value.exit_status == 143
    assert str(fault.value).startswith(f"stopped by SIGTERM at step {step} (epoch 1, {where}; ")
    assert torch.load(last, weights_only=False)["global_step"] == step
    assert not (run / "metrics.json").exists()

    resumed = train(compose_config(run, *overrides, f"ckpt_path={last}"))
    assert _without_timing(resumed) == pytest.approx(_without_timing(reference), rel=1e-6)
    _assert_same_weights(last, tmp_path / "reference" / "checkpoints" / "last.ckpt")
    checkpoints = sorted(os.listdir(run / "checkpoints"))
    assert checkpoints == sorted(os.listdir(tmp_path / "reference" / "checkpoints"))
    assert checkpoints == ["epoch000.ckpt", "epoch001.ckpt", "epoch002.ckpt", "last.ckpt"]


PREEMPTED = ["trainer.max_epochs=3", "dataset.batch_size=32", *QUIET]  # 16 steps an epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run that the preempted ones below must end as (trained once for the module)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    train(compose_config(run, *PREEMPTED))
    return run


def _start(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m bbb_lightning.train <args>`` as a real process whose stderr is kept."""
    return subprocess.Popen(
        [sys.executable, "-m", "bbb_lightning.train", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stopped_line(stderr: str, run: Path) -> tuple[str, int]:
    """The one line of a run stopped by SIGTERM, and the step it names."""
    (line,) = _error_lines(stderr, "stopped by SIGTERM")
    last = run / "checkpoints" / "last.ckpt"
    saved, folder = re.escape(str(last)), re.escape(str(run))
    match = re.search(
        rf"\[ERROR\] - stopped by SIGTERM at step (\d+) \(epoch (\d), batch (\d+) of 16(, at the "
        rf"(validation|end of the epoch))?\); the state of that step is saved in {saved}; to go "
        rf"on, run the same command again in {folder} \(a requeued SLURM job does so by "
        rf"itself\), or resume it with ckpt_path={saved}$",
        line,
    )
    assert match, line
    step, epoch, batch = (int(match.group(i)) for i in (1, 2, 3))
    assert step == 16 * epoch + batch
    assert torch.load(last, weights_only=False)["global_step"] == step
    return line, step


def _assert_ends_as(run: Path, uninterrupted: Path) -> None:
    ours = json.loads((run / "metrics.json").read_text())
    theirs = json.loads((uninterrupted / "metrics.json").read_text())
    assert _without_timing(ours) == pytest.approx(_without_timing(theirs), rel=1e-6)
    checkpoints = "checkpoints/last.ckpt"
    _assert_same_weights(run / checkpoints, uninterrupted / checkpoints)


def test_sigterm_saves_the_step_exits_143_and_the_same_command_resumes(tmp_path, uninterrupted):
    """A real SIGTERM to a real run after its first epoch: it exited 0 after `Received SIGTERM`,
    with last.ckpt at the epoch before, no metrics.json and an empty train.log. Now: the state
    of the step it reached, one line (on stderr and in train.log), status 143; the same command
    again resumes from that state and ends as the uninterrupted run."""
    run = tmp_path / "run"
    command = [f"hydra.run.dir={run}", *PREEMPTED]
    process = _start(*command, cwd=tmp_path)
    try:
        _wait_for((run / "checkpoints" / "last.ckpt").is_file, process, "its first checkpoint")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    line, step = _stopped_line(stderr, run)
    assert 16 <= step < 48
    assert "Traceback" not in stderr
    assert not (run / "metrics.json").exists()
    assert line.split("] - ", 1)[1] in (run / "train.log").read_text()

    again = run_cli(*command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    (resumed,) = _error_lines(again.stderr, "Resuming the unfinished run")
    last = run / "checkpoints" / "last.ckpt"
    assert resumed.endswith(
        f"Resuming the unfinished run in {run} from {last} (step {step}): it was started with "
        "this same config"
    ), resumed
    _assert_ends_as(run, uninterrupted)


def _fake_scontrol(folder: Path) -> Path:
    """An ``scontrol`` that records its arguments and, as SLURM does to a job it requeues, sends
    SIGTERM to the job (its caller)."""
    folder.mkdir()
    script = folder / "scontrol"
    script.write_text('#!/bin/sh\necho "$@" >> "$SCONTROL_LOG"\nkill -TERM "$PPID"\n')
    script.chmod(0o755)
    return folder


def test_under_slurm_the_requeue_signal_requeues_and_the_requeued_job_resumes(
    tmp_path, uninterrupted
):
    """SLURM simulated by its environment (a batch job of one task) and an ``scontrol`` on the
    PATH; the signals are real. SIGUSR1 (``--signal=USR1@<s>``): the requeue handler calls
    ``scontrol requeue 4242``, whose SIGTERM stops the run at the next step, saving it (status
    143). The requeued job, the same command in the same environment,
    finds its directory (outputs/slurm-4242) and resumes by itself."""
    log = tmp_path / "scontrol.log"
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "bbb",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
        "SCONTROL_LOG": str(log),
        "PATH": f"{_fake_scontrol(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
    }
    run = tmp_path / "outputs" / "slurm-4242"
    process = _start(*PREEMPTED, cwd=tmp_path, env=env)
    try:
        _wait_for((run / "checkpoints" / "last.ckpt").is_file, process, "its first checkpoint")
        process.send_signal(signal.SIGUSR1)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    assert log.read_text() == "requeue 4242\n"
    _, step = _stopped_line(stderr, run)
    assert 16 <= step < 48
    assert not list(run.glob("hpc_ckpt_*.ckpt"))  # nothing saved inside the signal handler
    assert "Traceback" not in stderr and not (run / "metrics.json").exists()

    requeued = run_cli(*PREEMPTED, cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert len(_error_lines(requeued.stderr, f"Resuming the unfinished run in {run}")) == 1
    assert log.read_text() == "requeue 4242\n"  # no second requeue
    assert sorted(path.name for path in (tmp_path / "outputs").iterdir()) == ["slurm-4242"]
    _assert_ends_as(run, uninterrupted)


def test_the_slurm_launcher_asks_for_the_signal_lightning_requeues_on(tmp_path):
    """The sbatch script of ``hydra/launcher=slurm`` has SLURM send USR1 signal_delay_s ahead of
    the time limit and allows the requeue; the job's trainer listens to that signal."""
    submitit_slurm = pytest.importorskip("submitit.slurm.slurm")
    from bbb_lightning.training.preemption import requeue_signal

    with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.signal_delay_s=300"]
        launcher = compose("config", overrides, return_hydra_config=True).hydra.launcher
    script = submitit_slurm._make_sbatch_string(
        command="python -m submitit.core._submit",
        folder=str(tmp_path),
        signal_delay_s=launcher.signal_delay_s,
        additional_parameters=dict(launcher.additional_parameters),
    )
    assert "#SBATCH --signal=USR1@300" in script.splitlines()
    assert "#SBATCH --requeue" in script.splitlines()
    assert requeue_signal(launcher) == signal.SIGUSR1


# -- a lost data-parallel process ------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """The pids of the processes ``pid`` started (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.slow
@pytest.mark.parametrize("lost", [1, 0], ids=["rank-1", "rank-0"])
def test_a_killed_ddp_process_is_one_line_naming_it_and_the_last_checkpoint(tmp_path, lost):
    """trainer=ddp_cpu (2 gloo processes; rank 0 launches rank 1); one of them gets SIGKILL after
    the first checkpoint. The survivor printed a 127-line gloo traceback (`Connection reset by
    peer`) that never named the process; now one line names it and the last checkpoint, the
    survivor exits with status 1 at once and nothing is left running."""
    run = tmp_path / "run"
    process = _start(
        f"hydra.run.dir={run}", "trainer=ddp_cpu", "trainer.max_epochs=50", *QUIET, cwd=tmp_path
    )
    try:
        _wait_for((run / "checkpoints" / "last.ckpt").is_file, process, "its first checkpoint")
        (child,) = _children(process.pid)
        pids = {0: process.pid, 1: child}
        os.kill(pids[lost], signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)  # EOF: every process has ended
    finally:
        process.kill()
    survivor = 1 - lost
    last = run / "checkpoints" / "last.ckpt"
    step = torch.load(last, weights_only=False)["global_step"]
    (line,) = _error_lines(stderr, "[ERROR]")
    assert re.search(
        rf"\] - data-parallel process of rank {lost} \(pid {pids[lost]} on "
        rf"{re.escape(socket.gethostname())}, {'killed by SIGKILL' if lost else 'gone'}\) was "
        rf"lost at step \d+; this process \(rank {survivor}\) stops too; the last checkpoint is "
        rf"{re.escape(str(last))} \(step {step}\): resume with ckpt_path={re.escape(str(last))}$",
        line,
    ), line
    assert "Traceback" not in stderr and "Connection reset" not in stderr
    assert process.returncode == (1 if lost == 1 else -signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not _gone(pids[survivor]):  # rank 1 is no child of this process: its status is unseen
        assert time.monotonic() < deadline, "the survivor did not end"
        time.sleep(0.1)
    log = run / ("train.log" if survivor == 0 else "train_ddp_process_1.log")
    assert line.split("] - ", 1)[1] in log.read_text()
    assert not (run / "metrics.json").exists()
    assert checkpoint_problem(last) is None


@pytest.mark.slow
def test_sigterm_stops_every_ddp_process_at_the_same_step(tmp_path):
    """SIGTERM to the launching process of a ddp_cpu run: Lightning's handler broadcast from
    inside the handler while the processes were in other collectives, and the run hung (2 of 2
    tries). They agree after each batch now: one line, status 143, the state of one step."""
    run = tmp_path / "run"
    command = [f"hydra.run.dir={run}", "trainer=ddp_cpu", "trainer.max_epochs=50", *QUIET]
    process = _start(*command, "dataset.batch_size=16", cwd=tmp_path)
    try:
        _wait_for((run / "checkpoints" / "last.ckpt").is_file, process, "its first checkpoint")
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-3000:]
    _stopped_line(stderr, run)
    assert "Traceback" not in stderr
