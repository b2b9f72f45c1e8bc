"""Selectivity figures: mean CSI and eta^2 per stage vs epoch, per-block curves, CSI distributions, BN on/off.

Every function takes DataFrames (a selectivity table or its summary from
csn.analysis.selectivity.summarize / summarize_across_runs), never a model, so the report can draw them
from tables alone. Each writes PNG + SVG through csn.report.style.save and returns a style.Figure
whose caption says in one sentence what the figure shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from csn.analysis.selectivity import summarize, summarize_across_runs
from csn.errors import CsnError
from csn.report import style

if TYPE_CHECKING:
    from matplotlib.patches import Patch

LABELS = {
    "csi": "mean CSI  (μmax − μrest) / (μmax + μrest)",
    "eta2": "mean η²  (between-class share of variance)",
}
SHORT = {"csi": "CSI", "eta2": "η²"}
SHORT_LABELS = {"csi": "mean CSI", "eta2": "mean η² (class information)"}


def _as_summary(df: pd.DataFrame, by: str = "stage") -> pd.DataFrame:
    """A summary from either a selectivity table (summarized here) or an existing summary."""
    if df is None or len(df) == 0:
        raise CsnError("no selectivity rows to plot; run `csn selectivity RUN` first.")
    if "csi" in df.columns:
        return summarize(df, by=by)
    if by == "layer" and "layer" not in df.columns:
        raise CsnError("per-block curves need a per-layer summary: summarize(table, by='layer').")
    return df


def _band_label(summary: pd.DataFrame) -> str:
    if "n_runs" in summary.columns:
        n = int(summary["n_runs"].max())
        return f"band: ±1 SE over {n} seed{'s' if n != 1 else ''}"
    return "band: ±1 SE over units"


def _stage_order(summary: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(summary["stage"].tolist()))


def _bn_span(ax, summary: pd.DataFrame) -> Patch | None:
    """Shade the epochs whose checkpoints had BN statistics re-estimated; return a legend handle."""
    if "bn_recalibrated" not in summary.columns:
        return None
    on = summary[summary["bn_recalibrated"] > 0]
    if on.empty:
        return None
    lo, hi = float(on["epoch"].min()), float(on["epoch"].max())
    n = int(on["bn_recalibrated"].max())
    if hi <= lo:
        ax.axvline(lo, color="0.6", lw=6, alpha=0.25, zorder=0)
    else:
        ax.axvspan(lo, hi, color="0.85", alpha=0.5, lw=0, zorder=0)
    return style.patch(facecolor="0.85", alpha=0.8, label=f"BN statistics re-estimated ({n} training batches)")


def _curve(ax, d: pd.DataFrame, metric: str, color, label: str, *, ls: str = "-", marker: str = "o") -> None:
    d = d.sort_values("epoch")
    x = d["epoch"].to_numpy(dtype=float)
    y = d[f"{metric}_mean"].to_numpy(dtype=float)
    se = d[f"{metric}_se"].fillna(0).to_numpy(dtype=float) if f"{metric}_se" in d else np.zeros_like(y)
    ax.plot(x, y, ls=ls, marker=marker, ms=3, lw=1.6, color=color, label=label)
    ax.fill_between(x, y - se, y + se, color=color, alpha=0.18, lw=0)


def _epochs(summary: pd.DataFrame) -> list[float]:
    return sorted(set(summary["epoch"].astype(float).tolist()))


def _stage_label(summary: pd.DataFrame, stage: str) -> str:
    d = summary[summary["stage"] == stage]
    if "n_units" in d and len(d):
        return f"{stage} ({int(round(float(d['n_units'].iloc[-1])))} units)"
    return str(stage)


def stage_curves(summary: pd.DataFrame, out_dir: str | Path, *, log_epochs: bool = True,
                 name: str = "selectivity_stages", title: str | None = None,
                 metrics: Sequence[str] = ("csi", "eta2")) -> style.Figure:
    """Mean CSI | mean eta^2 per stage vs epoch with a ±1 SE band (over units, or over seeds for a multi-run summary)."""
    s = _as_summary(summary)
    metrics = [m for m in metrics if f"{m}_mean" in s.columns]
    fig, axes = style.new(ncols=len(metrics))
    stages = _stage_order(s)
    epochs = _epochs(s)
    for ax, metric in zip(axes[0], metrics):
        bn = _bn_span(ax, s)
        for i, stage in enumerate(stages):
            _curve(ax, s[s["stage"] == stage], metric, style.STAGE_COLORS[i % len(style.STAGE_COLORS)],
                   _stage_label(s, stage))
        style.epoch_axis(ax, log_epochs, epochs)
        ax.set_ylabel(LABELS[metric])
        ax.set_title(f"{SHORT[metric]} per stage")
        handles, _ = ax.get_legend_handles_labels()
        handles.append(style.patch(facecolor="0.5", alpha=0.25, label=_band_label(s)))
        if bn is not None:
            handles.append(bn)
        ax.legend(handles=handles, fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    seeds = f" over {int(s['n_runs'].max())} seeds" if "n_runs" in s.columns else ""
    what = " and ".join({"csi": "class selectivity (CSI)", "eta2": "class information (η²)"}[m] for m in metrics)
    cap = (f"Mean {what} of each stage's units{seeds} versus training epoch"
           f"{' (symlog axis)' if log_epochs else ''}; bands are ±1 standard error "
           f"{'over seeds' if seeds else 'over units'}, dead units excluded.")
    return style.save(fig, out_dir, name, cap)


def block_curves(layer_summary: pd.DataFrame, out_dir: str | Path, *, log_epochs: bool = True,
                 name: str = "selectivity_blocks", title: str | None = None,
                 metrics: Sequence[str] = ("csi", "eta2")) -> style.Figure:
    """One panel per stage (columns) and metric (rows): each block's mean CSI / eta^2 vs epoch, ±1 SE band."""
    s = _as_summary(layer_summary, by="layer")
    metrics = [m for m in metrics if f"{m}_mean" in s.columns]
    stages = _stage_order(s)
    cmap = style.colormap("viridis")
    fig, axes = style.new(ncols=len(stages), nrows=len(metrics), width=4.2, height=3.2)
    epochs = _epochs(s)
    for r, metric in enumerate(metrics):
        lo = np.nanmin((s[f"{metric}_mean"] - s[f"{metric}_se"].fillna(0)).to_numpy(dtype=float))
        hi = np.nanmax((s[f"{metric}_mean"] + s[f"{metric}_se"].fillna(0)).to_numpy(dtype=float))
        pad = 0.05 * (hi - lo) if hi > lo else 0.05
        for c, stage in enumerate(stages):
            ax = axes[r][c]
            d = s[s["stage"] == stage]
            layers = list(dict.fromkeys(d["layer"].tolist()))
            for j, layer in enumerate(layers):
                color = cmap(0.1 + 0.8 * j / max(1, len(layers) - 1)) if len(layers) > 1 else style.STAGE_COLORS[c % 8]
                _curve(ax, d[d["layer"] == layer], metric, color, str(layer))
            style.epoch_axis(ax, log_epochs, epochs)
            ax.set_ylim(lo - pad, hi + pad)  # shared scale: blocks of different stages compare directly
            ax.set_title(f"{stage}: {SHORT[metric]} per block")
            if c == 0:
                ax.set_ylabel(SHORT_LABELS[metric])
            ax.legend(fontsize=7, loc="best", title="block", title_fontsize=7)
    if title:
        fig.suptitle(title)
    cap = (f"Mean {' and '.join(SHORT[m] for m in metrics)} of each residual block (read point) versus epoch, "
           f"one panel per stage, early blocks dark and late blocks light; bands are ±1 SE over units.")
    return style.save(fig, out_dir, name, cap)


