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
    # C3: a linearity measure 'falls' if its early value exceeds its last value by at least this much ...
    "c3_min_drop": 0.05,
    # ... and it is 'near linear' early if its early value (mean over seeds) is at least its level below
    # (added before any verdict was computed with it: "close to a linear regime" is a level, not only a trend;
    # agreement-type measures and the mu_Y share, SPEC "Linearity (C3)"). A measure shows C3 when both hold.
    "c3_min_level_linearized_agreement_init": 0.9,
    "c3_min_level_relu_same_as_init": 0.9,
    "c3_min_level_mu_y_share": 0.9,
    # C4: regularizing from step 0 must cost at least this much final test accuracy (absolute) ...
    "c4_min_harm": 0.005,
    # ... more than this many standard errors of the paired difference (the harm is the mean over seeds of the
    # per-seed difference baseline - condition, seeds shared by both; its SE is that of the differences) ...
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


def _nanmean(values) -> float:
    """Mean of the finite values; NaN (without numpy's warning) when there are none, e.g. a run without ablation rows."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else float("nan")


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
        e, l_ = _nanmean(early), _nanmean(late)
        se = math.sqrt(_nanmean(np.square(draw_se)) / max(len(early), 1) + (standard_error(early) ** 2 if len(early) > 1 else 0.0))
        shows = e < -t["c2_min_gap"] and e < l_ - t["c2_min_shrink"] and abs(e) > 2 * se
        per_stage[stage] = dict(shows=bool(shows), gap_early=e, gap_late=l_, gap_early_se=se, seeds=len(early))
        parts.append(f"{stage}: gap {_fmt(e)} (±{_fmt(se)}) early vs {_fmt(l_)} last")
    verdict = _majority(v["shows"] for v in per_stage.values())
    return Verdict("C2", verdict, stat, rule, "; ".join(parts) + " (negative: selective ablation hurts more).",
                   {"stages": per_stage})


def _c3_measure(d: pd.DataFrame, early_step_by_run: dict, level: float) -> dict | None:
    """One measure's early and last values over seeds, whether it is near linear early and whether it falls."""
    early, late = [], []
    for run, g in d.groupby("run"):
        g = g.sort_values("step")
        ge = g[g["step"] == early_step_by_run.get(run)]
        if ge.empty:
            continue
        early.append(float(ge["value"].iloc[0]))
        late.append(float(g["value"].iloc[-1]))
    if not early:
        return None
    e, l_ = float(np.mean(early)), float(np.mean(late))
    near, falls = e >= level, e - l_ >= THRESHOLDS["c3_min_drop"]
    return dict(early=e, early_se=standard_error(early), late=l_, late_se=standard_error(late), level=level,
                near_linear=bool(near), falls=bool(falls), shows=bool(near and falls), seeds=len(early))


def claim_c3(lin: pd.DataFrame, early_step_by_run: dict) -> Verdict:
    """C3 from linearity tables (columns run, step, measure, value): is each measure near linear at the early
    checkpoint (its declared level), and does it fall afterwards?"""
    t = THRESHOLDS
    levels = ", ".join(f"{m} >= {t['c3_min_level_' + m]:g}" for m in C3_MEASURES)
    rule = (f"per measure (means over seeds): near linear early ({levels}) and falling (early - last >= "
            f"{t['c3_min_drop']}); reproduced if most measures show both, not reproduced if none does")
    stat = "linearity measures at the early checkpoint (level) vs the last checkpoint (fall), per measure"
    if lin is None or lin.empty:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "no linearity table was found.")
    vals, parts = {}, []
    for m in C3_MEASURES:
        v = _c3_measure(lin[lin["measure"] == m], early_step_by_run, t["c3_min_level_" + m])
        if v is None:
            continue
        vals[m] = v
        parts.append(f"{m}: {_fmt(v['early'])} early ({'near linear' if v['near_linear'] else 'below'} "
                     f"{v['level']:g}) -> {_fmt(v['late'])} last ({'falls' if v['falls'] else 'does not fall'})")
    if not vals:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "the linearity table holds none of the measures.")
    verdict = _majority(v["shows"] for v in vals.values())
    return Verdict("C3", verdict, stat, rule, "; ".join(parts) + ".", {"measures": vals})


def _paired(per_seed: pd.DataFrame, cond: pd.DataFrame) -> dict:
    """Baseline - condition final accuracy over the seeds both have: mean, SE of the differences, the seeds."""
    base = per_seed[per_seed["onset"].isna()].set_index("seed")["final_test_acc"]
    other = cond.set_index("seed")["final_test_acc"]
    seeds = sorted(set(base.index) & set(other.index))
    diff = np.array([float(base[s]) - float(other[s]) for s in seeds], dtype=float)
    return dict(harm=float(diff.mean()) if len(diff) else math.nan, se=standard_error(diff) if len(diff) > 1 else math.nan,
                seeds=[int(s) for s in seeds], per_seed=[float(x) for x in diff])


