"""The native kernels' build cache and lock, as several environments on one machine meet them.

The cache folder is keyed by what the build depends on (torch installation, Python, source,
flags), so two virtual environments or two clones never load or rebuild each other's kernels;
a process that waits on another's build says so in one line; and a bad override is reported
before any build starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bbb_lightning.bayes import native
from bbb_testing import run_cli

needs_native = pytest.mark.skipif(
    native.kernels() is None, reason="native kernels could not be built here (no compiler?)"
)
ISA = torch.backends.cpu.get_cpu_capability()


def test_the_cache_folder_is_keyed_by_torch_installation_source_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    here = native.build_directory(ISA)
    assert here.parent == tmp_path / "bbb_lightning"
    assert native.build_directory(ISA) == here  # stable
    assert native.build_directory("portable") != native.build_directory("AVX2")  # flags

    # Another virtual environment: the same torch version installed in another directory.
    other_env = tmp_path / "venv2" / "site-packages" / "torch" / "__init__.py"
    monkeypatch.setattr(torch, "__file__", str(other_env))
    assert native.build_directory(ISA) != here
    monkeypatch.undo()

    # Another clone whose kernels' source differs.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    changed = tmp_path / "gaussian.cpp"
    changed.write_bytes(native.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.build_directory(ISA) != here


def _python(code: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_native
def test_a_process_waiting_on_another_build_says_so_and_then_loads_it() -> None:
    directory = native.build_directory(ISA)  # built (and cached) by needs_native above
    holder = _python(
        "import fcntl, os, sys, time;"
        f"h = open({str(directory / 'build.flock')!r}, 'a+');"
        "fcntl.flock(h, fcntl.LOCK_EX); h.seek(0); h.truncate(); h.write(f'{os.getpid()}\\n');"
        "h.flush(); print('locked', flush=True); time.sleep(120)"
    )
    lines: list[str] = []
    try:
        assert holder.stdout.readline().strip() == "locked"
        waiter = _python(
            "import torch; from bbb_lightning.bayes import native;"
            "native.build(torch.backends.cpu.get_cpu_capability()); print('loaded')"
        )
        reader = threading.Thread(target=lambda: lines.extend(waiter.stderr), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120  # importing torch on a loaded machine takes a while
        while not any("waiting" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert waiter.poll() is None  # it waits on the holder
    finally:
        holder.kill()
        holder.wait()
    out = waiter.stdout.read()
    waiter.wait(timeout=300)
    reader.join(timeout=60)
    err = "".join(lines)
    assert waiter.returncode == 0, err
    assert out.strip() == "loaded"
    waiting = [line for line in lines if "waiting" in line]
    assert len(waiting) == 1, err
    assert f"waiting for the native kernels' build in {directory}" in waiting[0]
    assert f"held by pid {holder.pid}" in waiting[0]


def test_a_bad_override_is_reported_before_any_build(tmp_path: Path) -> None:
    extensions = tmp_path / "extensions"
    extensions.mkdir()
    result = run_cli("prior.scale=-1", cwd=tmp_path, env={"TORCH_EXTENSIONS_DIR": str(extensions)})
    assert result.returncode == 1
    assert "scale" in result.stderr and "-1" in result.stderr
    assert "Traceback" not in result.stderr
    assert "compiling the native CPU kernels" not in result.stderr
    assert list(extensions.iterdir()) == []  # no build began