def default_distribution_steps(sel: pd.DataFrame, stage: str | None = None) -> dict[int, str]:
    """{step: role} for init (first checkpoint), the peak of mean CSI (of `stage`, or of all units) and the last."""
    d = sel if stage is None else sel[sel["stage"] == stage]
    live = d[~d["dead"].astype(bool)]
    steps = sorted(d["step"].unique().tolist())
    out: dict[int, str] = {}
    out[steps[0]] = "init" if steps[0] == 0 else "first"
    if len(live):
        means = live.groupby("step")["csi"].mean()
        peak = int(means.idxmax())
        out[peak] = (out.get(peak, "") + "+peak").lstrip("+") if peak in out else "peak"
    last = steps[-1]
    out[last] = (out[last] + "+last") if last in out else "last"
    return dict(sorted(out.items()))


def csi_distribution(sel: pd.DataFrame, out_dir: str | Path, *, steps: Sequence[int] | None = None,
                     name: str = "selectivity_distribution", title: str | None = None) -> style.Figure:
    """Violins of unit CSI per stage at chosen checkpoints (default: init, that stage's CSI peak, last)."""
    if sel is None or len(sel) == 0 or "csi" not in sel.columns:
        raise CsnError("the CSI distribution needs a selectivity table (one row per unit); run `csn selectivity` first.")
    if steps is not None:
        missing = sorted(set(int(s) for s in steps) - set(sel["step"].unique().tolist()))
        if missing:
            raise CsnError(f"step {missing[0]} is not in the selectivity table; available steps: "
                           f"{', '.join(str(s) for s in sorted(sel['step'].unique()))}.")
    stages = list(dict.fromkeys(sel["stage"].tolist()))
    fig, axes = style.new(ncols=len(stages), width=3.6, height=3.6, sharey=True)
    epoch_of = sel.groupby("step")["epoch"].first()
    for c, stage in enumerate(stages):
        ax = axes[0][c]
        d = sel[sel["stage"] == stage]
        chosen = {int(s): "" for s in steps} if steps is not None else default_distribution_steps(sel, stage)
        color = style.STAGE_COLORS[c % len(style.STAGE_COLORS)]
        ticks = []
        for x, (step, role) in enumerate(chosen.items()):
            rows = d[d["step"] == step]
            vals = rows.loc[~rows["dead"].astype(bool), "csi"].to_numpy(dtype=float)
            vals = vals[np.isfinite(vals)]
            n_dead = int(rows["dead"].astype(bool).sum())
            if len(vals) > 1 and np.ptp(vals) > 0:
                parts = ax.violinplot(vals, positions=[x], widths=0.8, showmedians=True, showextrema=False)
                for b in parts["bodies"]:
                    b.set_facecolor(color)
                    b.set_alpha(0.45)
                parts["cmedians"].set_color("k")
            if len(vals):
                jitter = (np.random.default_rng(step).random(len(vals)) - 0.5) * 0.25
                ax.scatter(x + jitter, vals, s=4, color=color, alpha=0.6, lw=0)
                ax.plot([x - 0.3, x + 0.3], [vals.mean()] * 2, color="k", lw=1, ls=":")
            label = f"{role + chr(10) if role else ''}epoch {float(epoch_of[step]):.3g}"
            if n_dead:
                label += f"\n{n_dead} dead"
            ticks.append(label)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=8)
        ax.set_xlim(-0.6, len(ticks) - 0.4)
        ax.set_title(_stage_label(summarize(d), stage) if len(d) else stage)
        if c == 0:
            ax.set_ylabel("CSI of a unit")
    if title:
        fig.suptitle(title)
    which = ("the chosen checkpoints" if steps is not None
             else "initialization, the checkpoint where the stage's mean CSI peaks, and the last checkpoint")
    cap = (f"Distribution of unit class selectivity (CSI) in each stage at {which}: violins with median (solid), "
           f"mean (dotted) and every live unit as a dot; dead units are counted under the axis, not plotted.")
    return style.save(fig, out_dir, name, cap)


