"""OmegaConf resolvers the configs use: ``${run_dir:...}`` and ``${fresh_dir:...}`` (the run
directories), ``${config_groups:ood,analyses}`` and ``${config_options:ood}`` (the ``--help``
texts), ``${metric_mode:val/accuracy}`` (the checkpoint's ``mode``), ``${optuna_direction:...}``
and ``${mlflow_tags:${tags}}`` (the run's tags as MLflow's tag mapping)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from ..summary import metric_mode, tags_text


def config_group_lines(*left_out: str) -> str:
    """``group: option, option`` for every config group of the package's ``conf/`` folder
    but ``hydra`` and ``left_out`` (``${config_groups:ood}`` in train's ``--help``: Hydra's
    own ``$APP_CONFIG_GROUPS`` would list evaluate's ``ood`` there too)."""
    conf = Path(__file__).parents[1] / "conf"
    folders = sorted(
        folder
        for folder in conf.iterdir()
        if folder.is_dir() and folder.name not in ("hydra", "__pycache__", *left_out)
    )
    return "\n".join(
        f"{folder.name}: {', '.join(sorted(p.stem for p in folder.glob('*.yaml')))}"
        for folder in folders
    )


def fresh_directory(path: str) -> str:
    """``path``, created, or if it exists ``path-2``, ``path-3``, ...: the first one this process
    could create itself.

    ``hydra.run.dir: ${fresh_dir:outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}}`` names a run by the
    second it started (as the README writes ``outputs/<date>/<time>``), and two runs started in
    the same second (``for seed in 1 2; do python -m bbb_lightning.train seed=$seed & done``)
    still get a directory each: ``mkdir`` fails for all but one of them. Resolved once per
    process (the resolver's cache), so every later read of ``hydra.run.dir`` gives the same one.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 10_000):
        candidate = path if attempt == 1 else f"{path}-{attempt}"
        try:
            os.mkdir(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{path}: 9999 run directories of that name exist already")


def config_options(group: str) -> str:
    """``option, option`` of one config group of the package's ``conf/`` folder
    (``${config_options:ood}`` in evaluate's ``--help``)."""
    folder = Path(__file__).parents[1] / "conf" / group
    return ", ".join(sorted(p.stem for p in folder.glob("*.yaml")))


OmegaConf.register_new_resolver("config_options", config_options, replace=True)


def run_directory(root: str, name: str) -> str:
    """A training run's directory: ``<root>/slurm-<job id>`` inside a SLURM batch job (Lightning's
    test: ``SLURM_NTASKS`` set and not an interactive job), else ``fresh_dir`` of
    ``<root>/<name>``.

    A requeued SLURM job keeps its job id, so it finds the directory of its first start, whose
    unfinished run it resumes (an array's tasks have a job id each). Several runs in one batch
    job share it: give each its own ``hydra.run.dir``.
    """
    job = os.environ.get("SLURM_JOB_ID")
    if job and SLURMEnvironment.detect():
        return f"{root}/slurm-{job}"
    return fresh_directory(f"{root}/{name}")


OmegaConf.register_new_resolver("fresh_dir", fresh_directory, use_cache=True, replace=True)
OmegaConf.register_new_resolver("run_dir", run_directory, use_cache=True, replace=True)
OmegaConf.register_new_resolver("config_groups", config_group_lines, replace=True)


# ${metric_mode:val/accuracy} -> max (the checkpoint callback's mode), and Optuna's direction.
OmegaConf.register_new_resolver("metric_mode", metric_mode, replace=True)


OmegaConf.register_new_resolver(
    "optuna_direction",
    lambda name: "maximize" if metric_mode(name) == "max" else "minimize",
    replace=True,
)


def mlflow_tags(tags: Sequence[object]) -> dict[str, str] | None:
    """The run's ``tags`` list as MLflow's tag mapping: one tag ``tags`` holding them joined
    by ", " (MLflow's tags are key-value pairs; this one can be searched with
    ``tags.tags LIKE '%mnist%'``); None for no tags.

    Example:
        >>> mlflow_tags(["baseline", "mnist"]), mlflow_tags([])
        ({'tags': 'baseline, mnist'}, None)
    """
    return {"tags": tags_text(tags)} if tags else None


OmegaConf.register_new_resolver("mlflow_tags", mlflow_tags, replace=True)
