"""Shared figure conventions: one look for every csn figure, saved as PNG and SVG together."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from csn.runs.io import atomic_path

STAGE_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]
ORDER_COLORS = {"selective": "#d62728", "random": "#7f7f7f", "least": "#1f77b4"}
COND_COLORS = ["#222222", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
"""One colour per experiment condition (baseline first), in every figure of the report."""


@functools.cache
def pyplot():
    """matplotlib's pyplot, switched to the Agg backend once, at the first figure: a process that draws nothing (a
    spawned worker, a command without --plot) does not pay matplotlib's start-up (0.3 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def patch(**kw):
    """A legend entry for a shaded area (matplotlib's Patch)."""
    from matplotlib.patches import Patch

    return Patch(**kw)


def line(**kw):
    """A legend entry for a line (matplotlib's Line2D with no data)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], **kw)


def colormap(name: str):
    """matplotlib's colormap `name`."""
    return pyplot().colormaps[name]


@dataclass
class Figure:
    """A saved figure: its PNG (shown in the report), its SVG, and a one-sentence caption."""

    png: Path
    svg: Path
    caption: str


def new(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.6, **kw):
    """A figure with csn's defaults (readable fonts, light grid)."""
    plt = pyplot()
    plt.rcParams.update({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "legend.frameon": False})
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, **kw)


def save(fig, out_dir: str | Path, name: str, caption: str) -> Figure:
    """Save as out_dir/name.png and .svg (atomically), close it, and return the Figure record."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        target = out_dir / f"{name}.{ext}"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=110)
        paths.append(target)
    pyplot().close(fig)
    return Figure(paths[0], paths[1], caption)


def epoch_axis(ax, log: bool, epochs) -> None:
    """Label the epoch axis; with log=True use symlog so epoch 0 (initialization) stays visible."""
    ax.set_xlabel("epoch" + (" (symlog)" if log else ""))
    if log:
        positive = [e for e in epochs if e > 0]
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 0.01)
