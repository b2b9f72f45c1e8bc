"""Figures of the regularization experiment: accuracy, mean CSI and eta^2 vs epoch per condition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from csn.report import style

COND_COLORS = ["#222222", "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]


def _curves(runs_by_cond: dict, value) -> dict[str, pd.DataFrame]:
    """Per condition, a frame epoch -> mean, se over runs of value(run) (a Series indexed by epoch)."""
    out = {}
    for name, runs in runs_by_cond.items():
        series = [value(r) for r in runs]
        series = [s for s in series if s is not None and len(s)]
        if not series:
            continue
        df = pd.concat(series, axis=1)
        n = df.notna().sum(axis=1)
        out[name] = pd.DataFrame({"mean": df.mean(axis=1), "se": df.std(axis=1, ddof=1) / np.sqrt(n.clip(lower=1)), "n": n})
    return out


def _acc(run) -> pd.Series:
    ck = run.checkpoints
    return pd.Series([c.metrics.get("test_acc") for c in ck], index=[c.epoch for c in ck], dtype=float)


def _sel(col: str, stages: list[str] | None):
    def f(run):
        sel = run.read("selectivity")
        if sel is None or sel.empty:
            return None
        part = sel[sel["stage"].isin(stages)] if stages else sel
        return part.groupby("epoch")[col].mean()
    return f


def _plot(ax, curves: dict, onsets: dict, ylabel: str, log: bool) -> None:
    epochs = []
    for i, (name, c) in enumerate(curves.items()):
        color = COND_COLORS[i % len(COND_COLORS)]
        x = c.index.to_numpy(dtype=float)
        epochs.extend(x)
        ax.plot(x, c["mean"], color=color, label=f"{name} (n={int(c['n'].max())})", marker=".", ms=3)
        ax.fill_between(x, c["mean"] - c["se"].fillna(0), c["mean"] + c["se"].fillna(0), color=color, alpha=0.2)
        onset = onsets.get(name)
        if onset is not None:
            ax.axvline(onset, color=color, ls="--", lw=1)
    ax.set_ylabel(ylabel)
    style.epoch_axis(ax, log, epochs)


def regularize_figures(runs_by_cond: dict, onsets: dict, out_dir: str | Path, *, stages: list[str] | None = None,
                       log: bool = True) -> list[style.Figure]:
    """Accuracy vs epoch, and mean CSI | mean eta^2 of the regularized stages vs epoch, per condition."""
    if stages is None:
        from csn.experiments.regularize import regularized_stages

        any_run = next(r for rs in runs_by_cond.values() for r in rs)
        stages = regularized_stages(any_run)
    figs = []
    fig, axes = style.new()
    _plot(axes[0, 0], _curves(runs_by_cond, _acc), onsets, "test accuracy", log)
    axes[0, 0].set_title("Test accuracy per condition (dashed: regularizer onset)")
    axes[0, 0].legend(fontsize=8)
    figs.append(style.save(fig, out_dir, "regularize_accuracy",
                           "Test accuracy vs epoch for the unregularized baseline and each regularizer onset (mean ± SE over seeds; dashed lines mark onsets)."))
    fig, axes = style.new(2)
    _plot(axes[0, 0], _curves(runs_by_cond, _sel("csi", stages)), onsets, f"mean CSI ({', '.join(stages)})", log)
    axes[0, 0].set_title("Class selectivity (CSI)")
    _plot(axes[0, 1], _curves(runs_by_cond, _sel("eta2", stages)), onsets, f"mean eta² ({', '.join(stages)})", log)
    axes[0, 1].set_title("Class information (eta², offset-invariant)")
    axes[0, 0].legend(fontsize=8)
    figs.append(style.save(fig, out_dir, "regularize_selectivity",
                           "Mean CSI and mean eta² of the regularized stages vs epoch per condition: CSI falling while eta² holds means selectivity was hidden by an offset, not removed."))
    return figs
