"""The mechanism study's figure: CSI, eta², linear-probe accuracy and the Fisher-information trace of the regularized
stages vs step, one line per condition (mean over seeds, ±1 SE band), each condition's window (a rewind's step)
marked. Frames in (csn.experiments.mechanism.curves and the per-condition table), figure out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from csn.report import style

LABELS = {"csi": "mean CSI", "eta2": "mean eta²", "probe_acc": "probe test accuracy", "fisher_trace": "Fisher trace (sum)"}


def mechanism_figure(curves: pd.DataFrame, table: pd.DataFrame, out_dir: str | Path,
                     name: str = "mechanism_curves") -> style.Figure:
    """Four panels (CSI, eta², probe accuracy, Fisher trace) vs step (symlog), one line per condition."""
    fig, axes = style.new(ncols=2, nrows=2, width=5.2, height=3.4)
    panels = [ax for row in axes for ax in row]
    spans = {r["condition"]: r for r in table.to_dict("records")} if table is not None else {}
    order = list(dict.fromkeys(curves["condition"]))
    for ax, q in zip(panels, LABELS):
        d = curves[curves["quantity"] == q]
        steps = [float(s) for s in d["step"] if s > 0]
        for i, cond in enumerate(order):
            c = d[d["condition"] == cond].sort_values("step")
            if c.empty:
                continue
            color = style.COND_COLORS[i % len(style.COND_COLORS)]
            x, y, se = c["step"].to_numpy(float), c["mean"].to_numpy(float), c["se"].fillna(0).to_numpy(float)
            ax.plot(x, y, color=color, marker=".", lw=1.2, ls="--" if cond == "baseline" else "-", label=cond)
            ax.fill_between(x, y - se, y + se, color=color, alpha=0.12, lw=0)
            r = spans.get(cond)
            if r is not None and r.get("kind") == "rewind":
                ax.axvline(r["end_step"], color=color, lw=0.8, alpha=0.6)
            elif r is not None and r.get("kind") in ("suppress", "promote"):
                ax.axvspan(r["start_step"], r["end_step"], color=color, alpha=0.06, lw=0)
        if steps:
            ax.set_xscale("symlog", linthresh=min(steps))
        ax.set_xlabel("step (symlog)")
        ax.set_ylabel(LABELS[q])
        if q == "fisher_trace" and len(d) and (d["mean"] > 0).all():
            ax.set_yscale("log")
    panels[0].legend(fontsize=7)
    return style.save(fig, out_dir, name, "The regularized stages over training, per condition (mean over seeds, band "
                      "±1 SE): mean CSI and eta² (live units), the linear probe's test accuracy (mean over the stages) "
                      "and the Fisher-information trace of their weights (sum over the stages); shaded: a suppression "
                      "window, vertical line: a rewind's step. Suppression that removed class information lowers the "
                      "probe; one that spread it over units lowers CSI with the probe intact.")


__all__ = ["mechanism_figure"]
