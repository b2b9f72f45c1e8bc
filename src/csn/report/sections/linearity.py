"""The linearity section (C3): how linear the network is at each checkpoint (tables/linearity.parquet)."""

from __future__ import annotations

import numpy as np

from csn.analysis.linearity import summarize_linearity
from csn.report import fig_linearity as fl
from csn.report.page import (
    Page,
    Section,
    fmt,
    fmt_pm,
    section,
    table_item,
)


@section("linearity", order=50)
def linearity_section(rep: Page) -> Section | None:
    have = rep.runs_with("linearity", or_omit=("Linearity", "no linearity table: run `csn linearity RUN`."))
    if not have:
        return None
    sec = Section("linearity", "Linearity (C3)",
                  "How close the network is to a linear model at each checkpoint: agreement with a linear classifier "
                  "on the inputs, with the network linearized around initialization, and ReLU on/off pattern "
                  "stability; claim C3: high early, falling as training goes on.")
    if len(have) == 1:
        cond, runs = have[0]
        arg = rep.table(runs[0], "linearity") if len(runs) == 1 else {r.name: rep.table(r, "linearity") for r in runs}
    else:
        arg = {c.name: {r.name: rep.table(r, "linearity") for r in rs} for c, rs in have}
    sec.items += rep.draw("the linearity figure", lambda: fl.linearity_figures(arg, rep.out_dir, prefix="linearity"))
    rows = []
    order = ["acc", "linear_agreement", "linearized_agreement_init", "linearized_rel_dist_init", "relu_same_as_init",
             "linearized_agreement_prev", "relu_same_as_prev", "mu_y_bits"]
    for cond, runs in have:
        try:
            s = summarize_linearity({r.name: rep.table(r, "linearity") for r in runs})
        except Exception:
            continue
        for m in [m for m in order if m in set(s["measure"])]:
            d = s[s["measure"] == m].sort_values("step")
            v = d["mean"].to_numpy(float)
            ok = np.isfinite(v)
            if not ok.any():
                continue
            first = d[ok].iloc[0]
            last = d.iloc[-1]
            hi = d[ok].iloc[int(np.nanargmax(v[ok]))]
            rows.append([cond.name, m, f"{fmt(first['mean'])} (epoch {first['epoch']:.3g})",
                         f"{fmt(hi['mean'])} (epoch {hi['epoch']:.3g})", fmt_pm(last["mean"], last["se"]),
                         int(d["n_runs"].max())])
    if rows:
        sec.items.append(table_item(["condition", "measure", "first defined", "max", "last (± SE over seeds)", "seeds"], rows,
                                "Linearity measures at the first checkpoint where they are defined, at their maximum, and "
                                "at the last checkpoint (mean over seeds).", numeric=(5,)))
    return sec
