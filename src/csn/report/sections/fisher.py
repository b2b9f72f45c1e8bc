"""The Fisher-information section: the trace of each stage's Fisher information across training (tables/fisher.parquet).

No fisher table, no section (and no omission note: like the probe, a mechanism-level analysis the study's claims do
not need)."""

from __future__ import annotations

import numpy as np

from csn.core.stats import standard_error
from csn.report import fig_fisher as ff
from csn.report.page import Page, Section, fmt, fmt_pm, fold, section, table_item


@section("fisher", order=36)
def fisher_section(rep: Page) -> Section | None:
    have = rep.runs_with("fisher")
    if not have:
        return None
    sec = Section("fisher", "Fisher information per stage",
                  "Trace of the Fisher information of each stage's weights versus step (after Achille, Rovere & "
                  "Soatto 2019): how much the output distribution depends on them. Its early peak is the critical "
                  "period's signature; does it come with the selectivity peak?")
    rows = []
    for cond, runs in have:
        tables = {r.name: rep.table(r, "fisher") for r in runs}
        figs = [item for name, t in tables.items() for item in rep.draw(
            f"the Fisher figure of {name}", lambda t=t, name=name: [ff.fisher_figure(
                t, rep.out_dir, name=f"{rep.prefix(cond, 'fisher')}-{name}", title=name)])]
        sec.items += fold(figs, f"Fisher figures of {cond.name}", 1 if cond is have[0][0] else 0)  # the first run's
        peaks: dict[str, list[tuple[int, float, float]]] = {}
        for t in tables.values():
            for stage, d in t[t["n_params"] > 0].groupby("stage", sort=False):
                d = d.sort_values("step")
                top = d.iloc[int(np.nanargmax(d["trace"].to_numpy(float)))]
                peaks.setdefault(stage, []).append((int(top["step"]), float(top["trace"]), float(d["trace"].iloc[-1])))
        for stage, p in peaks.items():
            steps, top, last = zip(*p)
            rows.append([cond.name, stage, ", ".join(map(str, steps)), fmt_pm(np.mean(top), standard_error(top)),
                         fmt_pm(np.mean(last), standard_error(last)), fmt(np.mean(last) / np.mean(top)), len(p)])
    if rows:
        sec.items.append(table_item(["condition", "stage", "peak step per run", "trace at the peak (± SE over runs)",
                                     "trace at the last checkpoint", "last / peak", "runs"], rows,
                                    "Per stage: where its Fisher trace peaks in each run, the trace there and at the "
                                    "last checkpoint.", numeric=(3, 4, 5, 6)))
    return sec
