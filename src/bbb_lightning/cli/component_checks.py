"""Checks of a config's components before any of the slow work (data, model, kernels).

- :func:`unaccepted_arguments`: every key of a ``_target_`` node is an argument of its target
  (``+trainer.max_epoch=2`` is named here, not inside ``Trainer.__init__``; a user's network's
  several inherited keys in one line), and every target can be imported.
- :func:`missing_files`: a ``path`` of the dataset that does not exist.
- :func:`component_problems`: the cheap components (prior, posterior, likelihood, callbacks,
  loggers) built once on their own, so their value errors come before the data is loaded,
  told in config terms (:func:`~bbb_lightning.cli.config_terms.in_config_terms`).

Each returns one line per problem, so that independent problems are reported together.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from .command_line import close_matches
from .config_terms import in_config_terms
from .errors import UserError

__all__ = ["component_problems", "missing_files", "target_nodes", "unaccepted_arguments"]

# Keys of a node that the package reads itself rather than passing to the target.
CONSUMED_KEYS: Mapping[str, frozenset[str]] = {"posterior": frozenset({"estimator"})}
# A likelihood chosen by the dataset's task (conf/likelihood/auto.yaml): no target to call yet.
AUTO = "auto"


def target_nodes(cfg: DictConfig) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(key, node)`` for every mapping with a ``_target_`` in ``cfg`` (``trainer``,
    ``model.net``, ``callbacks.progress_bar``, ...), outermost first, as plain containers."""

    def visit(prefix: str, node: Any) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, dict):
            if isinstance(node.get("_target_"), str):
                yield prefix, node
            for key, value in node.items():
                if not str(key).startswith("_"):
                    yield from visit(f"{prefix}.{key}" if prefix else str(key), value)

    yield from visit("", OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False))


def _parameters(target: Any) -> list[inspect.Parameter] | None:
    """The target's parameters; None when it takes any keyword (``**kwargs``) or has no
    signature to read."""
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return parameters


def unaccepted_arguments(cfg: DictConfig) -> list[str]:
    """One line per ``_target_`` node that cannot be imported, or whose keys its target does
    not take (all of that node's keys in the one line)."""
    problems = []
    for key, node in target_nodes(cfg):
        target_name = node["_target_"]
        if target_name == AUTO:
            continue
        try:
            target = get_object(target_name)
        except Exception as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            if error.__cause__ is not None and str(error.__cause__):
                reason = str(error.__cause__).splitlines()[0]
            problems.append(
                f"{key}._target_={target_name!r} is not allowed: it cannot be imported ({reason})"
            )
            continue
        parameters = _parameters(target)
        if parameters is None:
            continue
        accepted = sorted(p.name for p in parameters)
        consumed = CONSUMED_KEYS.get(key, frozenset())
        extra = [k for k in node if not str(k).startswith("_") and k not in {*accepted, *consumed}]
        if not extra:
            continue
        named = ", ".join(
            repr(k)
            + (f" (did you mean {hint[0]!r}?)" if (hint := close_matches(k, accepted)) else "")
            for k in extra
        )
        plural = "s" if len(extra) > 1 else ""
        drops = " ".join(f"'~{key}.{k}'" for k in extra)
        problems.append(
            f"{key}._target_={target_name} takes no argument{plural} {named} (it takes "
            f"{', '.join(accepted) or 'none'}); drop {'them' if extra[1:] else 'it'} with {drops}"
        )
    return problems


def missing_files(cfg: DictConfig) -> list[str]:
    """``dataset.path`` (a file the dataset reads) that does not exist, as one line."""
    path = OmegaConf.select(cfg, "dataset.path", throw_on_missing=False)
    if not isinstance(path, str) or path == "???" or Path(path).expanduser().exists():
        return []
    return [f"dataset.path={path!r} is not allowed: no such file (relative to {Path.cwd()})"]


def _sized_likelihood(node: dict[str, Any]) -> Any:
    """The likelihood with sizes left null (filled from the dataset later) set to a placeholder:
    only its other settings are checked here."""
    node = dict(node)
    for key, placeholder in (("num_classes", 2), ("target_dim", 1)):
        if key in node and node[key] is None:
            node[key] = placeholder
    return instantiate(node)


def _posterior_of(node: dict[str, Any], prior: Any) -> Any:
    """The posterior of a one-element tensor: its settings (``rho_init``, ...) checked."""
    node = {k: v for k, v in node.items() if k not in CONSUMED_KEYS["posterior"]}
    return instantiate(node)(torch.zeros(1), prior)


def component_problems(cfg: DictConfig, skip: Callable[[str], bool]) -> list[str]:
    """Build the prior, the posterior (of one weight), the likelihood (sizes as placeholders),
    the callbacks and the loggers once, each on its own; one line per one that fails, in config
    terms. ``skip(key)``: a node already reported (its construction would repeat that)."""
    problems: list[str] = []
    containers = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)

    def attempt(key: str, build: Callable[[], Any]) -> Any:
        if skip(key):
            return None
        try:
            return build()
        except Exception as error:  # a constructor's own validation
            problems.append(in_config_terms(UserError.describe(error), cfg, key))
            return None

    prior_node = containers.get("prior")
    prior = attempt("prior", lambda: instantiate(prior_node)) if prior_node else None
    posterior_node = containers.get("posterior")
    if isinstance(posterior_node, dict) and prior is not None:
        attempt("posterior", lambda: _posterior_of(posterior_node, prior))
    likelihood_node = containers.get("likelihood")
    if isinstance(likelihood_node, dict) and likelihood_node.get("_target_") != AUTO:
        attempt("likelihood", lambda: _sized_likelihood(likelihood_node))
    for group in ("callbacks", "logger"):
        for name, node in (containers.get(group) or {}).items():
            if isinstance(node, dict) and "_target_" in node:
                attempt(f"{group}.{name}", lambda node=node: instantiate(node))
    return problems
