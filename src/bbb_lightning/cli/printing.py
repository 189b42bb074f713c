"""How a finished run prints its metrics."""

from __future__ import annotations


def format_metrics(metrics: dict[str, float]) -> str:
    """One aligned ``name  value`` line per metric, sorted by name."""
    width = max(map(len, metrics), default=0)
    return "\n".join(f"  {name:<{width}}  {value:.6g}" for name, value in sorted(metrics.items()))
