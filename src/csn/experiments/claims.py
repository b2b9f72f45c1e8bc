"""The study's claims C1-C4 as statistics over csn's tables, with verdicts by declared rules.

Every threshold lives in THRESHOLDS below, is printed in the report and written to claims.json, and
was fixed before looking at results. A claim gets "reproduced", "not reproduced" or "inconclusive";
csn reports what it saw, it does not advocate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from csn.core.stats import standard_error

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

THRESHOLDS: dict[str, float] = {
    # C1: the peak of a stage's mean CSI must come in the first EARLY_FRACTION of training ...
    "c1_early_fraction": 0.25,
    # ... the final value must have given back at least this share of the rise from init to peak ...
    "c1_min_recede_share": 0.20,
    # ... and stay above the initialization value by at least this much (CSI units).
    "c1_min_final_above_init": 0.005,
    # A stage shows C1 when at least this share of seeds does.
    "seed_majority": 0.5,
    # C2: at the early checkpoint, area(selective) - area(random) must be below -C2_MIN_GAP ...
    "c2_min_gap": 0.02,
    # ... and at least this much more negative than at the last checkpoint (the gap shrinks).
    "c2_min_shrink": 0.02,
    # C3: a linearity measure 'falls' if its early value exceeds its last value by at least this much.
    "c3_min_drop": 0.05,
    # C4: regularizing from step 0 must cost at least this much final test accuracy (absolute) ...
    "c4_min_harm": 0.005,
    # ... more than this many standard errors of the difference ...
    "c4_min_harm_se": 2.0,
    # ... and the late onset must cost at most this share of the early onset's cost.
    "c4_max_late_share": 0.5,
    # C4 needs the regularizer to have lowered the regularized stages' final mean CSI by this share.
    "c4_min_csi_reduction": 0.2,
}

C3_MEASURES = ("linearized_agreement_init", "relu_same_as_init", "mu_y_share")
"""mu_y_share = mu_Y / I(F;Y): the share of what the network knows about Y that a linear model explains
(Kalimeris et al. 2019). linear_agreement is not used: it rises with accuracy whatever the regime."""


@dataclass
class Verdict:
    """One claim's outcome: statistic values, the rule, the verdict and a sentence of what was seen."""

    claim: str
    verdict: str
    statistic: str
    rule: str
    observed: str
    values: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(x: float, nd: int = 3) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _majority(flags) -> str:
    """Reproduced if most parts (stages or measures) show the effect, not reproduced if none does."""
    flags = list(flags)
    n = sum(flags)
    return REPRODUCED if n > len(flags) / 2 else NOT_REPRODUCED if n == 0 else INCONCLUSIVE


def _stage_curves(sel: pd.DataFrame) -> pd.DataFrame:
    """Mean CSI per (run, step, epoch, stage)."""
    return sel.groupby(["run", "step", "epoch", "stage"], as_index=False)["csi"].mean()


def claim_c1(sel: pd.DataFrame, total_epochs: float) -> Verdict:
    """C1 from selectivity tables of the baseline runs (column `run` identifies the seed)."""
    t = THRESHOLDS
    rule = (f"per stage and seed: peak epoch <= {t['c1_early_fraction']:.0%} of training, final gives back >= "
            f"{t['c1_min_recede_share']:.0%} of the rise, final >= init + {t['c1_min_final_above_init']}; a stage shows it "
            f"when > {t['seed_majority']:.0%} of seeds do; reproduced if most stages show it, not reproduced if none does")
    stat = "mean CSI per stage: init, peak (epoch), final; share of the rise given back"
    if sel is None or sel.empty:
        return Verdict("C1", INCONCLUSIVE, stat, rule, "no selectivity table was found.")
    curves = _stage_curves(sel)
    per_stage, parts = {}, []
    for stage, g in curves.groupby("stage", sort=False):
        oks, rows = [], []
        for _run, r in g.groupby("run"):
            r = r.sort_values("step")
            init, final = float(r["csi"].iloc[0]), float(r["csi"].iloc[-1])
            ipk = int(r["csi"].to_numpy().argmax())
            peak, pe = float(r["csi"].iloc[ipk]), float(r["epoch"].iloc[ipk])
            rise = peak - init
            share = (peak - final) / rise if rise > 1e-9 else 0.0
            ok = (pe <= t["c1_early_fraction"] * total_epochs and share >= t["c1_min_recede_share"]
                  and final >= init + t["c1_min_final_above_init"])
            oks.append(ok)
            rows.append(dict(init=init, peak=peak, peak_epoch=pe, final=final, recede_share=share, ok=ok))
        df = pd.DataFrame(rows)
        shows = float(np.mean(oks)) > t["seed_majority"]
        per_stage[stage] = dict(shows=bool(shows), seeds=len(rows), init=float(df["init"].mean()),
                                peak=float(df["peak"].mean()), peak_se=standard_error(df["peak"]),
                                peak_epoch=float(df["peak_epoch"].median()), final=float(df["final"].mean()),
                                final_se=standard_error(df["final"]), recede_share=float(df["recede_share"].mean()),
                                seeds_ok=int(sum(oks)))
        parts.append(f"{stage}: {_fmt(per_stage[stage]['init'])} -> peak {_fmt(per_stage[stage]['peak'])} "
                     f"(±{_fmt(per_stage[stage]['peak_se'])}) at epoch {per_stage[stage]['peak_epoch']:.3g} -> final "
                     f"{_fmt(per_stage[stage]['final'])} ({sum(oks)}/{len(oks)} seeds show it)")
    verdict = _majority(v["shows"] for v in per_stage.values())
    return Verdict("C1", verdict, stat, rule, "; ".join(parts) + ".", {"stages": per_stage})


