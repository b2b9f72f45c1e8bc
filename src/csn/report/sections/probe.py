"""The class-information section: a linear probe per stage across training (tables/probe.parquet), beside CSI.

No probe table, no section (and no omission note: the probe is an optional, mechanism-level analysis that the
study's claims do not need)."""

from __future__ import annotations

import numpy as np

from csn.report import fig_probe as fp
from csn.report.page import Page, Section, fmt, fmt_pm, fold, section, table_item


@section("probe", order=35)
def probe_section(rep: Page) -> Section | None:
    have = rep.runs_with("probe")
    if not have:
        return None
    sec = Section("probe", "Class information per stage (linear probe)",
                  "Accuracy of an L2-penalized softmax regression on all units of each stage (standardized, fit on a "
                  "fixed subset of the training split, scored on the evaluation split) versus epoch. Beside CSI it "
                  "separates suppression that removes class information (probe accuracy falls) from suppression that "
                  "spreads it over units (CSI falls, probe accuracy stays).")
    rows = []
    for cond, runs in have:
        tables = {r.name: rep.table(r, "probe") for r in runs}
        k = runs[0].info.get("data", {}).get("num_classes")
        title = cond.name if rep.multi or len(have) > 1 else None
        figs = rep.draw(f"the probe figure of {cond.name}",
                        lambda: fp.probe_curves(tables, rep.out_dir, name=rep.prefix(cond, "probe"), title=title,
                                                num_classes=int(k) if k else None))
        sec.items += fold(figs, f"probe figures of {cond.name}", len(figs) if cond is have[0][0] else 0)
        try:
            s = fp.summarize_probe(tables)
        except Exception:
            continue
        for stage, d in s.groupby("stage", sort=False):
            d = d.sort_values("step")
            best = d.iloc[int(np.nanargmax(d["acc_mean"].to_numpy(float)))]
            last = d.iloc[-1]
            rows.append([cond.name, stage, int(last["n_features"]), fmt(d["acc_mean"].iloc[0]),
                         f"{fmt(best['acc_mean'])} (epoch {best['epoch']:.3g})", fmt_pm(last["acc_mean"], last["acc_se"]),
                         fmt(last["loss_mean"]), int(d["n_runs"].max())])
    if rows:
        sec.items.append(table_item(["condition", "stage", "units", "probe acc first", "max", "last (± SE over seeds)",
                                     "last cross-entropy", "seeds"], rows,
                                    "Probe accuracy per stage at the first checkpoint, at its maximum and at the last "
                                    "(mean over seeds at shared checkpoints).", numeric=(2, 3, 6, 7)))
    return sec
