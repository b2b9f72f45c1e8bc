"""Probe figures: each stage's linear-probe accuracy and cross-entropy vs epoch (tables/probe.parquet).

Functions take probe tables (DataFrames), never models, so `csn probe --plot` and the report draw them from tables
alone. Several tables of one condition (seeds) are averaged at the checkpoints they share, with a ±1 SE band over
seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from csn.errors import CsnError
from csn.report import style


def summarize_probe(tables: pd.DataFrame | Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per (step, stage): epoch, the mean over runs of acc, loss, train_acc, train_loss, their SE over runs
    (NaN for one run), n_runs and n_features; rows in step order, stages in table order."""
    items = {"run": tables} if isinstance(tables, pd.DataFrame) else dict(tables)
    if not items:
        raise CsnError("summarize_probe needs at least one probe table.")
    d = pd.concat([t.assign(_run=name) for name, t in items.items()], ignore_index=True)
    metrics = ["acc", "loss", "train_acc", "train_loss"]
    g = d.groupby(["step", "stage"], sort=False)
    out = g[metrics].mean().add_suffix("_mean")
    se = (g[metrics].std() / np.sqrt(g["_run"].nunique().to_numpy()[:, None])).add_suffix("_se")
    out = out.join(se).join(g.agg(epoch=("epoch", "mean"), n_runs=("_run", "nunique"),
                                  n_features=("n_features", "max"))).reset_index()
    order = {s: i for i, s in enumerate(dict.fromkeys(d["stage"].tolist()))}
    return out.assign(_o=out["stage"].map(order)).sort_values(["step", "_o"], kind="stable").drop(
        columns="_o").reset_index(drop=True)


def probe_curves(tables: pd.DataFrame | Mapping[str, pd.DataFrame], out_dir: str | Path, *, log_epochs: bool = True,
                 name: str = "probe", title: str | None = None, num_classes: int | None = None) -> style.Figure:
    """Probe accuracy (evaluation split solid, training subset dashed) | cross-entropy per stage vs epoch; a dotted
    line at chance (1 / num_classes) when given."""
    s = summarize_probe(tables)
    stages = list(dict.fromkeys(s["stage"].tolist()))
    epochs = sorted(set(s["epoch"].astype(float).tolist()))
    fig, axes = style.new(ncols=2)
    for ax, metric, label in ((axes[0][0], "acc", "top-1 accuracy"), (axes[0][1], "loss", "cross-entropy (nats)")):
        for i, stage in enumerate(stages):
            d = s[s["stage"] == stage].sort_values("epoch")
            color = style.STAGE_COLORS[i % len(style.STAGE_COLORS)]
            x = d["epoch"].to_numpy(dtype=float)
            for what, ls in ((metric, "-"), (f"train_{metric}", "--")):
                y = d[f"{what}_mean"].to_numpy(dtype=float)
                se = d[f"{what}_se"].fillna(0).to_numpy(dtype=float)
                lab = f"{stage} ({int(d['n_features'].iloc[-1])} units)" if ls == "-" else None
                ax.plot(x, y, ls=ls, marker="o" if ls == "-" else None, ms=3, lw=1.6 if ls == "-" else 1.0,
                        color=color, alpha=1.0 if ls == "-" else 0.6, label=lab)
                ax.fill_between(x, y - se, y + se, color=color, alpha=0.15, lw=0)
        if metric == "acc" and num_classes:
            ax.axhline(1.0 / num_classes, color="0.5", ls=":", lw=1, label="chance")
        style.epoch_axis(ax, log_epochs, epochs)
        ax.set_ylabel(label)
        ax.set_title(f"linear probe {'accuracy' if metric == 'acc' else 'cross-entropy'} per stage")
        ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    seeds = int(s["n_runs"].max())
    cap = (f"Accuracy and mean cross-entropy of a linear probe (L2-penalized softmax regression) on each stage's units "
           f"versus training epoch{' (symlog axis)' if log_epochs else ''}: solid on the evaluation split, dashed on "
           f"the probe's training subset" + (f"; mean over {seeds} seeds with ±1 SE bands." if seeds > 1 else "."))
    return style.save(fig, out_dir, name, cap)


__all__ = ["summarize_probe", "probe_curves"]
