"""Figures of the regularization experiment: accuracy, mean CSI and eta^2 vs epoch per condition.

Frames in, figures out: the curves (mean and SE over seeds per condition) come from
csn.experiments.regularize.condition_curves.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from csn.report import style


def _plot(ax, curves: dict[str, pd.DataFrame], onsets: dict, ylabel: str, log: bool) -> None:
    epochs = []
    for i, (name, c) in enumerate(curves.items()):
        color = style.COND_COLORS[i % len(style.COND_COLORS)]
        x = c.index.to_numpy(dtype=float)
        epochs.extend(x)
        ax.plot(x, c["mean"], color=color, label=f"{name} (n={int(c['n'].max())})", marker=".", ms=3)
        ax.fill_between(x, c["mean"] - c["se"].fillna(0), c["mean"] + c["se"].fillna(0), color=color, alpha=0.2)
        onset = onsets.get(name)
        if onset is not None:
            ax.axvline(onset, color=color, ls="--", lw=1)
    ax.set_ylabel(ylabel)
    style.epoch_axis(ax, log, epochs)


def regularize_figures(curves: dict[str, dict[str, pd.DataFrame]], onsets: dict, out_dir: str | Path, *,
                       stages: list[str], log: bool = True) -> list[style.Figure]:
    """Accuracy vs epoch, and mean CSI | mean eta^2 of the regularized stages vs epoch, per condition.

    curves: {"test_acc" | "csi" | "eta2": {condition: DataFrame(mean, se, n) indexed by epoch}}.
    """
    figs = []
    fig, axes = style.new()
    _plot(axes[0, 0], curves["test_acc"], onsets, "test accuracy", log)
    axes[0, 0].set_title("Test accuracy per condition (dashed: regularizer onset)")
    axes[0, 0].legend(fontsize=8)
    figs.append(style.save(fig, out_dir, "regularize_accuracy",
                           "Test accuracy vs epoch for the unregularized baseline and each regularizer onset (mean ± SE "
                           "over seeds; dashed lines mark onsets)."))
    fig, axes = style.new(2)
    _plot(axes[0, 0], curves["csi"], onsets, f"mean CSI ({', '.join(stages)})", log)
    axes[0, 0].set_title("Class selectivity (CSI)")
    _plot(axes[0, 1], curves["eta2"], onsets, f"mean eta² ({', '.join(stages)})", log)
    axes[0, 1].set_title("Class information (eta², offset-invariant)")
    axes[0, 0].legend(fontsize=8)
    figs.append(style.save(fig, out_dir, "regularize_selectivity",
                           "Mean CSI and mean eta² of the regularized stages vs epoch per condition: CSI falling while "
                           "eta² holds means selectivity was hidden by an offset, not removed."))
    return figs


__all__ = ["regularize_figures"]
