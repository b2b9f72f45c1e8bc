"""The regime section (csn experiment regime): "which regularizer, which regime"."""

from __future__ import annotations

import pandas as pd

from csn.errors import CsnError
from csn.experiments.claims import THRESHOLDS
from csn.experiments.regime import read_regime
from csn.report.fig_regime import regime_figure
from csn.report.page import (
    Page,
    Section,
    fmt,
    fmt_g,
    fmt_pm,
    found_section,
    is_number,
    nearby,
    note_item,
    section,
    table_item,
)


@section("which regularizer", order=80)
def regime_section(rep: Page) -> Section | None:
    """"Which regularizer, which regime": C4 per dataset x regularizer for a regime study (its cell table, figure and
    conditions); for another experiment, links to the regime studies found in it or beside it."""
    exp = rep.experiment
    title = "Which regularizer, which regime"
    lead = ("Claim C4 per dataset (10 vs 100 classes) and regularizer statistic (csn's class means over the global "
            "batch; the study's class sums per group of 32 images): suppression from step 0 and from a late onset "
            "against the baseline of the same seed, final test accuracy after BatchNorm re-estimation, 95 % t intervals "
            "over seeds (rule set 2, claims.c4_parts); the dose and the CSI / η² / per-image sparsity reductions beside.")
    pts = lambda r, k: (f"{100 * r[k + 'mean_of']:+.2f} [{100 * r[k + '_lo']:+.2f}, {100 * r[k + '_hi']:+.2f}]"  # noqa: E731
                        if is_number(r.get(k + "mean_of")) else "–")
    pct = lambda x: f"{-100 * x:+.0f} %" if is_number(x) else "–"  # noqa: E731

    def cells(t: pd.DataFrame) -> dict:
        rows = [[r["dataset"], r["regularizer"], fmt_g(r["alpha"]), r["n_seeds"], pts(r, "early_harm"), pts(r, "contrast"),
                 pts(r, "late_harm"), f"{r['verdict']} ({r['early_verdict']} / {r['late_verdict']})",
                 f"{fmt_g(r['from0_reg_steps'])}, {fmt(r['from0_reg_mean_lr'], 3)} | {fmt_g(r['late_reg_steps'])}, "
                 f"{fmt(r['late_reg_mean_lr'], 3)}",
                 " / ".join(pct(r.get(f"from0_{m}_reduction")) for m in ("csi", "eta2", "sparsity"))
                 + f" / {pct(r.get('own_reduction_from0'))}"] for r in t.to_dict("records")]
        return table_item(["dataset", "regularizer", "α", "seeds", "early harm, points [95 % CI]", "late − early [CI]",
                       "late harm [CI]", "C4 (early / late costs little)", "dose from 0 | late (steps, mean lr)",
                       "CSI / η² / sparsity / own statistic, from 0 vs baseline"], rows,
                      "Per cell: harm = baseline − condition final test accuracy of the same seed (points); the verdict "
                      "by rule set 2's C4 rule; reductions of the regularized stages' measures at the end of training.",
                      numeric=(2, 3, 4, 5, 6))

    if exp is not None and (exp / "regime.parquet").is_file():
        sec = Section("regime", title, lead)
        try:
            m = read_regime(exp)
        except CsnError as e:
            sec.items.append(note_item(f"the regime study's tables cannot be shown: {e}"))
            return sec
        table, conds, info = m["regime"], m["regime_conditions"], m["info"]
        sec.items.append(cells(table))
        sec.items += rep.draw("the regime figure", lambda: regime_figure(
            table, rep.out_dir, min_harm=THRESHOLDS["c4_min_harm"], little=THRESHOLDS["c4_little"]))
        sec.items.append(table_item(["condition", "seeds", "final test acc", "per seed"],
                                [[r["condition"], r["seeds"], fmt_pm(r["final_test_acc_mean"], r["final_test_acc_se"], 4),
                                  r.get("final_test_acc_per_seed", "")] for r in conds.to_dict("records")],
                                "Per condition, mean ± SE over seeds: test accuracy (whole split) at the end of "
                                "training, BatchNorm statistics re-estimated.", numeric=(1, 2)))
        if info.get("c4_rule"):
            sec.items.append(note_item(f"Rule (rule set {info.get('rules_version', '?')}, declared "
                                   f"{info.get('rules_declared', '?')}): {info['c4_rule']}."))
        return sec
    near = nearby(exp, "regime.parquet")
    if not near:
        rep.omit(title, "no regime study: run `csn experiment regime` (or `--preset smoke` for a first look).")
        return None
    return found_section(rep, "regime", title, lead + " Regime studies found with this experiment:", near, "study",
                          lambda d: [cells(read_regime(d)["regime"])])
