"""The ablation section (C2): selective vs random units (tables/ablation.parquet)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from csn.analysis.ablation import summarize_ablation
from csn.core.stats import standard_error
from csn.report import fig_ablation as fa
from csn.report.page import (
    Page,
    Section,
    details_item,
    file_slug,
    fmt,
    fmt_g,
    fmt_pm,
    heading_item,
    mean_of,
    section,
    table_item,
)


@section("ablation", order=40)
def ablation_section(rep: Page) -> Section | None:
    have = rep.runs_with("ablation", or_omit=("Ablation", "no ablation table: run `csn ablate RUN`."))
    if not have:
        return None
    sec = Section("ablation", "Ablation: selective vs random units (C2)",
                  "Accuracy as the most class-selective units of every block of a stage are zeroed, against as many "
                  "random units (the control); claim C2: early in training the selective units matter more, later "
                  "the gap closes.")
    rows = []
    for cond, runs in have:
        if rep.multi or len(have) > 1:
            sec.items.append(heading_item(cond.name + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")))
        for i, run in enumerate(runs):
            df = rep.table(run, "ablation")
            pre = rep.prefix(cond, "ablation") + (f"_{file_slug(run.name)}" if len(runs) > 1 else "")
            title = run.name if (rep.multi or len(runs) > 1) else None
            figs = rep.draw(f"ablation curves of {run.name}",
                            lambda: fa.ablation_curves(df, rep.out_dir, name=f"{pre}_curves", title=title))
            figs += rep.draw(f"ablation areas of {run.name}",
                             lambda: fa.ablation_areas(df, rep.out_dir, name=f"{pre}_area", title=title))
            sec.items += figs if i == 0 else [details_item(f"figures of {run.name}", figs)]
        gaps = []
        for run in runs:
            try:
                g = summarize_ablation(rep.table(run, "ablation")).gaps
            except Exception:
                continue
            gaps.append(g.assign(_run=run.name))
        if not gaps:
            continue
        g = pd.concat(gaps, ignore_index=True)
        if "epoch" not in g.columns:
            g["epoch"] = np.nan
        for (stage, step), d in g.groupby(["stage", "step"], sort=False):
            n = d["_run"].nunique()
            se = standard_error(d["gap"]) if n > 1 else mean_of(d["gap_se"])
            rows.append([cond.name, stage, int(step), fmt_g(mean_of(d["epoch"])), fmt(mean_of(d["selective_area"])),
                         fmt(mean_of(d["random_area"])), fmt(mean_of(d["least_area"])), fmt_pm(mean_of(d["gap"]), se), n])
    if rows:
        cond_rank = {c.name: i for i, c in enumerate(rep.conds)}
        rows.sort(key=lambda r: (cond_rank.get(r[0], 0), str(r[1]), r[2]))
        sec.items.append(table_item(["condition", "stage", "step", "epoch", "selective area", "random area", "least area",
                                 "gap (selective − random)", "seeds"], rows,
                                "Area under normalized top-1 vs fraction ablated (mean over seeds); the gap's ± is the SE "
                                "over seeds, or over random draws for one seed. Negative: selective units matter more.",
                                numeric=(2, 3, 4, 5, 6, 7, 8)))
    return sec