def claim_c4(per_seed: pd.DataFrame, late_onset: float) -> Verdict:
    """C4 from the regularization experiment's per-seed table (condition, onset, seed, final_test_acc, final_csi),
    conditions paired by seed (same initialization and data order)."""
    t = THRESHOLDS
    rule = (f"paired by seed: regularizing from 0 costs >= {t['c4_min_harm']} accuracy (mean of per-seed differences) "
            f"and > {t['c4_min_harm_se']:g} SE of those differences; the late onset costs <= {t['c4_max_late_share']:.0%} "
            f"of that; the regularizer must lower final CSI by >= {t['c4_min_csi_reduction']:.0%}, else inconclusive")
    stat = "final test accuracy: baseline - condition per seed, mean ± SE over paired seeds; final mean CSI of regularized stages"
    if per_seed is None or per_seed.empty:
        return Verdict("C4", INCONCLUSIVE, stat, rule, "no regularization runs were found.")
    conds = {"baseline": per_seed[per_seed["onset"].isna()], "from0": per_seed[per_seed["onset"] == 0],
             "late": per_seed[per_seed["onset"] == late_onset]}
    if any(d.empty for d in conds.values()):
        return Verdict("C4", INCONCLUSIVE, stat, rule, "a condition is missing (baseline, from 0, late onset).")
    early, late = _paired(per_seed, conds["from0"]), _paired(per_seed, conds["late"])
    paired = [s for s in early["seeds"] if s in set(late["seeds"])]

    def mean(k: str, col: str, seeds: list[int]) -> float:
        d = conds[k][conds[k]["seed"].isin(seeds)]
        return float(d[col].mean()) if col in d and len(d) else math.nan

    acc = {k: float(d["final_test_acc"].mean()) for k, d in conds.items()}
    se = {k: standard_error(d["final_test_acc"]) for k, d in conds.items()}
    csi = {k: mean(k, "final_csi", early["seeds"]) for k in conds}
    eta = {k: mean(k, "final_eta2", early["seeds"]) for k in conds}
    values = dict(acc=acc, acc_se_unpaired=se, harm_early=early["harm"], harm_early_se=early["se"],
                  harm_late=late["harm"], harm_late_se=late["se"], paired_seeds=paired, from0=early, late=late,
                  final_csi=csi, final_eta2=eta, seeds={k: len(d) for k, d in conds.items()})
    observed = (f"paired over seeds {', '.join(map(str, early['seeds'])) or 'none'}: regularizing from 0 costs "
                f"{_fmt(early['harm'], 4)} (±{_fmt(early['se'], 4)} paired SE), from epoch {late_onset:g} "
                f"{_fmt(late['harm'], 4)} (±{_fmt(late['se'], 4)}); final accuracy baseline {_fmt(acc['baseline'], 4)} "
                f"(±{_fmt(se['baseline'], 4)} unpaired), from 0 {_fmt(acc['from0'], 4)} (±{_fmt(se['from0'], 4)}), late "
                f"{_fmt(acc['late'], 4)} (±{_fmt(se['late'], 4)}); final CSI {_fmt(csi['baseline'])} / {_fmt(csi['from0'])} "
                f"/ {_fmt(csi['late'])}, eta² {_fmt(eta['baseline'])} / {_fmt(eta['from0'])} / {_fmt(eta['late'])}")
    reduced = not math.isnan(csi["baseline"]) and csi["from0"] <= (1 - t["c4_min_csi_reduction"]) * csi["baseline"]
    if not reduced:
        return Verdict("C4", INCONCLUSIVE, stat, rule, observed + "; the regularizer did not lower selectivity enough to test the claim.", values)
    if len(early["seeds"]) < 2 or len(late["seeds"]) < 1:
        return Verdict("C4", INCONCLUSIVE, stat, rule, observed + "; fewer than 2 paired seeds.", values)
    harmed = early["harm"] >= t["c4_min_harm"] and early["harm"] > t["c4_min_harm_se"] * early["se"]
    late_cheap = late["harm"] <= t["c4_max_late_share"] * early["harm"]
    verdict = REPRODUCED if harmed and late_cheap else NOT_REPRODUCED
    return Verdict("C4", verdict, stat, rule, observed + ".", values)


def verdict_table(verdicts: list[Verdict]) -> str:
    """A plain-text table of verdicts (printed at the end of `csn reproduce`)."""
    lines = [f"{'claim':<6} {'verdict':<16} what was seen", f"{'-' * 6} {'-' * 16} {'-' * 40}"]
    for v in verdicts:
        lines.append(f"{v.claim:<6} {v.verdict:<16} {v.observed}")
    return "\n".join(lines)
