"""The class-selectivity section (C1): CSI and eta² per stage across training (tables/selectivity.parquet)."""

from __future__ import annotations

from csn.analysis.selectivity import stage_peaks, summarize, summarize_across_runs
from csn.report import fig_selectivity as fs
from csn.report.page import (
    Page,
    Section,
    details_item,
    fmt,
    heading_item,
    join_values,
    para_item,
    section,
    table_item,
)


@section("selectivity", order=30)
def selectivity_section(rep: Page) -> Section | None:
    have = rep.runs_with("selectivity", or_omit=("Class selectivity", "no selectivity table: run `csn selectivity RUN`."))
    if not have:
        return None
    sec = Section("selectivity", "Class selectivity (C1)",
                  "Mean class selectivity index (CSI) of each stage's units versus epoch, with the offset-invariant "
                  "class information η² beside it; the study's claim C1: selectivity rises in the first epochs, then "
                  "recedes, but not to its initial level.")
    rows = []
    for cond, runs in have:
        tables = {r.name: rep.table(r, "selectivity") for r in runs}
        if rep.multi or len(have) > 1:
            sec.items.append(heading_item(f"{cond.name}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")))
        first = runs[0]
        t0 = tables[first.name]
        meta = []
        for col in ("split", "variant"):
            if col in t0.columns:
                meta.append(f"{col} {join_values(t0[col].unique())}")
        n_units = int((t0["step"] == t0["step"].iloc[0]).sum())
        n_dead_last = int(t0[t0["step"] == t0["step"].max()]["dead"].astype(bool).sum()) if "dead" in t0 else 0
        sec.items.append(para_item(f"{n_units} units in {t0['stage'].nunique()} stages, {t0['step'].nunique()} checkpoints; "
                               f"{'; '.join(meta)}; {n_dead_last} dead units at the last checkpoint of {first.name}."))
        figs: list[dict] = []
        if len(runs) > 1:
            figs += rep.draw(f"selectivity across seeds of {cond.name}",
                             lambda: fs.seeds_figures(tables, rep.out_dir, prefix=rep.prefix(cond, "selectivity_seeds"),
                                                      title=f"{cond.name}: {len(runs)} seeds"))
            items = rep.draw(f"CSI distribution of {first.name}",
                             lambda: fs.csi_distribution(t0, rep.out_dir, name=rep.prefix(cond, "selectivity_distribution"),
                                                         title=first.name))
            for it in items:
                if it["kind"] == "figure":
                    it["caption"] += f" (run {first.name}.)"
            figs += items
            try:
                summ = summarize_across_runs(tables)
            except Exception:
                summ = summarize(t0)
        else:
            figs += rep.draw(f"selectivity of {first.name}",
                             lambda: fs.selectivity_figures(t0, rep.out_dir, prefix=rep.prefix(cond, "selectivity"),
                                                            title=first.name if rep.multi else None))
            summ = summarize(t0)
        # the first condition's figures open; the others' folded (their numbers are in the table below)
        sec.items += figs if cond is have[0][0] else [details_item(f"selectivity figures of {cond.name}", figs)]
        try:
            peaks = stage_peaks(summ)
            eta = stage_peaks(summ, "eta2").set_index("stage")
        except Exception:
            continue
        for p in peaks.itertuples():
            e = eta.loc[p.stage] if p.stage in eta.index else None
            rows.append([cond.name, p.stage, p.n_units, fmt(p.init), f"{fmt(p.peak)} (epoch {p.peak_epoch:.3g})",
                         fmt(p.final), fmt(e["init"]) if e is not None else "–", fmt(e["final"]) if e is not None else "–"])
    if rows:
        sec.items.append(table_item(["condition", "stage", "units", "CSI init", "CSI peak", "CSI final", "η² init", "η² final"],
                                rows, "Mean CSI per stage at initialization, at its peak and at the last checkpoint "
                                      "(mean over seeds at shared checkpoints where a condition has several).", numeric=(2, 3, 5, 6, 7)))
    return sec
