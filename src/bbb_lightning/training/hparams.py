"""A run's hyperparameters and name for TensorBoard's HParams tab.

The hyperparameters are named as on the command line (``prior.scale``, ``kl.weighting``): the
choice of each config group (``prior: scale_mixture``), every value of the groups that make the
model and its training, and every override of the run. A run's *varied overrides* are what tells
it apart from the others it is compared with: in a multirun the overrides whose key the sweep
varies (``prior=gaussian,scale_mixture`` on the command line, or ``hydra.sweeper.params`` as in
``hparams_search=optuna``), in a single run all of its overrides. They name the trial and their
keys come first in the table.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

__all__ = ["GROUPS", "Trial", "flat_hparams", "trial_of_this_job"]

Scalar = int | float | str | bool
# The config groups that make the model and its training, recorded key by key.
GROUPS = ("dataset", "model", "likelihood", "prior", "posterior", "kl", "optimizer", "scheduler")
# Overrides that say where a run writes or what it prints, not what it is.
_PLACES = ("paths.", "hydra.", "ckpt_path", "extras.")


@dataclass(frozen=True)
class Trial:
    """A run as the HParams tab shows it.

    Attributes:
        overrides: the run's overrides that vary against the runs it is compared with, in
            command-line order (``["prior=scale_mixture", "kl.weighting=minibatch"]``); places
            such as ``paths.*`` are left out.
    """

    overrides: tuple[str, ...] = ()

    @property
    def varied_keys(self) -> frozenset[str]:
        """The keys of :attr:`overrides` (``prior``, ``kl.weighting``)."""
        return frozenset(_key(override) for override in self.overrides)

    def name(self, hparams: dict[str, Scalar]) -> str:
        """``"<varied overrides> · <digest>"``: the digest is the first 6 hex digits of the
        SHA-256 of all ``hparams``, so runs with the same overrides but other settings (two
        sweeps over the same values with another epoch budget) stay apart, and runs of the same
        configuration share a row (TensorBoard's group of repeated sessions)."""
        text = repr(sorted((key, repr(value)) for key, value in hparams.items()))
        digest = hashlib.sha256(text.encode()).hexdigest()[:6]
        return f"{' '.join(self.overrides) or '(defaults)'} · {digest}"


def _key(override: str) -> str:
    """The key of an override as the HParams columns name it (``+trainer.max_steps=5`` ->
    ``trainer.max_steps``, ``prior=laplace`` -> ``prior``)."""
    return OverridesParser.create().parse_override(override).key_or_group


def _placed(override: str) -> bool:
    return _key(override).startswith(_PLACES)


def _swept_keys(hydra_config: DictConfig) -> set[str]:
    """The keys a multirun varies: its sweep overrides (``a=1,2``, ``range(...)``,
    ``choice(...)``) as recorded in the sweep's ``multirun.yaml``, and the keys of
    ``hydra.sweeper.params`` (Optuna's search space, the basic sweeper's ``params``)."""
    keys: set[str] = set()
    params = OmegaConf.select(hydra_config, "sweeper.params", default=None)
    if OmegaConf.is_dict(params):
        keys |= {str(key) for key in params}
    output_dir = Path(str(hydra_config.runtime.output_dir))
    for folder in (output_dir.parent, Path(str(hydra_config.sweep.dir))):
        record = folder / "multirun.yaml"
        if record.is_file():
            sweep = OmegaConf.load(record)
            arguments = OmegaConf.select(sweep, "hydra.overrides.task", default=None) or []
            parsed = OverridesParser.create().parse_overrides([str(a) for a in arguments])
            keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
            break
    return keys


def trial_of_this_job() -> Trial | None:
    """This Hydra job's :class:`Trial` (None outside a Hydra job, e.g. ``train(cfg)`` called
    on a composed config)."""
    if not HydraConfig.initialized():
        return None
    hydra_config = HydraConfig.get()
    overrides = tuple(o for o in hydra_config.overrides.task if not _placed(o))
    if hydra_config.mode != RunMode.MULTIRUN:
        return Trial(overrides)
    swept = _swept_keys(hydra_config)
    varied = tuple(o for o in overrides if _key(o) in swept) if swept else overrides
    return Trial(varied)


def _scalar(value: Any) -> Scalar:
    return value if isinstance(value, Scalar) else str(value)


def _flatten(prefix: str, node: Any, into: dict[str, Scalar]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key != "_partial_":
                _flatten(f"{prefix}.{key}" if prefix else str(key), value, into)
    elif node is not None:
        into[prefix] = _scalar(node)


def flat_hparams(
    cfg: DictConfig,
    filled: dict[str, Any],
    choices: dict[str, Any] | None = None,
    overrides: Iterable[str] = (),
) -> dict[str, Scalar]:
    """The run's hyperparameters as ``dotted.key -> scalar``.

    Args:
        cfg: the composed config; :data:`GROUPS` are recorded key by key, with ``seed``,
            ``num_samples``, ``eval_samples`` and ``trainer.max_epochs``.
        filled: group configs as the run really built them, replacing the config's (the net's
            and the likelihood's sizes filled from the dataset, where the config has null).
        choices: the option chosen in each config group (Hydra's ``runtime.choices``), recorded
            under the group's name (``prior: scale_mixture``) for :data:`GROUPS`.
        overrides: the run's varied overrides (:attr:`Trial.overrides`); a key not recorded
            otherwise (``trainer.precision``) is added with its value in the config (``"null"``
            for none). A sweep's constant overrides add no column before the groups'.
    """
    flat: dict[str, Scalar] = {}
    for group in GROUPS:
        choice = (choices or {}).get(group)
        if choice is not None:
            flat[group] = _scalar(choice)
        node = filled.get(group, cfg.get(group))
        node = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        _flatten(group, node, flat)
    for key in ("seed", "num_samples", "eval_samples", "trainer.max_epochs"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            flat[key] = _scalar(value)
    for key in map(_key, overrides):
        if key not in flat:
            value = OmegaConf.select(cfg, key, default=None)
            if not OmegaConf.is_config(value):
                flat[key] = "null" if value is None else _scalar(value)
    return flat
