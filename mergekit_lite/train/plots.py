"""Training curves as PNG (matplotlib's Agg canvas: no display, no global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_history"]


def plot_history(
    history: Sequence[dict[str, Any]], path: Path, keys: Sequence[str] = ("loss", "eval_loss")
) -> Path | None:
    """One line per key present in ``history`` (x: step); None if nothing to plot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = {k: [(h["step"], h[k]) for h in history if k in h and h[k] is not None] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, points in series.items():
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            label=k,
            marker="." if len(points) < 40 else None,
        )
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
