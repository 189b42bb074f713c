"""A resumed run's optimizer: the checkpoint's state under the configured settings.

Lightning restores the checkpoint's optimizer state dict, hyperparameters included, over the
optimizer that ``configure_optimizers`` built from the config: a run resumed with
``optimizer.lr=0.1`` kept the old learning rate, and one resumed with another optimizer
(``optimizer=sgd`` after Adam) failed at its first step on a missing hyperparameter.
:func:`with_configured_settings` rewrites the saved state before Lightning loads it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["with_configured_settings"]


def with_configured_settings(
    saved: dict[str, Any], configured: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """``saved`` (a checkpoint's optimizer state dict) under the hyperparameters of
    ``configured`` (the state dict of the optimizer the config builds, fresh), and what changed.

    The same kind of optimizer (the same parameter groups with the same hyperparameter names)
    keeps its per-parameter state, e.g. Adam's moments and step counts, and takes the
    configured hyperparameters (learning rate, betas, weight decay, ...). Another kind cannot
    use that state: the optimizer starts fresh, as configured.

    Example:
        >>> saved = {"state": {0: "moments"}, "param_groups": [{"lr": 0.001, "params": [0]}]}
        >>> configured = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}
        >>> with_configured_settings(saved, configured)
        ({'state': {0: 'moments'}, 'param_groups': [{'lr': 0.1, 'params': [0]}]}, 'lr 0.001 -> 0.1')
    """
    saved_groups, configured_groups = saved["param_groups"], configured["param_groups"]
    same_kind = len(saved_groups) == len(configured_groups) and all(
        set(ours) - {"initial_lr"} == set(theirs) - {"initial_lr"}
        and len(ours["params"]) == len(theirs["params"])
        for ours, theirs in zip(saved_groups, configured_groups, strict=True)
    )
    if not same_kind:
        return configured, "another optimizer than the checkpoint's: its state starts fresh"
    changes = []
    for group, settings in zip(saved_groups, configured_groups, strict=True):
        settings = {**settings, "lr": _scheduled_lr(group, settings)}
        for key, value in settings.items():
            if key != "params" and _differs(group.get(key), value):
                changes.append(f"{key} {group.get(key)!r} -> {value!r}")
                group[key] = value
        if "initial_lr" not in settings:
            group.pop("initial_lr", None)
    return saved, ", ".join(dict.fromkeys(changes)) or None


def _scheduled_lr(saved: dict[str, Any], configured: dict[str, Any]) -> Any:
    """The learning rate a resumed group takes. Unscheduled: the configured one. Under a
    learning-rate schedule (the configured group has the scheduler's ``initial_lr``, its base
    rate): the saved run's place in its schedule kept, ``lr = saved lr * configured base /
    saved base`` (exact for the multiplicative schedules: step, multi-step, exponential,
    cosine to 0), so an unchanged base rate resumes at the saved rate."""
    if "initial_lr" not in configured:
        return configured["lr"]
    base = saved.get("initial_lr", saved["lr"])
    if not _differs(base, configured["initial_lr"]):
        return saved["lr"]
    return saved["lr"] * configured["initial_lr"] / base if base else configured["lr"]


def _differs(before: Any, after: Any) -> bool:
    try:
        return bool(before != after)
    except (RuntimeError, TypeError, ValueError):  # e.g. tensors of several elements
        return True
