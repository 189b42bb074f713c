"""``train ckpt_path=<run dir>`` (or its ``last.ckpt``): resume that run in its own directory.

Hydra decides the output directory before any of our code runs, so the command line is
rewritten first: the run's own overrides (its ``.hydra/overrides.yaml``) come first, the new
ones after them (a key given again replaces the saved one), then ``hydra.run.dir=<run dir>`` and
``ckpt_path=<the checkpoint>`` (a run directory gives its ``checkpoints/last.ckpt``, the latest
state). The resumed run writes where it did before: its TensorBoard curves continue in the same
``tensorboard/`` folder, its checkpoints and ``metrics.json`` stay together, and
:func:`~bbb_lightning.cli.run_dir_checks.check_same_model_and_data` still refuses a change of
network or data.

A command line that names ``hydra.run.dir`` itself keeps it (a resume into another directory);
a multirun (``-m``) is left as it is.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__all__ = ["resumed_in_place"]

_MULTIRUN_FLAGS = ("-m", "--multirun")


def resumed_in_place(argv: list[str]) -> tuple[list[str], str | None]:
    """The command line that resumes the run named by ``ckpt_path=`` in place, and a line that
    says so (``None`` when ``argv`` resumes nothing or names its own ``hydra.run.dir``).

    Raises:
        ValueError: ``ckpt_path`` names a run directory without a ``checkpoints/last.ckpt``.
    """
    values = {_key(item): item.split("=", 1)[1] for item in argv if "=" in item}
    ckpt_path = values.get("ckpt_path")
    if ckpt_path is None or any(flag in argv for flag in _MULTIRUN_FLAGS):
        return argv, None
    path = Path(ckpt_path).expanduser()
    run_dir = _run_dir_of(path)
    if run_dir is None or (path.is_file() and path.name != "last.ckpt"):
        return argv, None  # another checkpoint starts a new run from it, as before
    checkpoint = path if path.is_file() else run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise ValueError(
            f"ckpt_path={ckpt_path!r} is not allowed: the run directory holds no "
            "checkpoints/last.ckpt to resume from (name one of its checkpoints instead)"
        )
    rewritten = [item for item in argv if _key(item) != "ckpt_path"]
    if "hydra.run.dir" in values:  # a resume into a directory of the user's choosing
        return [*rewritten, f"ckpt_path={checkpoint}"], None
    given = {_key(item) for item in rewritten}
    saved = [item for item in _saved_overrides(run_dir) if _key(item) not in given]
    said = f"resuming the run in {run_dir} in place from {checkpoint.name}" + (
        f" with its overrides {' '.join(saved)}" if saved else ""
    )
    return [*saved, *rewritten, f"hydra.run.dir={run_dir}", f"ckpt_path={checkpoint}"], said


def _run_dir_of(path: Path) -> Path | None:
    """The training run directory ``path`` is or lies in: the nearest folder that holds a run's
    ``.hydra/config.yaml``; None for anything else (a checkpoint of another kind of run)."""
    for folder in (path, *path.parents) if path.is_dir() else path.parents:
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder
    return None


def _saved_overrides(run_dir: Path) -> list[str]:
    """The run's own command-line overrides but where it wrote and what it resumed from."""
    file = run_dir / ".hydra" / "overrides.yaml"
    saved = [str(item) for item in OmegaConf.load(file)] if file.is_file() else []
    return [item for item in saved if _key(item) not in ("ckpt_path", "hydra.run.dir")]


def _key(override: str) -> str:
    """``+trainer.max_steps=5`` -> ``trainer.max_steps``; a flag is its own key."""
    return override.split("=", 1)[0].lstrip("+~")