def claim_c2(summary: pd.DataFrame, early_step_by_run: dict, late_step_by_run: dict) -> Verdict:
    """C2 from ablation summaries: columns run, step, stage, gap (selective area - mean random area), gap_se."""
    t = THRESHOLDS
    rule = (f"per stage, mean over seeds: gap(early) < -{t['c2_min_gap']} and gap(early) < gap(last) - {t['c2_min_shrink']}, "
            f"|gap(early)| > 2 SE over random draws and seeds; reproduced if most stages show it, not reproduced if none does")
    stat = "area under normalized top-1 vs fraction ablated: selective minus random (gap), early vs last checkpoint"
    if summary is None or summary.empty:
        return Verdict("C2", INCONCLUSIVE, stat, rule, "no ablation table was found.")
    per_stage, parts = {}, []
    for stage, g in summary.groupby("stage", sort=False):
        early = [float(g[(g["run"] == r) & (g["step"] == s)]["gap"].mean()) for r, s in early_step_by_run.items()]
        late = [float(g[(g["run"] == r) & (g["step"] == s)]["gap"].mean()) for r, s in late_step_by_run.items()]
        draw_se = [float(g[(g["run"] == r) & (g["step"] == s)]["gap_se"].mean()) for r, s in early_step_by_run.items()]
        e, l_ = float(np.nanmean(early)), float(np.nanmean(late))
        se = math.sqrt(np.nanmean(np.square(draw_se)) / max(len(early), 1) + (standard_error(early) ** 2 if len(early) > 1 else 0.0))
        shows = e < -t["c2_min_gap"] and e < l_ - t["c2_min_shrink"] and abs(e) > 2 * se
        per_stage[stage] = dict(shows=bool(shows), gap_early=e, gap_late=l_, gap_early_se=se, seeds=len(early))
        parts.append(f"{stage}: gap {_fmt(e)} (±{_fmt(se)}) early vs {_fmt(l_)} last")
    verdict = _majority(v["shows"] for v in per_stage.values())
    return Verdict("C2", verdict, stat, rule, "; ".join(parts) + " (negative: selective ablation hurts more).",
                   {"stages": per_stage})


def claim_c3(lin: pd.DataFrame, early_step_by_run: dict) -> Verdict:
    """C3 from linearity tables (columns run, step, measure, value): do linearity measures fall after the early phase?"""
    t = THRESHOLDS
    rule = (f"a measure falls when its early value exceeds its last value by >= {t['c3_min_drop']} (mean over seeds); "
            f"reproduced if most of {', '.join(C3_MEASURES)} fall, not reproduced if none does")
    stat = "linearity measures at the early checkpoint vs the last checkpoint"
    if lin is None or lin.empty:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "no linearity table was found.")
    vals, parts = {}, []
    for m in C3_MEASURES:
        d = lin[lin["measure"] == m]
        if d.empty:
            continue
        early, late = [], []
        for run, g in d.groupby("run"):
            g = g.sort_values("step")
            s = early_step_by_run.get(run)
            ge = g[g["step"] == s]
            if ge.empty:
                continue
            early.append(float(ge["value"].iloc[0]))
            late.append(float(g["value"].iloc[-1]))
        if not early:
            continue
        e, l_ = float(np.mean(early)), float(np.mean(late))
        vals[m] = dict(early=e, early_se=standard_error(early), late=l_, late_se=standard_error(late), falls=bool(e - l_ >= t["c3_min_drop"]))
        parts.append(f"{m}: {_fmt(e)} early -> {_fmt(l_)} last")
    if not vals:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "the linearity table holds none of the measures.")
    verdict = _majority(v["falls"] for v in vals.values())
    return Verdict("C3", verdict, stat, rule, "; ".join(parts) + ".", {"measures": vals})


