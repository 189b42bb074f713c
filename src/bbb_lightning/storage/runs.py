"""A trained run: its checkpoint, its model and data rebuilt, the device, sampled outputs.

Shared by ``python -m bbb_lightning.evaluate`` and ``python -m bbb_lightning.predict``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import Tensor

from ..cli.errors import UserError, user_errors
from ..training.module import BayesByBackprop
from .checkpoint_files import checkpoint_problem, describe_intact_alternative

__all__ = ["load_model", "load_run", "resolve_checkpoint", "resolve_device", "sample_outputs"]


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """The checkpoint file and the training run directory named by ``path``.

    A run directory gives its best checkpoint (``checkpoints/epochNNN.ckpt``; with several, the
    one ``last.ckpt`` records as best, else the latest) or else ``checkpoints/last.ckpt``; a run
    without our checkpoint callback (``callbacks=none``) gives the latest one Lightning wrote under
    its logger's folder (``tensorboard/checkpoints/``; several after an in-place resume). The
    latest is decided by the epoch, then the step, then the ``-vN`` suffix parsed from the file
    names as numbers, not by their text (``epoch=11-step=48.ckpt`` is later than
    ``epoch=8-step=36.ckpt``); names without an epoch or step number come before numbered ones
    and are ordered among themselves by modification time. A ``.ckpt`` file is taken as is; its run
    directory is the nearest folder above it that holds the run's ``.hydra/config.yaml``, else
    the parent of ``checkpoints/``.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        folders = [path / "checkpoints", *sorted(path.glob("*/checkpoints"))]
        checkpoint = next(filter(None, map(_best_checkpoint, folders)), None)
        if checkpoint is None:
            raise UserError(f"ckpt_path={str(path)!r}: no checkpoints/*.ckpt in this directory")
        return checkpoint, path
    if path.is_file():
        run_dir = next(
            (folder for folder in path.parents if (folder / ".hydra" / "config.yaml").is_file()),
            path.parent.parent if path.parent.name == "checkpoints" else path.parent,
        )
        return path, run_dir
    raise UserError(f"ckpt_path={str(path)!r}: no such run directory or checkpoint file")


_EPOCH = re.compile(r"(?<![a-z])epoch=?(\d+)", re.IGNORECASE)
_STEP = re.compile(r"(?<![a-z])step=?(\d+)", re.IGNORECASE)
_VERSION = re.compile(r"-v(\d+)$")


def _checkpoint_order(path: Path) -> tuple[int, int, int, int, float, str]:
    """Sort key of a checkpoint file: the latest sorts last.

    Files are ordered by the numbers in their names, not by their text (as text,
    ``epoch=8-step=36.ckpt`` sorts after ``epoch=11-step=48.ckpt``, and ``epoch999.ckpt`` after
    ``epoch1000.ckpt``): first the epoch (``epoch=E`` as Lightning writes it, or ``epochNNN`` as
    our checkpoint callback does), then the step (``step=S``), then the ``-vN`` suffix Lightning
    adds when a name is taken again (a ``-vN`` file is newer than the one without; other parts of
    the name, such as metrics, do not count). A name without an epoch or a step counts that number
    as -1, so a name with neither sorts before every numbered one (it is not a file a checkpoint
    callback wrote per epoch or step); ties are broken by the modification time, then by the name,
    so that among names without numbers the file written last is the latest.
    """
    stem = path.name.removesuffix(".ckpt")
    epoch, step, version = (_EPOCH.search(stem), _STEP.search(stem), _VERSION.search(stem))
    numbered = epoch is not None or step is not None
    try:
        modified = path.stat().st_mtime
    except OSError:  # vanished since the listing: order it by its name alone
        modified = float("-inf")
    return (
        int(numbered),
        int(epoch.group(1)) if epoch else -1,
        int(step.group(1)) if step else -1,
        int(version.group(1)) if version else 0,
        modified,
        path.name,
    )


def _best_checkpoint(folder: Path) -> Path | None:
    last = folder / "last.ckpt"
    candidates = sorted(
        (p for p in folder.glob("*.ckpt") if not p.name.startswith("last")),
        key=_checkpoint_order,
    )
    if len(candidates) > 1 and last.is_file():
        try:
            state = torch.load(last, map_location="cpu", weights_only=False)
            recorded = [
                Path(value["best_model_path"]).name
                for key, value in state.get("callbacks", {}).items()
                if key.startswith("ModelCheckpoint") and value.get("best_model_path")
            ]
        except Exception:  # an unreadable last.ckpt: fall back to the latest epoch file
            recorded = []
        for candidate in candidates:
            if candidate.name in recorded:
                return candidate
    if candidates:
        return candidates[-1]
    return last if last.is_file() else None


def load_model(checkpoint: Path) -> BayesByBackprop:
    """The model saved in ``checkpoint``, on the CPU; an unreadable file is a UserError that
    names the newest intact checkpoint beside it."""
    problem = checkpoint_problem(checkpoint)
    if problem is None:
        try:
            return BayesByBackprop.load_from_checkpoint(checkpoint, map_location="cpu")
        except Exception as error:  # a foreign file: report it in one line
            problem = "not a readable checkpoint ({})".format(
                f"{type(error).__name__}: {error}".splitlines()[0]
            )
    raise UserError(
        f"ckpt_path={str(checkpoint)!r} is not allowed: {problem}; "
        f"{describe_intact_alternative(checkpoint)}"
    )


def load_run(cfg: DictConfig) -> tuple[BayesByBackprop, Any, DictConfig, Path]:
    """The model, the set-up datamodule, the training config and the checkpoint file."""
    checkpoint, run_dir = resolve_checkpoint(cfg.ckpt_path)
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(
            f"ckpt_path={str(cfg.ckpt_path)!r}: no training config {config_file} (evaluate "
            "needs the run directory written by bbb_lightning.train)"
        )
    model = load_model(checkpoint)
    train_cfg = OmegaConf.load(config_file)
    with open_dict(train_cfg):
        if cfg.get("data_dir") is not None:
            if "data_dir" not in train_cfg.dataset:
                raise UserError(
                    f"data_dir={cfg.data_dir!r} is not allowed: the run's dataset "
                    f"({train_cfg.dataset.get('_target_')}) has no data_dir"
                )
            train_cfg.dataset.data_dir = cfg.data_dir
        for key, value in (cfg.get("dataset_overrides") or {}).items():
            train_cfg.dataset[key] = value
    with user_errors():
        datamodule = instantiate(train_cfg.dataset)
        datamodule.prepare_data()
        datamodule.setup("test")
    return model, datamodule, train_cfg, checkpoint


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``auto`` (cuda when available) as a device; no CUDA is a UserError."""
    if name not in ("cpu", "cuda", "auto"):
        raise UserError(f"device={name!r} is not allowed: cpu, cuda or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device='cuda' is not allowed: no CUDA device is available")
    return torch.device(name)


@torch.inference_mode()
def sample_outputs(model: BayesByBackprop, x: Tensor, num_samples: int, batch_size: int) -> Tensor:
    """Network outputs for S posterior draws, (S, N, out), in chunks of ``batch_size`` inputs."""
    device = next(model.parameters()).device
    chunks = [
        model(x[start : start + batch_size].to(device), num_samples).cpu()
        for start in range(0, len(x), batch_size)
    ]
    return torch.cat(chunks, dim=1)
