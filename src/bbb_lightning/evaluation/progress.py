"""A progress bar over the phases of an evaluation (the predictive, OOD, attacks, ...), on
stderr, where ``evaluate`` had been silent for a minute; a plain line per phase when stderr is
not a terminal (a log file, a test)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["phase_progress"]


@contextmanager
def phase_progress(total: int) -> Iterator[Callable[[str], None]]:
    """Yield ``start(description)``: it completes the previous phase and shows the next one."""
    console = Console(stderr=True)
    if not console.is_terminal:
        count = 0

        def start_line(description: str) -> None:
            nonlocal count
            count += 1
            print(f"evaluate [{count}/{total}] {description}", file=sys.stderr, flush=True)

        yield start_line
        return
    columns = (
        TextColumn("evaluate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("", total=total)
        started = False

        def start(description: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=description)

        yield start
        progress.update(task, completed=total, description="done")
