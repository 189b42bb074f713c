"""The README's commands and its pure-PyTorch example are the ones that work."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_bayesian_layers_example_runs():
    (example,) = [block for block in _blocks("python") if "bayesianize" in block]
    exec(compile(example, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    test_command = _blocks("bash")[1].strip()
    assert test_command == "python -m pytest"
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci_lines[-1] == test_command
    torch_install = 'python -m pip install --quiet "torch==2.13.0"'
    assert any(line.startswith(torch_install) for line in ci_lines)
