"""The resolved config as a tree, printed when a run starts (``extras.print_config``).

The groups that make the model come first (dataset, model, likelihood, prior, posterior, kl,
optimizer, scheduler), then how it is trained and recorded (trainer, callbacks, logger,
paths), then the top-level keys (seed, tags, ...) as one branch; each group's YAML with its
interpolations resolved (``${optimized_metric}`` as the metric it names). ``train`` prints it
once the config passed its checks, and writes it as plain text to ``config_tree.log`` in the run
dir when training starts (a run stopped by a problem of its data or model leaves none).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

__all__ = ["ORDER", "config_tree", "print_config_tree", "save_config_tree"]

ORDER = (
    "dataset",
    "model",
    "likelihood",
    "prior",
    "posterior",
    "kl",
    "optimizer",
    "scheduler",
    "trainer",
    "callbacks",
    "logger",
    "paths",
)
_FILE = "config_tree.log"


def config_tree(cfg: DictConfig) -> Tree:
    """A rich Tree: one branch per config group (in :data:`ORDER`, then any other group) with
    its resolved YAML, and a last branch ``top-level`` with the plain keys."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    groups = [key for key in ORDER if key in resolved]
    groups += [key for key, node in resolved.items() if key not in ORDER and isinstance(node, dict)]
    branches = [(key, resolved[key]) for key in groups]
    plain = {key: value for key, value in resolved.items() if key not in groups}
    if plain:
        branches.append(("top-level", plain))
    tree = Tree("CONFIG", style="dim", guide_style="dim")
    for name, node in branches:
        text = OmegaConf.to_yaml(node).rstrip() if node is not None else "null"
        branch = tree.add(str(name), style="dim", guide_style="dim")
        branch.add(Syntax(text, "yaml", word_wrap=True))  # long paths wrap, not cropped
    return tree


@rank_zero_only
def print_config_tree(tree: Tree) -> None:
    """Print ``tree`` (:func:`config_tree`) to stdout."""
    Console().print(tree)


@rank_zero_only
def save_config_tree(tree: Tree, run_dir: Path) -> None:
    """Write ``tree`` as plain text to ``run_dir/config_tree.log``."""
    with (run_dir / _FILE).open("w") as file:
        Console(file=file, width=160, color_system=None).print(tree)
