"""Figures of the critical-period map (`csn experiment windows`): paired harm over window x alpha, harm vs window
start (epochs, linear: windows spread over training) with 95 % t-interval bands, CSI / eta² trajectories per condition with the window shaded, and the paired
test-accuracy gap at every checkpoint.

Frames in, figures out: windows.parquet (the per-condition table) and the curves of
csn.experiments.windows.trajectories / gap_curves.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from csn.report import style

POINTS = 100.0
"""Accuracy differences are drawn in points (1 point = 0.01 accuracy)."""


def _families(table: pd.DataFrame) -> list[tuple[float, str, pd.DataFrame]]:
    """(alpha, stage set, conditions by window start) of the regularized conditions, in table order."""
    reg = table[table["alpha"] != 0]
    return [(float(a), str(s), g.sort_values(["start_step", "end_step"]))
            for (a, s), g in reg.groupby(["alpha", "stage_set"], sort=False)]


def _set_label(g: pd.DataFrame) -> str:
    name, stages = str(g["stage_set"].iloc[0]), str(g["stages"].iloc[0])
    return name if name == stages else f"{name} ({stages})"


def _step_axis(ax, steps, starts=None) -> None:
    """A step axis: symlog when every window starts in the first fifth of the steps drawn (an early-phase map),
    linear when the windows are spread over training."""
    positive = [float(s) for s in steps if s > 0]
    early = starts is None or (positive and max([float(s) for s in starts] or [0.0]) < 0.2 * max(positive))
    if early:
        ax.set_xscale("symlog", linthresh=min(positive) if positive else 1.0)
    ax.set_xlabel("step (symlog)" if early else "step")


def _window_label(r) -> str:
    """A window as its steps, with its epochs when the table has them: '0:234 (ep 0-0.5)'."""
    steps = str(r.window).replace("step=", "")
    if hasattr(r, "start_epoch") and hasattr(r, "end_epoch") and str(r.window).count("step=") == 2:
        return f"{steps}\n(ep {r.start_epoch:.3g}-{r.end_epoch:.3g})"
    return steps


def _grid(n: int, width: float = 4.2, height: float = 3.2):
    ncols = min(3, max(1, n))
    fig, axes = style.new(ncols=ncols, nrows=math.ceil(n / ncols), width=width, height=height)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def harm_heatmap(table: pd.DataFrame, out_dir: str | Path, *, name: str = "windows_heatmap") -> style.Figure:
    """Paired harm (baseline - condition final test accuracy, points; mean ± paired SE over seeds) per window x alpha,
    one panel per stage set; red = the window harmed, blue = it helped."""
    reg = table[table["alpha"] != 0]
    sets = list(dict.fromkeys(reg["stage_set"]))
    vmax = max(0.05, float(np.nanmax(np.abs(reg["harm_mean"].to_numpy(float)))) * POINTS) if len(reg) else 1.0
    fig, axes = _grid(len(sets), width=max(3.2, 1.3 * reg["window"].nunique()), height=0.9 + 0.55 * reg["alpha"].nunique())
    for ax, stage_set in zip(axes, sets):
        g = reg[reg["stage_set"] == stage_set]
        firsts = g.drop_duplicates("window").sort_values(["start_step", "end_step"])
        windows = firsts["window"].tolist()
        alphas = sorted(g["alpha"].unique())
        m = np.full((len(alphas), len(windows)), np.nan)
        for r in g.itertuples():
            m[alphas.index(r.alpha), windows.index(r.window)] = r.harm_mean * POINTS
        im = ax.imshow(m, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        for r in g.itertuples():
            se = "" if not np.isfinite(r.harm_se_paired) else f"\n±{r.harm_se_paired * POINTS:.2f}"
            ax.text(windows.index(r.window), alphas.index(r.alpha), f"{r.harm_mean * POINTS:+.2f}{se}", ha="center",
                    va="center", fontsize=7)
        ax.set_xticks(range(len(windows)), [_window_label(r) for r in firsts.itertuples()], rotation=35, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_ylabel("alpha")
        ax.grid(False)
        ax.set_title(f"stages {_set_label(g)}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8, label="harm (points)")
    return style.save(fig, out_dir, name, "Paired harm per window (columns; steps unless marked) and alpha (rows): the "
                      "baseline's final test accuracy minus the condition's, same seed, in points (mean ± paired SE "
                      "over seeds); one panel per stage set.")


def harm_vs_start(table: pd.DataFrame, out_dir: str | Path, *, name: str = "windows_harm") -> style.Figure:
    """Paired harm vs window start (epochs, linear: windows spread over training), one line per alpha with its 95 %
    t-interval band over seeds (window_stats.condition_intervals), each window's span drawn as a bar at its harm; one
    panel per stage set."""
    reg = table[table["alpha"] != 0]
    sets = list(dict.fromkeys(reg["stage_set"]))
    fig, axes = _grid(len(sets))
    for ax, stage_set in zip(axes, sets):
        g = reg[reg["stage_set"] == stage_set]
        for i, (alpha, ga) in enumerate(g.groupby("alpha", sort=True)):
            ga = ga.sort_values(["start_step", "end_step"])
            color = style.COND_COLORS[(i + 1) % len(style.COND_COLORS)]
            x, y = ga["start_epoch"].to_numpy(float), ga["harm_mean"].to_numpy(float) * POINTS
            lo, hi = ga["harm_lo"].to_numpy(float) * POINTS, ga["harm_hi"].to_numpy(float) * POINTS
            ax.plot(x, y, marker="o", color=color, label=f"alpha {alpha:g}")
            ax.hlines(y, x, ga["end_epoch"].to_numpy(float), color=color, lw=3, alpha=0.35)
            if len(x) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.18, lw=0)
            else:
                ax.errorbar(x, y, yerr=[y - lo, hi - y], color=color, capsize=3, ls="none")
        ax.axhline(0, color="k", lw=0.7, alpha=0.5)
        ax.set_xlim(left=-0.03 * max(1e-9, float(g["end_epoch"].max())))  # the caps of a window at 0 stay inside
        ax.set_xlabel("window start (epoch); bar: the window")
        ax.set_ylabel("paired harm (points)")
        ax.set_title(f"stages {_set_label(g)}", fontsize=9)
        ax.legend(fontsize=8)
    return style.save(fig, out_dir, name, "Paired harm (baseline − condition final test accuracy, same seed, points) "
                      "versus the window's start in epochs; the bar at each point spans the window; bands (or bars) are "
                      "95 % t intervals over seeds. Early windows harming more = a line falling to the right.")


def trajectories_figure(curves: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path, *, metric: str = "csi",
                        name: str | None = None) -> style.Figure:
    """Mean CSI (or eta²) of each condition's regularized stages at the measured steps, beside the baseline on the
    same stages (dashed), the window shaded; one panel per (alpha, stage set)."""
    fams = _families(table)
    fig, axes = _grid(len(fams))
    label = "CSI" if metric == "csi" else "eta²"
    for ax, (alpha, _stage_set, g) in zip(axes, fams):
        steps = []
        for i, c in enumerate(g.itertuples()):
            color = style.COND_COLORS[(i + 1) % len(style.COND_COLORS)]
            d = curves[(curves["condition"] == c.condition) & (curves["metric"] == metric)]
            own, base = d[d["curve"] == "condition"].sort_values("step"), d[d["curve"] == "baseline"].sort_values("step")
            if i == 0 and len(base):
                ax.plot(base["step"], base["mean"], color="k", ls="--", lw=1, marker=".", label="baseline")
            ax.plot(own["step"], own["mean"], color=color, marker="o", ms=3, label=c.window.replace("step=", ""))
            ax.axvspan(c.start_step, c.end_step, color=color, alpha=0.12, lw=0)
            steps += d["step"].tolist()
        _step_axis(ax, steps, g["start_step"])
        ax.set_ylabel(f"mean {label}")
        ax.set_title(f"alpha {alpha:g}, stages {_set_label(g)}", fontsize=9)
        ax.legend(fontsize=7)
    return style.save(fig, out_dir, name or f"windows_{metric}", f"Mean {label} of the regularized stages (live units) "
                      "at the end of each window and of training, beside the baseline on the same stages (dashed); the "
                      "shaded span is the window. A curve that drops inside its window and returns to the baseline "
                      "after it means selectivity came back.")


def gap_figure(gaps: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path, *,
               name: str = "windows_accuracy_gap") -> style.Figure:
    """Paired test-accuracy gap (condition - baseline, points) at every checkpoint, one line per window (± SE band)."""
    fams = _families(table)
    fig, axes = _grid(len(fams))
    for ax, (alpha, _stage_set, g) in zip(axes, fams):
        steps = []
        for i, c in enumerate(g.itertuples()):
            color = style.COND_COLORS[(i + 1) % len(style.COND_COLORS)]
            d = gaps[gaps["condition"] == c.condition].sort_values("step")
            x, y, se = d["step"].to_numpy(float), d["mean"].to_numpy(float) * POINTS, d["se"].fillna(0).to_numpy(float) * POINTS
            ax.plot(x, y, color=color, lw=1.2, label=c.window.replace("step=", ""))
            ax.fill_between(x, y - se, y + se, color=color, alpha=0.15, lw=0)
            ax.axvspan(c.start_step, c.end_step, color=color, alpha=0.1, lw=0)
            steps += x.tolist()
        ax.axhline(0, color="k", lw=0.7, alpha=0.5)
        _step_axis(ax, steps, g["start_step"])
        ax.set_ylabel("test acc − baseline (points)")
        ax.set_title(f"alpha {alpha:g}, stages {_set_label(g)}", fontsize=9)
        ax.legend(fontsize=7)
    return style.save(fig, out_dir, name, "Test accuracy minus the baseline's, same seed, at every checkpoint (points; "
                      "band ±1 SE over seeds; intermediate checkpoints are scored on a fixed test subset, the last on "
                      "the whole split); the shaded span is the window. Does a window slow learning even when the end "
                      "is the same?")


def windows_figures(table: pd.DataFrame, curves: pd.DataFrame, gaps: pd.DataFrame,
                    out_dir: str | Path) -> list[style.Figure]:
    """Every figure of the map: heatmap, harm vs start, CSI and eta² trajectories (when measured), accuracy gaps."""
    figs = [harm_heatmap(table, out_dir), harm_vs_start(table, out_dir)]
    if curves is not None and len(curves):
        figs += [trajectories_figure(curves, table, out_dir, metric="csi"),
                 trajectories_figure(curves, table, out_dir, metric="eta2")]
    if gaps is not None and len(gaps):
        figs.append(gap_figure(gaps, table, out_dir))
    return figs


__all__ = ["harm_heatmap", "harm_vs_start", "trajectories_figure", "gap_figure", "windows_figures"]
