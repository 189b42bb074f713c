"""The model summary at the start of training, with the variational tensors and without FLOPs.

Lightning's summary counts FLOPs only for a module with an ``example_input_array``: for ours
it printed a column of zeros and ``Total FLOPs: 0``. This one prints, per module down to
``max_depth`` (1: the top-level ones; ``callbacks=[default,model_summary]``: 3), its
parameters and how many of its tensors are variational (each one a posterior q(w) with its
prior, trained through its mu and rho), then the totals.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from ..bayes import named_posteriors

__all__ = ["VariationalModelSummary", "with_variational_summary"]


class VariationalModelSummary(ModelSummary):
    """A rich table: name, type, parameters and variational tensors of each module down to
    ``max_depth`` (-1: all); then the trainable parameters, the variational tensors and what
    they hold, the size."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        from rich import get_console
        from rich.table import Table

        table = Table(header_style="bold magenta")
        for column, justify in (("Name", "left"), ("Type", "left"), ("Params", "right")):
            table.add_column(column, justify=justify)  # type: ignore[arg-type]
        table.add_column("Variational tensors", justify="right")
        for name, module in pl_module.named_modules():
            depth = name.count(".") + 1
            if not name or 0 <= self._max_depth < depth:  # max_depth -1: every module
                continue
            params = sum(p.numel() for p in module.parameters())
            variational = sum(1 for _ in named_posteriors(module))
            table.add_row(
                name, type(module).__name__, get_human_readable_count(params), str(variational)
            )
        console = get_console()
        console.print(table)
        trainable = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        posteriors = [posterior for _, posterior in named_posteriors(pl_module)]
        weights = sum(posterior.mean.numel() for posterior in posteriors)
        kinds = sorted({type(posterior).__name__ for posterior in posteriors})
        size_mb = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 1e6
        console.print(f"[bold]Trainable params[/]: {get_human_readable_count(trainable).strip()}")
        console.print(
            f"[bold]Variational tensors[/]: {len(posteriors)}, holding "
            f"{get_human_readable_count(weights).strip()} weights ({', '.join(kinds) or 'none'})"
        )
        console.print(f"[bold]Params size (MB)[/]: {size_mb:.3f}")


def with_variational_summary(callbacks: list[Any]) -> list[Any]:
    """``callbacks`` with the model summary Lightning added (when ``enable_model_summary``) in
    its place replaced by a :class:`VariationalModelSummary` of the same depth."""
    return [
        VariationalModelSummary(max_depth=callback._max_depth)
        if type(callback) in (ModelSummary, RichModelSummary)
        else callback
        for callback in callbacks
    ]
