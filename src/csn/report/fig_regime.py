"""Figure of the regime study (`csn experiment regime`): harm vs condition per cell (dataset x regularizer).

Frames in, figures out: regime.parquet (one row per cell, csn.experiments.regime.cell_table). Per cell, the
paired harm of suppression from step 0 and from the late onset (baseline - condition, final test accuracy, same
seed) and the late - early contrast, each with its 95 % t interval over seeds, in accuracy points; the dotted
lines are C4's declared sizes (the minimal harm and the 'little' bound of the late harm).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from csn.report import style

POINTS = 100.0
"""Accuracy differences are drawn in points (1 point = 0.01 accuracy)."""
PARTS = (("early_harm", "harm from step 0"), ("late_harm", "harm from the late onset"),
         ("contrast", "late − early (accuracy)"))


def regime_figure(table: pd.DataFrame, out_dir: str | Path, *, min_harm: float | None = None,
                  little: float | None = None) -> style.Figure | None:
    """One panel per dataset, regularizers side by side: each C4 part's estimate with its 95 % t interval."""
    if table is None or table.empty:
        return None
    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = style.new(ncols=len(datasets), width=4.6, height=3.4)
    for ax, d in zip(axes[0], datasets):
        g = table[table["dataset"] == d]
        regs = list(g["regularizer"])
        width = 0.8 / len(PARTS)
        for i, (part, label) in enumerate(PARTS):
            x = np.arange(len(regs)) + (i - (len(PARTS) - 1) / 2) * width
            mean = POINTS * g[f"{part}_mean"].to_numpy(dtype=float)
            lo, hi = POINTS * g[f"{part}_lo"].to_numpy(dtype=float), POINTS * g[f"{part}_hi"].to_numpy(dtype=float)
            err = np.vstack([np.where(np.isfinite(lo), mean - lo, 0), np.where(np.isfinite(hi), hi - mean, 0)])
            ax.errorbar(x, mean, yerr=err, fmt="o", capsize=3, color=style.COND_COLORS[i % len(style.COND_COLORS)],
                        label=label)
        ax.axhline(0, color="black", lw=0.8)
        for y, ls, what in ((min_harm, ":", "minimal harm"), (little, "--", "'little'")):
            if y is not None and math.isfinite(y):
                ax.axhline(POINTS * y, color="gray", ls=ls, lw=0.8, label=f"{what} ({POINTS * y:g})")
        ax.set_xticks(np.arange(len(regs)))
        ax.set_xticklabels([f"{r}\nα {a:g}" for r, a in zip(regs, g["alpha"])])
        ax.set_title(f"{d}")
        ax.set_ylabel("accuracy points (95 % t interval)")
    axes[0, 0].legend(fontsize=7)
    return style.save(fig, out_dir, "regime_harm",
                      "Per dataset and regularizer: the paired harm of suppressing selectivity from step 0 and from the "
                      "late onset (baseline − condition final test accuracy, same seed) and the late − early contrast, "
                      "mean over seeds with 95 % t intervals, in accuracy points.")


__all__ = ["regime_figure"]
