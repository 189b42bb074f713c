"""Checks of the run directory and checkpoint a run starts from: a fresh output or sweep
directory, a readable checkpoint, a resume that keeps the run's network and data."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..storage.checkpoint_files import checkpoint_problem, describe_intact_alternative
from .errors import UserError


def check_checkpoint(path: Path) -> None:
    """A readable Lightning checkpoint, or a one-line UserError naming the path (and, for a
    damaged one, the newest intact checkpoint beside it)."""
    if not path.is_file():
        raise UserError(f"ckpt_path={str(path)!r} is not allowed: no such checkpoint file")
    problem = checkpoint_problem(path)
    if problem is not None:
        alternative = describe_intact_alternative(path)
        raise UserError(f"ckpt_path={str(path)!r} is not allowed: {problem}; {alternative}")


def check_fresh_sweep_dir(sweep_dir: Path) -> None:
    """Refuse to start a multirun in a sweep directory that already holds an earlier one: its
    ``multirun.yaml``, or a job directory (``0/``, ``1/``, ...) with a ``.hydra/`` folder,
    ``metrics.json`` or checkpoints. The new jobs, numbered from 0 again, would write their
    config and ``train.log`` over the earlier jobs' and rewrite ``summary.md``. A job of it is
    resumed as a single run: ``hydra.run.dir=<its job dir> ckpt_path=<its last.ckpt>``."""
    if not sweep_dir.is_dir():
        return
    earlier = [sweep_dir / "multirun.yaml"] if (sweep_dir / "multirun.yaml").exists() else []
    earlier += [
        job
        for job in sorted(sweep_dir.iterdir())
        if job.is_dir()
        and (
            (job / ".hydra").is_dir()
            or (job / "metrics.json").exists()
            or any(job.glob("checkpoints/*.ckpt"))
        )
    ]
    if earlier:
        held = ", ".join(path.name + ("/" if path.is_dir() else "") for path in earlier[:3])
        held += ", ..." if len(earlier) > 3 else ""
        raise UserError(
            f"hydra.sweep.dir={str(sweep_dir)!r} is not allowed: it already holds a multirun "
            f"({held}); choose a new hydra.sweep.dir (or leave it to its default "
            "multirun/<date>/<time>), or resume one of its jobs with "
            "hydra.run.dir=<its job dir> ckpt_path=<its checkpoints/last.ckpt>"
        )


def check_same_model_and_data(run_dir: Path, cfg: DictConfig) -> None:
    """A run resumed into its own directory keeps its network and data (``model``,
    ``dataset``, ``prior``, ``posterior``, ``likelihood``): Hydra rewrites the run's saved
    config, from which evaluate and predict rebuild the network. Other settings (epochs, the
    optimizer) may change."""
    saved_file = run_dir / ".hydra" / "config.yaml"
    if not saved_file.is_file():
        return
    saved = OmegaConf.load(saved_file)
    for group in ("model", "dataset", "prior", "posterior", "likelihood"):
        before = OmegaConf.to_container(saved[group]) if group in saved else None
        now = OmegaConf.to_container(cfg[group]) if group in cfg else None
        if before != now:
            raise UserError(
                f"resuming the run in {str(run_dir)!r} with other {group} settings than its own "
                f"(saved in {saved_file}) would overwrite them; resume with its settings, or "
                "into another hydra.run.dir"
            )


def check_resumable(model: torch.nn.Module, ckpt_path: str | None) -> None:
    """The checkpoint to resume from holds this config's network: the same tensors, of the
    same shapes (a changed architecture failed inside Lightning with a size-mismatch
    traceback)."""
    if ckpt_path is None:
        return
    saved = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)["state_dict"]
    here = model.state_dict()
    for name in sorted(set(saved) | set(here)):
        ours, theirs = here.get(name), saved.get(name)
        shape = None if ours is None else tuple(ours.shape)
        saved_shape = None if theirs is None else tuple(theirs.shape)
        if shape != saved_shape:
            raise UserError(
                f"ckpt_path={ckpt_path!r} is not allowed: its network does not match this "
                f"config ({name}: {saved_shape or 'absent'} in the checkpoint, "
                f"{shape or 'absent'} here); resume with the run's own settings"
            )


def resumes_in(run_dir: Path, ckpt_path: str | None) -> bool:
    """Whether ``ckpt_path`` is a checkpoint of the run in ``run_dir`` (a resume in place)."""
    return ckpt_path is not None and run_dir.resolve() in Path(ckpt_path).resolve().parents


def check_fresh_output_dir(output_dir: Path, ckpt_path: str | None) -> None:
    """Refuse to write a new run over an earlier one (resuming into its own directory is fine)."""
    earlier = (output_dir / "metrics.json").exists() or any(output_dir.glob("checkpoints/*.ckpt"))
    if earlier and not resumes_in(output_dir, ckpt_path):
        raise UserError(
            f"output directory {str(output_dir)!r} already holds a run; choose another "
            "hydra.run.dir, or resume that run with ckpt_path=<its checkpoints/last.ckpt>"
        )
