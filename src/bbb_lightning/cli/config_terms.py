"""A component's own error message told in the config's terms: the key, the value, what is allowed.

Constructors validate their arguments and say so in their own words (``GaussianPrior``: "prior
scale must be a finite number > 0, got -1"); a user typed ``prior.scale=-1``.
:func:`in_config_terms` finds the config node the message is about (the one whose ``_target_``
the message names, else the one its first word names, else the one given) and the argument
among the node's keys, and rewrites the message as ``prior.scale=-1 is not allowed: a finite
number > 0``. A message it cannot place keeps its words, prefixed with the node's key.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["in_config_terms", "node_of_target"]

# "<name> [(note)] must be <allowed>, got <value>" and "unknown <name> <value>; allowed: <list>"
_MUST_BE = re.compile(r"^(?P<name>\w+)(?P<note> \([^)]*\))? must be (?P<allowed>.+?),? got .+$")
_UNKNOWN = re.compile(r"^unknown (?P<name>\w+) \S+; allowed: (?P<allowed>.+)$")
_TARGET_PREFIX = re.compile(r"^(?P<target>[\w.]+\.[A-Z]\w*): (?P<rest>.+)$")


def node_of_target(cfg: DictConfig, target: str) -> str | None:
    """The key of the first config node whose ``_target_`` is ``target`` (``prior`` for
    ``bbb_lightning.bayes.priors.GaussianPrior`` given as ``bbb_lightning.bayes.GaussianPrior``:
    the class name decides)."""
    name = target.rsplit(".", 1)[-1]
    found: list[str] = []

    def visit(prefix: str, node: Any) -> None:
        if not isinstance(node, dict) or found:
            return
        given = node.get("_target_")
        if isinstance(given, str) and (given == target or given.rsplit(".", 1)[-1] == name):
            found.append(prefix)
            return
        for key, value in node.items():
            visit(f"{prefix}.{key}" if prefix else str(key), value)

    visit("", OmegaConf.to_container(cfg, resolve=False))
    return found[0] if found else None


def _value(cfg: DictConfig, key: str) -> str:
    value = OmegaConf.select(cfg, key, throw_on_missing=False)
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    return repr(value)


def in_config_terms(message: str, cfg: DictConfig, node: str | None = None) -> str:
    """``message`` (one line) as ``<key>=<value> is not allowed: <allowed>`` where it names an
    argument of a config node, else prefixed with the node's key; unchanged if no node fits.

    Example:
        >>> cfg = OmegaConf.create({"prior": {"_target_": "a.GaussianPrior", "scale": -1}})
        >>> in_config_terms("a.GaussianPrior: prior scale must be a number > 0, got -1", cfg)
        'prior.scale=-1 is not allowed: a number > 0'
    """
    prefixed = _TARGET_PREFIX.match(message)
    rest = message
    if prefixed:
        node = node_of_target(cfg, prefixed.group("target")) or node
        rest = prefixed.group("rest")
    words = rest.split(" ", 1)
    if node is None and len(words) == 2 and isinstance(cfg.get(words[0]), DictConfig):
        node = words[0]
    if node is None:
        return message
    section = OmegaConf.select(cfg, node, throw_on_missing=False)
    keys = [str(key) for key in section] if isinstance(section, DictConfig) else []
    short = node.rsplit(".", 1)[-1]
    if len(words) == 2 and words[0] in (short, type(section).__name__, "dataset", "likelihood"):
        rest = words[1]  # "prior scale must be ...": the message's own name for its node
    rest = re.sub(r"^[A-Z]\w+: ", "", rest)  # "ToyRegressionDataModule: noise_std ..."
    for pattern in (_MUST_BE, _UNKNOWN):
        match = pattern.match(rest)
        if match and match.group("name") in keys:
            key = f"{node}.{match.group('name')}"
            allowed = match.group("allowed")
            if pattern is _UNKNOWN:
                allowed = f"one of {allowed}"
            elif re.match(r"(in |[<>]=? )", allowed):
                allowed = f"a number {allowed}"
            note = (match.groupdict().get("note") or "").strip()
            return f"{key}={_value(cfg, key)} is not allowed: {allowed}{f' {note}' if note else ''}"
    named = next((key for key in keys if re.search(rf"\b{re.escape(key)}\b", rest)), None)
    return f"{node}.{named}: {rest}" if named else f"{node}: {rest}"