def bn_comparison(summary_on: pd.DataFrame, summary_off: pd.DataFrame, out_dir: str | Path, *,
                  log_epochs: bool = True, name: str = "selectivity_bn_comparison", title: str | None = None,
                  max_epoch: float | None = None, metrics: Sequence[str] = ("csi", "eta2")) -> style.Figure:
    """Mean CSI | eta^2 per stage vs epoch with BN statistics re-estimated (solid) and as stored (dashed)."""
    on, off = _as_summary(summary_on), _as_summary(summary_off)
    if max_epoch is not None:
        on, off = on[on["epoch"] <= max_epoch + 1e-9], off[off["epoch"] <= max_epoch + 1e-9]
    metrics = [m for m in metrics if f"{m}_mean" in on.columns and f"{m}_mean" in off.columns]
    fig, axes = style.new(ncols=len(metrics))
    stages = list(dict.fromkeys(_stage_order(on) + _stage_order(off)))
    epochs = sorted(set(_epochs(on)) | set(_epochs(off)))
    n_on = int(on["bn_recalibrated"].max()) if "bn_recalibrated" in on.columns else None
    for ax, metric in zip(axes[0], metrics):
        for i, stage in enumerate(stages):
            color = style.STAGE_COLORS[i % len(style.STAGE_COLORS)]
            _curve(ax, on[on["stage"] == stage], metric, color, str(stage))
            _curve(ax, off[off["stage"] == stage], metric, color, "_nolegend_", ls="--", marker="s")
        style.epoch_axis(ax, log_epochs, epochs)
        ax.set_ylabel(LABELS[metric])
        ax.set_title(f"{SHORT[metric]}: BN re-estimated vs stored statistics")
        handles, _ = ax.get_legend_handles_labels()
        handles += [style.line(color="k", ls="-", marker="o", ms=3,
                           label=f"BN re-estimated{f' ({n_on} batches)' if n_on else ''}"),
                    style.line(color="k", ls="--", marker="s", ms=3, label="checkpoint's running statistics"),
                    style.patch(facecolor="0.5", alpha=0.25, label=_band_label(on))]
        ax.legend(handles=handles, fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    cap = ("Mean class selectivity (CSI) and class information (η²) per stage versus epoch, evaluated with BatchNorm "
           "statistics re-estimated from training batches (solid) and with the checkpoint's stored running "
           "statistics (dashed); where they differ, the stored statistics lag the weights.")
    return style.save(fig, out_dir, name, cap)


def selectivity_figures(sel: pd.DataFrame, out_dir: str | Path, *, log_epochs: bool = True,
                        prefix: str = "selectivity", title: str | None = None) -> list[style.Figure]:
    """The standard set for one run: stage curves (CSI | eta^2), per-block curves, CSI distributions."""
    return [
        stage_curves(summarize(sel), out_dir, log_epochs=log_epochs, name=f"{prefix}_stages", title=title),
        block_curves(summarize(sel, by="layer"), out_dir, log_epochs=log_epochs, name=f"{prefix}_blocks", title=title),
        csi_distribution(sel, out_dir, name=f"{prefix}_distribution", title=title),
    ]


def seeds_figures(tables: Mapping[str, pd.DataFrame], out_dir: str | Path, *, log_epochs: bool = True,
                  prefix: str = "selectivity_seeds", title: str | None = None) -> list[style.Figure]:
    """Across runs (seeds) at matched steps: stage curves and per-block curves with ±1 SE over seeds."""
    n = len(tables)
    title = title or f"{n} runs: {', '.join(list(tables)[:4])}{' ...' if n > 4 else ''}"
    return [
        stage_curves(summarize_across_runs(tables), out_dir, log_epochs=log_epochs, name=f"{prefix}_stages", title=title),
        _block_curves_seeds(tables, out_dir, log_epochs=log_epochs, name=f"{prefix}_blocks", title=title),
    ]


def _block_curves_seeds(tables, out_dir, *, log_epochs, name, title) -> style.Figure:
    fig = block_curves(summarize_across_runs(tables, by="layer"), out_dir, log_epochs=log_epochs, name=name, title=title)
    fig.caption = fig.caption.replace("±1 SE over units", f"±1 SE over {len(tables)} seeds")
    return fig


__all__ = ["stage_curves", "block_curves", "csi_distribution", "bn_comparison", "default_distribution_steps",
           "selectivity_figures", "seeds_figures"]
