"""The README's commands and its pure-PyTorch example are the ones that work."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import open_dict

from bbb_lightning.cli.config_checks import check_config

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


def _entry_point_commands() -> list[tuple[str, list[str]]]:
    """Every ``python -m bbb_lightning.{train,evaluate,predict}`` command of the README (code
    blocks and text) as (entry point, overrides): flags (``-m``, ``--help``) dropped,
    ``<placeholders>`` filled."""
    text = "\n".join(block.replace("\\\n", " ") for block in _blocks("bash"))
    lines = [line.split("#")[0] for line in text.splitlines()]
    lines += re.findall(r"`(python -m bbb_lightning\.[^`]*)`", README)
    commands = []
    for line in lines:
        match = re.search(r"python -m bbb_lightning\.(train|evaluate|predict)\b([^&|]*)", line)
        if match:
            entry, rest = match.groups()
            overrides = [
                re.sub(r"<[^>]*>", "x", arg) for arg in shlex.split(rest) if not arg.startswith("-")
            ]
            commands.append((entry, overrides))
    return commands


def test_every_readme_command_composes():
    """Each README command names groups, options and keys the configs have (each combination
    of a sweep), and values the training checks allow; running them is the end-to-end tests'
    business."""
    commands = _entry_point_commands()
    assert {entry for entry, _ in commands} == {"train", "evaluate", "predict"}
    assert len(commands) >= 12
    for entry, overrides in commands:
        # a sweep over range(n) is checked at its first and last value
        overrides = [
            re.sub(r"=range\((\d+)\)$", lambda m: f"=0,{int(m.group(1)) - 1}", override)
            for override in overrides
        ]
        # a comma sweeps, but not inside a list (tags=[a,b], callbacks=[default,lr_monitor])
        swept = [o for o in overrides if "," in o and not o.split("=", 1)[-1].startswith("[")]
        sweeps = [override.split("=", 1) for override in swept]
        fixed = [override for override in overrides if override not in swept]
        choices = [[f"{key}={value}" for value in values.split(",")] for key, values in sweeps]
        for combination in itertools.product(*choices):
            name, chosen = "config" if entry == "train" else entry, [*fixed, *combination]
            with initialize_config_module("bbb_lightning.conf", version_base="1.3"):
                compose(name, overrides=chosen, return_hydra_config=True)
                job = [override for override in chosen if not override.startswith("hydra")]
                cfg = compose(name, overrides=["paths.output_dir=out", *job])
            if entry == "train" and cfg.trainer.accelerator == "cpu":  # GPUs may be absent
                with open_dict(cfg):
                    cfg.ckpt_path = None  # a <placeholder> run dir names no real checkpoint
                check_config(cfg)
