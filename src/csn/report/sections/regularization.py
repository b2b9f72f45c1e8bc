"""The regularization section (C4): regularization onsets (regularize.parquet, or the runs' tables)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence

from csn.core.stats import standard_error
from csn.errors import CsnError
from csn.experiments.regularize import condition_curves, recorded_condition, regularized_stages
from csn.report.fig_regularize import regularize_figures
from csn.report.page import (
    Page,
    RunGroup,
    Section,
    fmt,
    fmt_g,
    fmt_pm,
    is_number,
    join_values,
    mean_of,
    section,
    table_item,
)
from csn.runs.io import atomic_path, read_table


def _onset(cond: RunGroup) -> float | None:
    """The condition's onset in epochs as its first run's run.json records the regularizer (None: not regularized)."""
    return recorded_condition(cond.runs[0])[0]


def _is_regularized(cond: RunGroup) -> bool:
    return _onset(cond) is not None


@section("regularization", order=60)
def regularization_section(rep: Page) -> Section | None:
    reg_table = None
    if rep.experiment is not None and (rep.experiment / "regularize.parquet").is_file():
        reg_table = read_table(rep.experiment / "regularize.parquet")
    elif rep.experiment is not None and (rep.experiment / "windows.parquet").is_file():
        return None  # a critical-period map: its windows are shown in "How early is early"
    if not any(_is_regularized(c) for c in rep.conds) and reg_table is None:
        rep.omit("Regularization", "no regularized runs: run `csn experiment regularize --preset fmnist --alpha -2 "
                                   "--onsets 0,1` (or `csn reproduce`).")
        return None
    sec = Section("regularization", "Suppressing selectivity: regularization onsets (C4)",
                  "The selectivity regularizer (loss = cross-entropy − α·R, α < 0 suppresses) switched on at different "
                  "onsets, same seeds; claim C4: suppressing selectivity from the start harms the final accuracy, "
                  "switching it on later costs little.")
    by_cond = {c.name: c.runs for c in rep.conds}
    onsets = {c.name: _onset(c) for c in rep.conds}
    reg = next((c for c in rep.conds if _is_regularized(c)), rep.conds[0])
    try:
        stages = regularized_stages(reg.runs[0])
    except CsnError:  # a model without declared stages: every layer read
        stages = []
    figs = rep.draw("the regularization figures",
                    lambda: regularize_figures(condition_curves(by_cond, stages), onsets, rep.out_dir, stages=stages))
    if any(it["kind"] == "note" for it in figs) and rep.experiment is not None:
        figs += _existing_figures(rep, ["regularize_accuracy", "regularize_selectivity"])
    sec.items += figs
    if reg_table is not None and len(reg_table):
        rows = []
        for r in reg_table.to_dict("records"):
            rows.append([r.get("condition"), fmt_g(r.get("onset")) if is_number(r.get("onset")) else "–", fmt_g(r.get("alpha")),
                         r.get("seeds"), fmt_pm(r.get("final_test_acc_mean"), r.get("final_test_acc_se"), 4),
                         r.get("final_test_acc_per_seed", ""), fmt_pm(r.get("final_csi_mean"), r.get("final_csi_se")),
                         fmt_pm(r.get("final_eta2_mean"), r.get("final_eta2_se"))])
        sec.items.append(table_item(["condition", "onset (epoch)", "alpha", "seeds", "final test acc", "per seed",
                                 "final CSI (regularized stages)", "final η² (regularized stages)"], rows,
                                f"Per condition, mean ± SE over seeds, as written by the experiment "
                                f"({rep.experiment.name}/regularize.parquet).", numeric=(1, 2, 3, 4, 6, 7)))
    else:
        rows = []
        for c in rep.conds:
            acc = [r.checkpoints[-1].metrics.get("test_acc") for r in c.runs if r.checkpoints]
            csi, eta = [], []
            for r in c.runs:
                sel = rep.table(r, "selectivity")
                if sel is not None:
                    fin = sel[sel["step"] == sel["step"].max()]
                    part = fin[fin["stage"].isin(stages)] if stages else fin
                    csi.append(float(part["csi"].mean()))
                    eta.append(float(part["eta2"].mean()) if "eta2" in part else float("nan"))
            rows.append([c.name, fmt_g(onsets[c.name]) if onsets[c.name] is not None else "–",
                         fmt_g(c.runs[0].config.reg_alpha) if _is_regularized(c) else "0", len(c.runs),
                         fmt_pm(mean_of(acc), standard_error(acc), 4), join_values(fmt(a, 4) for a in acc), fmt_pm(mean_of(csi), standard_error(csi)),
                         fmt_pm(mean_of(eta), standard_error(eta))])
        stage_txt = ", ".join(stages) if stages else "all stages"
        sec.items.append(table_item(["condition", "onset (epoch)", "alpha", "seeds", "final test acc", "per seed",
                                 f"final CSI ({stage_txt})", f"final η² ({stage_txt})"], rows,
                                "Per condition, mean ± SE over seeds, from the runs' manifests and selectivity tables.",
                                numeric=(1, 2, 3, 4, 6, 7)))
    return sec


def _existing_figures(rep: Page, names: Sequence[str]) -> list[dict]:
    """Figures an experiment already drew into <experiment>/report, copied beside the page when it lives elsewhere."""
    items = []
    src_dir = rep.experiment / "report"
    for n in names:
        png = src_dir / f"{n}.png"
        if not png.is_file() or png.stat().st_size == 0:
            continue
        dst = rep.out_dir / png.name
        if dst.resolve() != png.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(png, tmp)
        items.append({"kind": "figure", "src": rep.rel(dst), "svg": None,
                      "caption": f"{n.replace('_', ' ')} as drawn by the experiment."})
    return items
