"""Ablation figures: normalized accuracy vs fraction of units ablated, and the area under it vs epoch.

Both read tables/ablation.parquet (or ablation_sweep's rows) through summarize_ablation; they never
run a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from csn.analysis.ablation import summarize_ablation
from csn.report import style

ORDER_LABELS = {"selective": "most selective first", "random": "random units (control)", "least": "least selective first"}


def _x_of(df: pd.DataFrame) -> tuple[str, str]:
    """The time column and its label: epoch when the table has it, else step."""
    return ("epoch", "epoch") if "epoch" in df.columns else ("step", "step")


def _orders(df: pd.DataFrame) -> list[str]:
    present = set(df["order"].unique())
    return [o for o in ("selective", "random", "least") if o in present]


def _stages(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["stage"].tolist()))


def _epoch_norm(times: Sequence[float]):
    """Colour scale for checkpoints: symlog in epoch (the action is in the first epoch), linear otherwise."""
    from matplotlib import colors

    t = np.asarray(sorted(set(float(v) for v in times)))
    vmax = float(t.max()) if len(t) else 1.0
    positive = t[t > 0]
    if len(positive) and vmax / positive.min() > 8:
        return colors.SymLogNorm(linthresh=float(positive.min()), vmin=float(t.min()), vmax=vmax, base=10), True
    return colors.Normalize(vmin=float(t.min()) if len(t) else 0.0, vmax=vmax if vmax > t.min() else vmax + 1), False


def ablation_curves(df: pd.DataFrame, out_dir: str | Path, *, name: str = "ablation_curves", metric: str = "top1",
                    title: str | None = None) -> style.Figure:
    """Normalized accuracy vs fraction ablated: rows = stages, columns = orders, one curve per checkpoint
    coloured by epoch (random: mean over draws with a min-max band)."""
    curves = summarize_ablation(df).curves
    col = f"{metric}_norm"
    tcol, tlabel = _x_of(curves)
    stages, orders = _stages(curves), _orders(curves)
    ncol = len(orders)
    fig, axes = style.new(ncols=ncol + 1, nrows=len(stages), width=3.0, height=2.9, sharey="row",
                          gridspec_kw={"width_ratios": [1.0] * ncol + [0.06]})
    gs = axes[0][ncol].get_gridspec()
    for r in range(len(stages)):
        axes[r][ncol].remove()
    cax = fig.add_subplot(gs[:, ncol])
    norm, _ = _epoch_norm(curves[tcol])
    cmap = style.colormap("viridis")
    for r, stage in enumerate(stages):
        for c, order in enumerate(orders):
            ax = axes[r][c]
            sub = curves[(curves["stage"] == stage) & (curves["order"] == order)]
            for t, g in sub.groupby(tcol, sort=True):
                stats = g.groupby("fraction")[col].agg(["mean", "min", "max"]).sort_index()
                color = cmap(norm(float(t)))
                ax.plot(stats.index, stats["mean"], color=color, lw=1.2)
                if order == "random" and g["draw"].nunique() > 1:
                    ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.15, lw=0)
            ax.axhline(1.0, color="k", lw=0.6, alpha=0.4)
            ax.set_xlim(0, 1)
            if r == 0:
                ax.set_title(ORDER_LABELS.get(order, order), fontsize=10)
            if r == len(stages) - 1:
                ax.set_xlabel("fraction of units ablated per block")
            if c == 0:
                ax.set_ylabel(f"{stage}\n{metric} / unablated")
    if title:
        fig.suptitle(title)
    from matplotlib.cm import ScalarMappable

    sm = ScalarMappable(norm=norm, cmap=cmap)
    sm.set_array([])
    fig.colorbar(sm, cax=cax).set_label(tlabel)
    caption = (f"{metric} accuracy, normalized by the unablated network, as the top-n units of every block of a stage "
               f"are zeroed (rows: stages; columns: unit order), one curve per checkpoint coloured by {tlabel}; "
               "the random control is the mean over seeded draws with a min-max band.")
    return _save(fig, out_dir, name, caption)


def ablation_areas(df: pd.DataFrame, out_dir: str | Path, *, name: str = "ablation_area", log_epochs: bool = True,
                   title: str | None = None) -> style.Figure:
    """Per stage: area under normalized top-1 vs fraction ablated, per order, vs epoch (random: mean ± std over
    draws); below it the selective-minus-random gap with ± 1 SE over draws."""
    s = summarize_ablation(df)
    areas, gaps = s.areas, s.gaps
    tcol, tlabel = _x_of(areas)
    stages = _stages(areas)
    fig, axes = style.new(ncols=len(stages), nrows=2, width=3.8, height=2.9, sharex=True)
    for c, stage in enumerate(stages):
        ax, axg = axes[0][c], axes[1][c]
        a = areas[areas["stage"] == stage]
        for order in _orders(a):
            g = a[a["order"] == order].groupby(tcol)["area"].agg(["mean", "std", "count"]).sort_index()
            color = style.ORDER_COLORS.get(order, None)
            ax.plot(g.index, g["mean"], marker="o", ms=3, color=color, label=ORDER_LABELS.get(order, order))
            if order == "random" and (g["count"] > 1).any():
                sd = g["std"].fillna(0)
                ax.fill_between(g.index, g["mean"] - sd, g["mean"] + sd, color=color, alpha=0.2, lw=0)
        ax.set_title(stage)
        if c == 0:
            ax.set_ylabel("area under normalized top-1")
            ax.legend(fontsize=8)
        gs = gaps[gaps["stage"] == stage].sort_values(tcol)
        if not gs.empty and gs["gap"].notna().any():
            axg.plot(gs[tcol], gs["gap"], marker="o", ms=3, color=style.ORDER_COLORS["selective"])
            se = gs["gap_se"].fillna(0)
            axg.fill_between(gs[tcol], gs["gap"] - se, gs["gap"] + se, color=style.ORDER_COLORS["selective"],
                             alpha=0.2, lw=0)
        axg.axhline(0, color="k", lw=0.6, alpha=0.5)
        if c == 0:
            axg.set_ylabel("selective - random area")
        times = sorted(set(areas[tcol].tolist()))
        if tcol == "epoch":
            style.epoch_axis(axg, log_epochs, times)  # shared with the area panel above
        else:
            axg.set_xlabel(tlabel)
    if title:
        fig.suptitle(title)
    caption = ("Area under normalized top-1 vs fraction ablated per stage and unit order (random: mean ± std over draws), "
               "and below it the selective-minus-random gap (± 1 SE over draws); a negative gap means the most "
               "selective units matter more than random ones.")
    return _save(fig, out_dir, name, caption)


def _save(fig, out_dir: str | Path, name: str, caption: str) -> style.Figure:
    """style.save, quiet about layouts it cannot tighten (the colorbar)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return style.save(fig, out_dir, name, caption)


def ablation_figures(df: pd.DataFrame, out_dir: str | Path, *, title: str | None = None,
                     log_epochs: bool = True) -> list[style.Figure]:
    """Both ablation figures of a table (curves per checkpoint; areas and gaps vs epoch)."""
    if df is None or df.empty:
        return []
    return [ablation_curves(df, out_dir, title=title), ablation_areas(df, out_dir, title=title, log_epochs=log_epochs)]


__all__ = ["ablation_curves", "ablation_areas", "ablation_figures"]
