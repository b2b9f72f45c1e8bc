"""The representational-similarity section: CKA within runs and between conditions (tables/cka.parquet)."""

from __future__ import annotations

import pandas as pd

from csn.analysis.cka import summarize_cka_runs
from csn.report import fig_cka as fc
from csn.report.page import (
    Page,
    Section,
    details_item,
    file_slug,
    fmt_g,
    fmt_pm,
    heading_item,
    section,
    table_item,
)
from csn.runs.naming import parse_run_name


@section("cka", order=90)
def cka_section(rep: Page) -> Section | None:
    have = rep.runs_with("cka", or_omit=("Representational similarity (CKA)", "no CKA table: run `csn cka RUN` (or `csn cka RUN_A RUN_B`)."))
    if not have:
        return None
    sec = Section("cka", "Representational similarity (CKA)",
                  "Linear CKA (unbiased minibatch estimator) between layers, across checkpoints, and between runs at "
                  "matched checkpoints (the study compared regularized with unregularized networks).")
    cond_of_run = {r.name: c.name for c in rep.conds for r in c.runs}
    rows = []
    for cond, runs in have:
        # between runs: one figure per (this condition, other condition), mean over seed pairs
        pairs: dict[str, list[pd.DataFrame]] = {}
        for run in runs:
            df = rep.table(run, "cka")
            if "comparison" not in df.columns:
                continue
            d = df[df["comparison"] == "runs"]
            for rb, g in d.groupby("run_b", sort=False):
                other = cond_of_run.get(str(rb), parse_run_name(str(rb).split("/")[-1])[0])
                pairs.setdefault(other, []).append(g)
        within = [r for r in runs if "comparison" in rep.table(r, "cka").columns
                  and (rep.table(r, "cka")["comparison"] != "runs").any()]
        if (rep.multi or len(have) > 1) and (pairs or within):
            sec.items.append(heading_item(cond.name))
        for other, tables in pairs.items():
            sec.items += rep.draw(f"CKA {cond.name} vs {other}",
                                  lambda: fc.cka_runs_vs_epoch(tables, rep.out_dir, name=f"cka_runs_{cond.slug}_vs_{file_slug(other)}",
                                                               label_a=cond.name, label_b=other))
            try:
                s = summarize_cka_runs(tables)
                last = s[s["step_a"] == s["step_a"].max()]
                for r in last.itertuples():
                    rows.append([f"{cond.name} vs {other}", r.layer, fmt_g(r.epoch_a), fmt_pm(r.mean, r.se), int(r.n_pairs)])
            except Exception:
                pass
        for i, run in enumerate(within):
            df = rep.table(run, "cka")
            df = df[df["comparison"] != "runs"]
            figs = rep.draw(f"CKA within {run.name}",
                            lambda: fc.cka_figures(df, rep.out_dir, prefix=f"cka_{file_slug(run.name)}",
                                                   title=run.name if (rep.multi or len(within) > 1) else None))
            sec.items += figs if i == 0 else [details_item(f"CKA figures of {run.name}", figs)]
    if rows:
        sec.items.append(table_item(["runs compared", "layer", "epoch", "CKA (mean ± SE over seed pairs)", "pairs"], rows,
                                "Same-layer CKA between conditions at the last matched checkpoint.", numeric=(2, 3, 4)))
    return sec
