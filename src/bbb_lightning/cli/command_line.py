"""The command line checked before Hydra runs it: a mistyped key or choice is one line.

Hydra reports ``trainer.max_epoch=2`` in 7 lines without a hint and ``prior=gausian`` in 13.
:func:`check_command_line` composes the same overrides first (with the Compose API, a sweep at
its first value and each value of a swept config group on its own) and reports every mistake it
finds as one line naming the override, the nearest real keys or choices (``difflib``) and all of
them::

    trainer.max_epoch=2: no key trainer.max_epoch; did you mean trainer.max_epochs? (the
        keys of trainer: accelerator, ...)
    prior=gausian: no choice 'gausian' in prior; did you mean prior=gaussian? (the choices:
        empirical, gaussian, laplace, scale_mixture)

A key that the config does not list but its ``_target_`` takes (``trainer.max_steps=5``) is
named with the ``+`` that adds it. Anything else Hydra would say is left to Hydra.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .quiet import silence_library_noise

__all__ = ["check_command_line", "checked", "close_matches", "command_line_problems"]

CONFIG_MODULE = "bbb_lightning.conf"
_CONF_DIR = Path(__file__).parents[1] / "conf"
_GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
# Flags after which the command line is not an ordinary run: Hydra alone handles those.
_HYDRA_ONLY = ("version", "shell_completion", "config_path", "config_name", "config_dir")


def close_matches(word: str, candidates: Sequence[str]) -> list[str]:
    """Up to three of ``candidates`` nearest to ``word`` (difflib's ratio >= 0.6), nearest first.

    Example:
        >>> close_matches("max_epoch", ["min_epochs", "max_epochs", "devices"])
        ['max_epochs', 'min_epochs']
    """
    return difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)


def checked(
    config_name: str,
    rewrite: Callable[[list[str]], tuple[list[str], str | None]] | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a ``@hydra.main`` entry point: it silences the libraries' noise
    (:func:`~bbb_lightning.cli.quiet.silence_library_noise`); called from the command line (no
    config passed in), it first rewrites ``sys.argv`` with ``rewrite`` (which returns the new
    arguments and a line to print, or raises ValueError: one line, exit status 1), then runs
    :func:`check_command_line` on it."""

    def decorate(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hydra_main)
        def entry_point(cfg_passthrough: DictConfig | None = None) -> Any:
            silence_library_noise()
            if cfg_passthrough is None:
                if rewrite is not None:
                    _rewrite_argv(rewrite)
                check_command_line(config_name)
            return hydra_main(cfg_passthrough)

        return entry_point

    return decorate


def _rewrite_argv(rewrite: Callable[[list[str]], tuple[list[str], str | None]]) -> None:
    try:
        sys.argv[1:], said = rewrite(sys.argv[1:])
    except ValueError as error:
        print(f"[{__name__}][ERROR] - {error}", file=sys.stderr)
        sys.exit(1)
    if said:
        print(f"[{__name__}][INFO] - {said}", file=sys.stderr)


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Exit with status 1 and one ``[ERROR]`` line per mistake on stderr if the overrides in
    ``argv`` (default ``sys.argv[1:]``) name a key or choice the config ``config_name`` lacks."""
    problems = command_line_problems(config_name, sys.argv[1:] if argv is None else argv)
    for problem in problems:
        print(f"[{__name__}][ERROR] - {problem}", file=sys.stderr)
    if problems:
        sys.exit(1)


def command_line_problems(config_name: str, argv: Sequence[str]) -> list[str]:
    """One line per mistyped key, choice or override in ``argv``; empty when Hydra may run it."""
    from hydra._internal.utils import get_args_parser  # Hydra's own parser of its flags

    try:
        args = get_args_parser().parse_args(list(argv))
    except SystemExit:  # a flag Hydra's parser rejects: Hydra says so itself
        return []
    if any(getattr(args, name, None) for name in _HYDRA_ONLY) or args.experimental_rerun:
        return []
    problems, overrides = _parsed(args.overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            problems += _composition_problems(config_name, overrides)
    finally:
        GlobalHydra.instance().clear()
    return problems


def _parsed(lines: Sequence[str]) -> tuple[list[str], list[Override]]:
    """The overrides that parse, and one line for each that does not."""
    parser = OverridesParser.create()
    problems, overrides = [], []
    for line in lines:
        try:
            overrides += parser.parse_overrides([line])
        except OverrideParseException as error:
            reason = str(error).splitlines()[0]
            problems.append(f"{line}: not an override ({reason}); the grammar: {_GRAMMAR}")
    return problems, overrides


def _first_value(override: Override) -> str | None:
    """The override as one job of its sweep would see it (a sweep at its first value); None for
    a sweep without listed values (``interval(...)``, ``glob(...)``), left out of the check."""
    if not override.is_sweep_override():
        return override.input_line
    try:
        first = next(iter(override.sweep_string_iterator()))
    except Exception:  # interval or glob sweeps: no value to compose with here
        return None
    return f"{override.get_key_element()}={first}"


def _composition_problems(config_name: str, overrides: list[Override]) -> list[str]:
    """Compose with the overrides; on a mistake, name it, drop that override and compose again
    (so that independent mistakes are reported together)."""
    problems: list[str] = []
    lines = {id(o): line for o in overrides if (line := _first_value(o)) is not None}
    # the other values of a swept config group (prior=gaussian,gausian): each one on its own
    checks = [(o, lines[id(o)]) for o in overrides if id(o) in lines]
    extra = [
        (o, f"{o.get_key_element()}={value}")
        for o in overrides
        if o.is_sweep_override() and id(o) in lines and _is_group(o.key_or_group)
        for value in list(o.sweep_string_iterator())[1:]
    ]
    active = list(checks)
    for _ in range(len(checks) + 1):
        problem, culprit = _compose_once(config_name, [line for _, line in active])
        if problem is None:
            break
        typed = next((o.input_line for o, line in active if line == culprit), None)
        if culprit is not None and typed is not None and problem.startswith(f"{culprit}:"):
            problem = typed + problem[len(culprit) :]  # as typed: the whole sweep
        problems.append(problem)
        if culprit is None:
            break
        active = [(o, line) for o, line in active if line != culprit]
    base = [line for _, line in active]
    for override, line in extra:
        problem, _ = _compose_once(config_name, [*base, line], shown=override.input_line)
        if problem is not None:
            problems.append(problem)
    return problems


def _group_options(name: str) -> list[str]:
    return GlobalHydra.instance().config_loader().get_group_options(name.lstrip("+~"))


def _is_group(name: str) -> bool:
    return bool(_group_options(name))


def _compose_once(
    config_name: str, lines: list[str], shown: str | None = None
) -> tuple[str | None, str | None]:
    """(one line for the first mistake, the override line that made it), or (None, None)."""
    try:
        compose(config_name, overrides=lines, return_hydra_config=True)
    except MissingConfigException as error:
        return _missing_choice(error, lines, shown)
    except ConfigCompositionException as error:
        return _missing_key(error, lines, config_name, shown)
    except Exception:  # anything else (a resolver's own failure...): Hydra reports it
        return None, None
    return None, None


def _missing_choice(
    error: MissingConfigException, lines: list[str], shown: str | None
) -> tuple[str | None, str | None]:
    missing = error.missing_cfg_file or ""
    group, _, choice = missing.rpartition("/")
    # a choice in a list (callbacks=[default,early_stoping]): Hydra lists no options then
    options = list(error.options or (_group_options(group) if group else []))
    culprit = next(
        (line for line in lines if line.split("=", 1)[0].lstrip("+~").split("@")[0] == group),
        None,
    )
    if not group or not options:
        return _first_line(error), culprit
    hint = close_matches(choice, options)
    did_you_mean = f"; did you mean {group}={hint[0]}?" if hint else ""
    where = shown or culprit or missing
    return (
        f"{where}: no choice {choice!r} in {group}{did_you_mean} (the choices: "
        f"{', '.join(options)})",
        culprit,
    )


def _missing_key(
    error: ConfigCompositionException, lines: list[str], config_name: str, shown: str | None
) -> tuple[str | None, str | None]:
    cause = error.__cause__
    deleted = re.match(r"Could not delete from config\. '([^']+)' does not exist", str(error))
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        full_key = str(cause.full_key)
    elif deleted:
        full_key = deleted.group(1)
    else:
        return _first_line(error), None
    parent_key, _, name = full_key.rpartition(".")
    culprit = next((line for line in lines if _key_of(line).startswith(full_key)), None)
    where = shown or culprit or full_key
    rest = [line for line in lines if line != culprit]
    try:  # the node the key was looked for in, as composed without the mistyped override
        parent = OmegaConf.select(compose(config_name, overrides=rest), parent_key or ".")
    except Exception:
        parent = None
    keys = [str(key) for key in parent] if isinstance(parent, DictConfig) else []
    target = parent.get("_target_") if isinstance(parent, DictConfig) else None
    if isinstance(target, str) and name in _arguments_of(target) and not deleted:
        value = culprit.split("=", 1)[1] if culprit and "=" in culprit else "..."
        return (
            f"{where}: {parent_key} does not list {name}, an argument of {target}: add it with "
            f"+{full_key}={value}",
            culprit,
        )
    hints = [f"{parent_key}.{key}" if parent_key else key for key in close_matches(name, keys)]
    hints = hints or _in_other_choices(parent_key, name)
    did_you_mean = f"; did you mean {' or '.join(hints)}?" if hints else ""
    owner = f"the keys of {parent_key}" if parent_key else "the top-level keys and groups"
    shown_keys = ", ".join(key for key in keys if not key.startswith("_")) or "none"
    return f"{where}: no key {full_key}{did_you_mean} ({owner}: {shown_keys})", culprit


def _key_of(line: str) -> str:
    return line.split("=", 1)[0].lstrip("+~").split("@")[0]


def _arguments_of(target: str) -> set[str]:
    """The keyword arguments ``target`` takes (none if it cannot be imported or inspected)."""
    try:
        parameters = inspect.signature(get_object(target)).parameters.values()
    except Exception:
        return set()
    return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _in_other_choices(group: str, name: str) -> list[str]:
    """``prior=scale_mixture prior.sigma1`` for ``prior.sigma``: the key (or a near one) in
    another option of the config group ``group`` of this package."""
    folder = _CONF_DIR / group
    if not group or "." in group or not folder.is_dir():
        return []
    hints = []
    for option in sorted(folder.glob("*.yaml")):
        node: Any = OmegaConf.load(option)
        if option.read_text().startswith("# @package _global_"):
            node = node.get(group)
        if not isinstance(node, DictConfig):
            continue
        keys = [str(key) for key in node if str(key) != "defaults"]
        hints += [f"{group}={option.stem} {group}.{key}" for key in close_matches(name, keys)]
    return hints[:3]


def _first_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause):
        text += f" ({str(cause).splitlines()[0]})"
    return text
