"""Linearity figures: every linearity measure vs epoch, in small multiples grouped by kind.

Functions take linearity tables (tables/linearity.parquet as DataFrames), never models, so the
report can draw them from tables alone. Several tables of one condition (seeds) are averaged with a
±1 SE band over seeds at the checkpoints they share; several conditions are drawn in one color each.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from csn.analysis.linearity import summarize_linearity
from csn.errors import CsnError
from csn.report import style

LABELS = {
    "linear_agreement": "F = L  (linear classifier on inputs)",
    "mu_y_share": "μ_Y / I(F;Y)  (share of F's label information L explains)",
    "linearized_agreement_init": "argmax f = argmax f_lin  (around θ₀)",
    "linearized_agreement_prev": "argmax f = argmax f_lin  (around previous ckpt)",
    "relu_same_as_init": "same as θ₀",
    "relu_same_as_prev": "same as previous ckpt",
    "linearized_rel_dist_init": "around θ₀",
    "linearized_rel_dist_prev": "around previous ckpt",
    "mu_y_bits": "μ_Y(F; L) = I(F;Y) − I(F;Y|L)",
    "i_fy_bits": "I(F; Y)",
    "i_fy_given_l_bits": "I(F; Y | L)",
    "i_ly_bits": "I(L; Y)  (upper bound of μ_Y)",
    "acc": "network F",
    "linear_model_test_acc": "linear classifier L (test)",
}

# (title, measures, y-limits, y-label)
PANELS = [
    ("agreement with linear models", ["linear_agreement", "linearized_agreement_init", "linearized_agreement_prev",
                                      "mu_y_share"], (0.0, 1.02), "agreement rate / share"),
    ("ReLU pattern stability", ["relu_same_as_init", "relu_same_as_prev"], (0.0, 1.02),
     "fraction of ReLU on/off states"),
    ("distance to the linearized network", ["linearized_rel_dist_init", "linearized_rel_dist_prev"], None,
     "‖f − f_lin‖ / ‖f − f_ref‖"),
    ("performance correlation (Kalimeris et al.)", ["mu_y_bits", "i_fy_bits", "i_fy_given_l_bits"], None, "bits"),
    ("accuracy", ["acc", "linear_model_test_acc"], (0.0, 1.02), "top-1 on the evaluation split"),
]
BOUND = "i_ly_bits"
MEASURE_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
STYLES = ["-", "--", ":", "-."]


def _conditions(tables) -> dict[str, dict[str, pd.DataFrame]]:
    """{condition: {seed name: table}} from a table, a list/dict of seed tables, or a dict of conditions."""
    if isinstance(tables, pd.DataFrame):
        return {"": {"run": tables}}
    if isinstance(tables, Mapping):
        vals = list(tables.values())
        if vals and all(isinstance(v, pd.DataFrame) for v in vals):
            return {"": {str(k): v for k, v in tables.items()}}
        out = {}
        for k, v in tables.items():
            if isinstance(v, pd.DataFrame):
                out[str(k)] = {"run": v}
            elif isinstance(v, Mapping):
                out[str(k)] = {str(a): b for a, b in v.items()}
            else:
                out[str(k)] = {str(i): b for i, b in enumerate(v)}
        return out
    if isinstance(tables, Sequence) and tables and all(isinstance(v, pd.DataFrame) for v in tables):
        return {"": {str(i): v for i, v in enumerate(tables)}}
    raise CsnError("linearity figures need a linearity table, a list/dict of tables (seeds), or a dict of "
                   "conditions; run `csn linearity RUN` first.")


def _line(ax, d: pd.DataFrame, color, ls: str, label: str | None, band: bool) -> None:
    d = d.sort_values("epoch")
    x = d["epoch"].to_numpy(dtype=float)
    y = d["mean"].to_numpy(dtype=float)
    ax.plot(x, y, ls=ls, marker="o", ms=2.5, lw=1.5, color=color, label=label)
    if band:
        se = d["se"].fillna(0).to_numpy(dtype=float)
        ax.fill_between(x, y - se, y + se, color=color, alpha=0.18, lw=0)


def linearity_figure(tables, out_dir: str | Path, *, log_epochs: bool = True, name: str = "linearity",
                     title: str | None = None) -> style.Figure:
    """Every linearity measure vs epoch in five panels (agreements, ReLU stability, distances, information, accuracy).

    tables: one run's table; a list or dict of tables of one condition (mean ± 1 SE over seeds at shared
    checkpoints); or a dict {condition: table or list/dict of tables} (one color per condition).
    """
    conds = _conditions(tables)
    sums = {c: summarize_linearity(t) for c, t in conds.items()}
    n_seeds = {c: len(t) for c, t in conds.items()}
    multi = len(sums) > 1
    present = set().union(*(set(s["measure"]) for s in sums.values()))
    panels = [p for p in PANELS if any(m in present for m in p[1])]
    if not panels:
        raise CsnError("the linearity table has no known measures to plot; run `csn linearity RUN` first.")
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = style.new(ncols=ncols, nrows=nrows, width=4.6, height=3.4)
    flat = axes.ravel()
    epochs = sorted(set().union(*(set(s["epoch"].astype(float)) for s in sums.values())))
    cond_colors = {c: style.STAGE_COLORS[i % len(style.STAGE_COLORS)] for i, c in enumerate(sums)}
    for ax, (ptitle, measures, ylim, ylabel) in zip(flat, panels):
        first = next(iter(sums.values()))
        bn = first[(first["bn_recalibrated"] > 0)]
        if not bn.empty:
            lo, hi = float(bn["epoch"].min()), float(bn["epoch"].max())
            ax.axvspan(lo, hi if hi > lo else lo, color="0.88", alpha=0.6, lw=0, zorder=0)
        handles = []
        for j, m in enumerate([m for m in measures if m in present]):
            for c, s in sums.items():
                d = s[s["measure"] == m]
                if d.empty or d["mean"].isna().all():
                    continue
                color = cond_colors[c] if multi else MEASURE_COLORS[j % len(MEASURE_COLORS)]
                ls = STYLES[j % len(STYLES)] if multi else "-"
                if m == "linear_model_test_acc":  # a constant: a horizontal reference line
                    v = float(d["mean"].mean())  # a Line2D, so that legend placement avoids it
                    ax.plot([epochs[0], epochs[-1]], [v, v], color=color, ls=":", lw=1.4)
                    continue
                _line(ax, d, color, ls, None, n_seeds[c] > 1)
            color = "0.3" if multi else MEASURE_COLORS[j % len(MEASURE_COLORS)]
            ls = ":" if m == "linear_model_test_acc" else (STYLES[j % len(STYLES)] if multi else "-")
            handles.append(style.line(color=color, ls=ls, label=LABELS.get(m, m)))
        if ptitle.startswith("performance") and BOUND in present:
            for c, s in sums.items():
                d = s[s["measure"] == BOUND]
                if not d.empty:
                    v = float(d["mean"].mean())
                    ax.plot([epochs[0], epochs[-1]], [v, v], color=cond_colors[c] if multi else "0.25", ls="-.", lw=1.1)
            handles.append(style.line(color="0.25", ls="-.", label=LABELS[BOUND]))
        if multi:
            handles += [style.line(color=cond_colors[c], lw=3, label=c) for c in sums]
        if any(n > 1 for n in n_seeds.values()):
            k = max(n_seeds.values())
            handles.append(style.patch(facecolor="0.5", alpha=0.25, label=f"±1 SE over {k} seeds"))
        if not bn.empty:
            handles.append(style.patch(facecolor="0.88", label="BN statistics re-estimated"))
        style.epoch_axis(ax, log_epochs, epochs)
        if ylim:
            ax.set_ylim(*ylim)
        elif ptitle.startswith("distance"):
            ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.set_title(ptitle, fontsize=10)
        ax.legend(handles=handles, fontsize=7, loc="best")
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    seeds = max(n_seeds.values())
    who = f" ({', '.join(sums)})" if multi else ""
    cap = ("Linearity of the network versus training epoch" + (" (symlog axis)" if log_epochs else "") + who +
           ": agreement with a linear classifier (and the share μ_Y/I(F;Y) of the network's label information it "
           "explains) and with the network linearized around initialization (θ₀) and around the previous checkpoint, "
           "stability of ReLU on/off patterns, relative distance to the linearized "
           "network, and the performance correlation μ_Y in bits (dash-dotted: its upper bound I(L;Y))" +
           (f"; bands are ±1 SE over {seeds} seeds." if seeds > 1 else "."))
    return style.save(fig, out_dir, name, cap)


def linearity_figures(tables, out_dir: str | Path, *, log_epochs: bool = True, prefix: str = "linearity",
                      title: str | None = None) -> list[style.Figure]:
    """All linearity figures for the report (currently the one multi-panel figure)."""
    return [linearity_figure(tables, out_dir, log_epochs=log_epochs, name=prefix, title=title)]


__all__ = ["linearity_figure", "linearity_figures", "PANELS", "LABELS"]