def claim_c4(per_seed: pd.DataFrame, late_onset: float) -> Verdict:
    """C4 from the regularization experiment's per-seed table (condition, onset, seed, final_test_acc, final_csi)."""
    t = THRESHOLDS
    rule = (f"regularizing from 0 costs >= {t['c4_min_harm']} accuracy and > {t['c4_min_harm_se']:g} SE; the late onset "
            f"costs <= {t['c4_max_late_share']:.0%} of that; the regularizer must lower final CSI by >= "
            f"{t['c4_min_csi_reduction']:.0%}, else inconclusive")
    stat = "final test accuracy per condition (mean ± SE over seeds), and final mean CSI of regularized stages"
    if per_seed is None or per_seed.empty:
        return Verdict("C4", INCONCLUSIVE, stat, rule, "no regularization runs were found.")
    base = per_seed[per_seed["onset"].isna()]
    early = per_seed[per_seed["onset"] == 0]
    late = per_seed[per_seed["onset"] == late_onset]
    if base.empty or early.empty or late.empty:
        return Verdict("C4", INCONCLUSIVE, stat, rule, "a condition is missing (baseline, from 0, late onset).")
    acc = {k: float(d["final_test_acc"].mean()) for k, d in (("baseline", base), ("from0", early), ("late", late))}
    se = {k: standard_error(d["final_test_acc"]) for k, d in (("baseline", base), ("from0", early), ("late", late))}
    harm_early, harm_late = acc["baseline"] - acc["from0"], acc["baseline"] - acc["late"]
    se_diff = math.sqrt(np.nan_to_num(se["baseline"]) ** 2 + np.nan_to_num(se["from0"]) ** 2)
    csi = {k: float(d["final_csi"].mean()) if "final_csi" in d else float("nan") for k, d in (("baseline", base), ("from0", early), ("late", late))}
    eta = {k: float(d["final_eta2"].mean()) if "final_eta2" in d else float("nan") for k, d in (("baseline", base), ("from0", early), ("late", late))}
    values = dict(acc=acc, acc_se=se, harm_early=harm_early, harm_late=harm_late, se_diff=se_diff, final_csi=csi, final_eta2=eta,
                  seeds={"baseline": len(base), "from0": len(early), "late": len(late)})
    observed = (f"final accuracy baseline {_fmt(acc['baseline'], 4)} (±{_fmt(se['baseline'], 4)}), regularized from 0 "
                f"{_fmt(acc['from0'], 4)} (±{_fmt(se['from0'], 4)}), from epoch {late_onset:g} {_fmt(acc['late'], 4)} "
                f"(±{_fmt(se['late'], 4)}); final CSI {_fmt(csi['baseline'])} / {_fmt(csi['from0'])} / {_fmt(csi['late'])}, "
                f"eta² {_fmt(eta['baseline'])} / {_fmt(eta['from0'])} / {_fmt(eta['late'])}")
    reduced = not math.isnan(csi["baseline"]) and csi["from0"] <= (1 - t["c4_min_csi_reduction"]) * csi["baseline"]
    if not reduced:
        return Verdict("C4", INCONCLUSIVE, stat, rule, observed + "; the regularizer did not lower selectivity enough to test the claim.", values)
    if min(len(base), len(early)) < 2:
        return Verdict("C4", INCONCLUSIVE, stat, rule, observed + "; fewer than 2 seeds per condition.", values)
    harmed = harm_early >= t["c4_min_harm"] and harm_early > t["c4_min_harm_se"] * se_diff
    late_cheap = harm_late <= t["c4_max_late_share"] * harm_early
    verdict = REPRODUCED if harmed and late_cheap else NOT_REPRODUCED
    return Verdict("C4", verdict, stat, rule, observed + ".", values)


def verdict_table(verdicts: list[Verdict]) -> str:
    """A plain-text table of verdicts (printed at the end of `csn reproduce`)."""
    lines = [f"{'claim':<6} {'verdict':<16} what was seen", f"{'-' * 6} {'-' * 16} {'-' * 40}"]
    for v in verdicts:
        lines.append(f"{v.claim:<6} {v.verdict:<16} {v.observed}")
    return "\n".join(lines)
