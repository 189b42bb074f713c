"""What ``evaluate`` writes: ``metrics.json`` numbers, TensorBoard scalars and figures (also
as ``figures/<name>.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

from . import figures

__all__ = ["Report"]


class Report:
    """Collects ``metrics.json`` and writes scalars and figures to TensorBoard and PNG files."""

    def __init__(self, output_dir: Path, figures_enabled: bool = True) -> None:
        self.output_dir = output_dir
        self.metrics: dict[str, float] = {}
        self.figure_files: list[str] = []
        self.figures_enabled = figures_enabled
        self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def scalar(self, key: str, value: float) -> None:
        """A single number: ``metrics.json`` and a TensorBoard scalar at step 0."""
        self.metrics[key] = float(value)
        self.writer.add_scalar(key, float(value), 0)

    def curve(self, tag: str, step: int, key: str, value: float) -> None:
        """A point of a curve: ``metrics.json[key]`` and TensorBoard ``tag`` at ``step``."""
        self.metrics[key] = float(value)
        self.writer.add_scalar(tag, float(value), step)

    def figure(self, name: str, figure: Any) -> None:
        """``figures/<name>.png`` and the TensorBoard image ``figures/<name>``."""
        path = figures.save_figure(figure, self.output_dir / "figures" / f"{name}.png")
        self.figure_files.append(str(path))
        self.writer.add_figure(f"figures/{name}", figure, 0, close=True)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
