"""The training section: test accuracy and training loss per condition (drawn here), final accuracies."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd

from csn.core.stats import band, standard_error
from csn.report import style
from csn.report.page import (
    Page,
    RunGroup,
    Section,
    fmt,
    fmt_g,
    fmt_pm,
    join_values,
    mean_of,
    section,
    table_item,
)
from csn.runs.run import Run


def _acc_series(run: Run) -> pd.Series:
    ck = run.checkpoints
    return pd.Series([c.metrics.get("test_acc") for c in ck], index=[round(c.epoch, 6) for c in ck], dtype=float)


def _loss_series(run: Run, tr: pd.DataFrame | None) -> pd.Series:
    if tr is not None and {"epoch", "train_loss"} <= set(tr.columns):
        d = tr.dropna(subset=["train_loss"])
        return pd.Series(d["train_loss"].to_numpy(float), index=d["epoch"].round(6).to_numpy(float)).groupby(level=0).mean()
    ck = [c for c in run.checkpoints if "train_loss" in c.metrics]
    return pd.Series([c.metrics["train_loss"] for c in ck], index=[round(c.epoch, 6) for c in ck], dtype=float)


def training_figure(rep_conds: list[RunGroup], out_dir: str | Path, *, tables: Callable[[Run], pd.DataFrame | None],
                    name: str = "training", log_epochs: bool = True):
    """Test accuracy (checkpoints) and training loss (logged) vs epoch, one colour per condition, ±1 SE over seeds."""
    fig, axes = style.new(ncols=2)
    ax_acc, ax_loss = axes[0]
    all_epochs: list[float] = []
    multi_seed = False
    subset = False
    for i, cond in enumerate(rep_conds):
        color = style.COND_COLORS[i % len(style.COND_COLORS)]
        label = cond.name + (f" ({len(cond.runs)} seeds)" if len(cond.runs) > 1 else "")
        multi_seed |= len(cond.runs) > 1
        for run in cond.runs:
            ns = [c.metrics.get("test_samples") for c in run.checkpoints if c.metrics.get("test_samples")]
            subset |= len(set(ns)) > 1
        for ax, b in ((ax_acc, band([_acc_series(r) for r in cond.runs])),
                      (ax_loss, band([_loss_series(r, tables(r)) for r in cond.runs]))):
            if b is None:
                continue
            x = b.index.to_numpy(dtype=float)
            all_epochs.extend(x.tolist())
            ax.plot(x, b["mean"], color=color, lw=1.5, marker="o" if ax is ax_acc else None, ms=3, label=label)
            if len(cond.runs) > 1:
                se = b["se"].fillna(0).to_numpy(float)
                ax.fill_between(x, b["mean"] - se, b["mean"] + se, color=color, alpha=0.18, lw=0)
    for ax, ylabel, title in ((ax_acc, "test accuracy (top-1)", "Test accuracy at checkpoints"),
                              (ax_loss, "training loss (running mean)", "Training loss")):
        style.epoch_axis(ax, log_epochs, sorted(set(all_epochs)))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    handles, _ = ax_acc.get_legend_handles_labels()
    if multi_seed:
        handles.append(style.patch(facecolor="0.5", alpha=0.25, label="±1 SE over seeds"))
    if handles:
        ax_acc.legend(handles=handles, fontsize=8, loc="best")
    cap = ("Test accuracy at every checkpoint and the training loss as logged, versus epoch"
           f"{' (symlog axis, so initialization and the first steps stay visible)' if log_epochs else ''}"
           f"{'; one colour per condition, bands ±1 SE over seeds' if multi_seed else ''}"
           f"{'; intermediate checkpoints are scored on a fixed subset of the test split, the last on all of it' if subset else ''}.")
    return style.save(fig, out_dir, name, cap)


@section("training", order=20)
def training_section(rep: Page) -> Section:
    sec = Section("training", "Training", "How each condition trained: accuracy and loss across the dense early checkpoints.")
    sec.items += rep.draw("the training curves", lambda: training_figure(rep.conds, rep.out_dir,
                                                                       tables=lambda r: rep.table(r, "training")))
    rows = []
    for c in rep.conds:
        finals = [r.checkpoints[-1] if r.checkpoints else None for r in c.runs]
        acc = [f.metrics.get("test_acc") if f else None for f in finals]
        best = [max((k.metrics.get("test_acc", float("nan")) for k in r.checkpoints), default=float("nan")) for r in c.runs]
        ep = join_values(fmt_g(f.epoch) if f else None for f in finals)
        loss = []
        for r in c.runs:
            s = _loss_series(r, rep.table(r, "training"))
            loss.append(float(s.iloc[-1]) if len(s) else None)
        rows.append([c.name, len(c.runs), ep, fmt_pm(mean_of(acc), standard_error(acc), 4), join_values(fmt(a, 4) for a in acc),
                     fmt(mean_of(best), 4), fmt(mean_of(loss), 4), join_values(len(r.checkpoints) for r in c.runs)])
    sec.items.append(table_item(["condition", "seeds", "final epoch", "final test acc (mean ± SE)", "per seed",
                             "best test acc (mean)", "final train loss", "checkpoints"], rows,
                            "Final test accuracy per condition (the last checkpoint is scored on the whole test split).",
                            numeric=(1, 3, 5, 6)))
    return sec
