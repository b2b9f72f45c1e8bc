"""Fisher information figure: the trace of each stage's Fisher information vs step, log scale.

Takes a fisher table (tables/fisher.parquet as a DataFrame), never a model, so it can be drawn from the table
alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from csn.errors import CsnError
from csn.report import style

PANELS = (("trace", "tr F (stage weights)"), ("trace_per_param", "tr F / number of parameters"))


def fisher_figure(table: pd.DataFrame, out_dir: str | Path, *, name: str = "fisher", title: str = "") -> style.Figure:
    """Two panels vs training step (symlog, step 0 shown): the trace of each stage's Fisher information (band: +-1
    standard error over the examples), and the trace per parameter; log y; 'all' in black. Stages without
    parameters are left out."""
    d = table[table["n_params"] > 0] if table is not None else None
    if d is None or d.empty:
        raise CsnError("the fisher table has no rows to draw; run `csn fisher RUN` first.")
    order = list(dict.fromkeys(d["stage"]))
    fig, axes = style.new(ncols=len(PANELS), width=4.6, height=3.4)
    steps = sorted(set(d["step"].tolist()))
    positive = [s for s in steps if s > 0]
    for ax, (column, label) in zip(axes[0], PANELS):
        for i, stage in enumerate(order):
            s = d[d["stage"] == stage].sort_values("step")
            y = s[column].to_numpy(dtype=float)
            keep = np.isfinite(y) & (y > 0)
            color = "#000000" if stage == "all" else style.STAGE_COLORS[i % len(style.STAGE_COLORS)]
            x = s["step"].to_numpy()[keep]
            ax.plot(x, y[keep], marker="o", ms=3, color=color, label=stage, ls="--" if stage == "all" else "-")
            if column == "trace":  # +-1 standard error over the examples (and the sampled labels)
                se = s["trace_se"].to_numpy(dtype=float)[keep]
                ax.fill_between(x, np.maximum(y[keep] - se, y[keep] * 0.5), y[keep] + se, color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1)
        ax.set_xlabel("step (symlog)")
        ax.set_ylabel(label)
    axes[0][0].legend(fontsize=8)
    first = d.iloc[0]
    fig.suptitle(f"{title}  Fisher information ({first['labels']} labels, {first['n_images']} {first['split']} images)"
                 .strip(), fontsize=10)
    return style.save(fig, out_dir, name, f"Trace of the Fisher information of each stage's weights vs step "
                      f"({first['labels']} labels, {first['n_images']} {first['split']} images; log scale).")


__all__ = ["fisher_figure"]
