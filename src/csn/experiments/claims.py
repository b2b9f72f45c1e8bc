"""The study's claims C1-C4 as statistics over csn's tables, with three-valued verdicts by declared rules.

Rule set 2, declared on 2026-12-05 before it was run on any result (RULES_VERSION, RULES_DECLARED; claims.json
records both). Every number lives in THRESHOLDS; every interval and verdict shape comes from
csn.core.inference (t intervals over seeds; holds / does not hold / inconclusive). Each claim is a vectorized
rule over per-seed arrays (`c1_codes` ... `c4_codes`), so the simulation tests (tests/test_verdict_power.py)
and `csn reproduce --dry-run` judge simulated studies with the very functions that judge real ones.

History, stated as it happened: rule set 1 (2026-11-24) judged C1 on seed majorities of point estimates, C2
on the difference of areas at a fixed early checkpoint, C4 on point estimates against 2 paired SEs. C3's level
criterion ("near linear early") was added to rule set 1 on 2026-11-28, *after* the 2026-11-24 results had been
seen (it changed C3 from reproduced to inconclusive on them). Rule set 2 replaces all four rules; it was
written after the 2026-11-24/28 results were seen (they are why it exists: several verdicts of rule set 1 were
not supported by their data) and before any result was judged with it. Amended the same day, before any result was
judged with it: C4's final accuracy is measured after BatchNorm re-estimation (16 training batches, the whole test
split; csn.analysis.accuracy), not with the checkpoint's running statistics: in the critical-period map's pilot at a
constant learning rate, regularized runs scored 3-40 points lower in eval mode than the same weights after
re-estimation (the baseline 0.4), so eval-mode accuracy would have charged BatchNorm lag to the regularizer.
csn reports; it does not advocate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from pydantic import Field

from csn.core import inference as I
from csn.core.schema import Float, Schema
from csn.core.stats import standard_error

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CLAIM_WORDS = {1: REPRODUCED, -1: NOT_REPRODUCED, 0: INCONCLUSIVE}

RULES_VERSION = 2
RULES_DECLARED = "2026-12-05"

THRESHOLDS: dict[str, float] = {
    # Two-sided confidence of every t interval over seeds (a directional "holds" errs <= 2.5 % under no effect).
    "confidence": I.CONFIDENCE,
    # "Early" = the first quarter of training: a run's selectivity peak is searched there (C1, and the early
    # checkpoint of C2 and C3 is that peak: the step where the mean CSI of every stage but the last is largest).
    "early_fraction": 0.25,
    # C1, per stage, on CSI (eta² is judged by the same rule and reported beside it; CSI decides): per seed, the
    # peak is the checkpoint (in the early quarter) where the mean curve of the *other* seeds is highest (so the
    # maximum of noisy points does not bias the peak up); then, over seeds,
    # rise = peak - init must be >= c1_min_rise, recession = peak - final >= c1_min_recession and
    # final - init >= c1_min_final_above_init, each with its interval above 0 (all three: reproduced for the
    # stage; any with its interval inside +-its minimum: not reproduced); the claim: a majority of stages.
    "c1_min_rise": 0.01,
    "c1_min_recession": 0.01,
    "c1_min_final_above_init": 0.005,
    # C2, per stage: damage D = 1 - mean normalized top-1 over the fraction grid (1 - area / max fraction), for
    # the most selective units and for random ones (mean over draws); excess = ln(D_selective / D_random) (0 when
    # selective units do no more damage than random ones; the same at 0.45 vs 0.30 as at 0.12 vs 0.08, unlike a
    # difference of areas). Over seeds: excess at the selectivity peak >= c2_min_excess and excess(peak) -
    # excess(end) >= c2_min_shrink, each with its interval above 0; a seed whose random damage is below
    # c2_min_damage has no ratio. The claim: a majority of stages.
    "c2_min_excess": 0.1,
    "c2_min_shrink": 0.1,
    "c2_min_damage": 0.01,
    # C3, per measure: near linear early = the interval of its value at the early checkpoint (the selectivity
    # peak) lies at or above its level; falls = early - last >= c3_min_drop with its interval above 0. The claim:
    # a majority of measures.
    "c3_min_drop": 0.05,
    "c3_min_level_linearized_agreement_init": 0.9,
    "c3_min_level_relu_same_as_init": 0.9,
    "c3_min_level_mu_y_share": 0.9,
    # C4, paired by seed (final test accuracy after BatchNorm re-estimation): early harm = baseline - from step 0 >= c4_min_harm with its
    # interval above 0; late costs little = (late onset - from step 0) >= c4_min_harm with its interval above 0
    # (later suppression costs less than early) and the late harm's (baseline - late) interval below
    # c4_little. Not reproduced: the early harm's interval inside +-c4_min_harm, or the contrast's, or the late
    # harm's interval above c4_little. Inconclusive unless the regularizer from step 0 lowered the final mean CSI
    # of its stages by >= c4_min_csi_reduction.
    "c4_min_harm": 0.0025,
    "c4_little": 0.005,
    "c4_min_csi_reduction": 0.2,
}

C3_MEASURES = ("linearized_agreement_init", "relu_same_as_init", "mu_y_share")
"""mu_y_share = mu_Y / I(F;Y): the share of what the network knows about Y that a linear model explains
(Kalimeris et al. 2019). linear_agreement is not used: it rises with accuracy whatever the regime."""


class Spread(Schema):
    """The per-seed spread a study expects, for planning (power, minimal detectable effects, seeds needed) and
    for the simulation tests. The defaults were recorded on the fmnist study (ResNet-8, Fashion-MNIST, 3
    epochs; README "Statistics of the verdicts" says from which runs); a study on other data should measure its own."""

    c1_checkpoint_sd: Float = Field(0.005, ge=0, description="C1: checkpoint-to-checkpoint noise of a stage's mean CSI.")
    c1_seed_sd: Float = Field(0.01, ge=0, description="C1: seed-to-seed spread of a stage's whole CSI curve.")
    c2_sd: Float = Field(0.1, ge=0, description="C2: per-seed spread of ln(D_selective / D_random).")
    c3_sd: Float = Field(0.01, ge=0, description="C3: per-seed spread of a linearity measure.")
    c4_run_sd: Float = Field(0.0014, ge=0, description="C4: per-run spread of final test accuracy.")


EFFECTS: dict[str, float] = {
    # The declared effects: what each claim says, at the size the simulation tests and the dry run use for power.
    "c1_recession": 0.02,  # C1: a stage rises 0.05 by its early peak and gives back 0.02 by the end
    "c2_excess": 0.3,  # C2: selective ablation does e^0.3 = 1.35x the random damage at the peak, 1x at the end
    "c3_drop": 0.08,  # C3: each measure 0.95 early (level 0.9), 0.08 lower at the end
    "c4_harm": 0.005,  # C4: suppression from step 0 costs half a point, from the late onset nothing
}


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


def _ci(values, rules: Mapping[str, float]) -> I.Interval:
    return I.t_interval(values, rules["confidence"])


# ------------------------------------------------------------------------------------------------
# the rules, vectorized: arrays [..., seeds] (C1: [..., seeds, checkpoints]) -> codes [...]
# ------------------------------------------------------------------------------------------------

def loo_peak_values(curves: np.ndarray, early: np.ndarray) -> np.ndarray:
    """[..., seeds]: each seed's value at the early checkpoint where the mean curve of the *other* seeds peaks
    (NaN with fewer than 2 seeds). early [checkpoints] (bool) marks where the peak may lie."""
    c = np.asarray(curves, dtype=np.float64)
    n = c.shape[-2]
    if n < 2 or not np.asarray(early).any():
        return np.full(c.shape[:-1], np.nan)
    others = (c.sum(axis=-2, keepdims=True) - c) / (n - 1)
    others = np.where(np.asarray(early, dtype=bool), others, -np.inf)
    idx = np.argmax(others, axis=-1)
    return np.take_along_axis(c, idx[..., None], axis=-1)[..., 0]


def c1_parts(curves: np.ndarray, early: np.ndarray, rules: Mapping[str, float] = THRESHOLDS) -> dict:
    """C1 for one stage: curves [..., seeds, checkpoints] (checkpoint 0 = initialization, the last = the end).
    Returns the intervals of rise, recession and final-above-init, and the stage's codes."""
    c = np.asarray(curves, dtype=np.float64)
    peak, init, final = loo_peak_values(c, early), c[..., 0], c[..., -1]
    parts = {"rise": _ci(peak - init, rules), "recession": _ci(peak - final, rules), "above_init": _ci(final - init, rules)}
    codes = I.all_of(I.directional(parts["rise"], rules["c1_min_rise"]),
                     I.directional(parts["recession"], rules["c1_min_recession"]),
                     I.directional(parts["above_init"], rules["c1_min_final_above_init"]))
    return {**parts, "codes": codes}


def c2_parts(excess_peak: np.ndarray, excess_end: np.ndarray, rules: Mapping[str, float] = THRESHOLDS) -> dict:
    """C2 for one stage from per-seed ln(D_selective / D_random) at the peak and at the end ([..., seeds])."""
    peak, shrink = _ci(excess_peak, rules), _ci(np.asarray(excess_peak) - np.asarray(excess_end), rules)
    codes = I.all_of(I.directional(peak, rules["c2_min_excess"]), I.directional(shrink, rules["c2_min_shrink"]))
    return {"excess_peak": peak, "excess_end": _ci(excess_end, rules), "shrink": shrink, "codes": codes}


def c3_parts(early: np.ndarray, last: np.ndarray, level: float, rules: Mapping[str, float] = THRESHOLDS) -> dict:
    """C3 for one measure from its per-seed values at the early checkpoint and at the end ([..., seeds])."""
    e, drop = _ci(early, rules), _ci(np.asarray(early) - np.asarray(last), rules)
    codes = I.all_of(I.at_least(e, level), I.directional(drop, rules["c3_min_drop"]))
    return {"early": e, "last": _ci(last, rules), "drop": drop, "codes": codes}


def c4_parts(baseline: np.ndarray, from0: np.ndarray, late: np.ndarray, rules: Mapping[str, float] = THRESHOLDS) -> dict:
    """C4 from per-seed final accuracies of the three conditions, paired by seed ([..., seeds])."""
    b, f, lt = (np.asarray(x, dtype=np.float64) for x in (baseline, from0, late))
    early, contrast, late_harm = _ci(b - f, rules), _ci(lt - f, rules), _ci(b - lt, rules)
    harms = I.directional(early, rules["c4_min_harm"])
    little = I.all_of(I.directional(contrast, rules["c4_min_harm"]), I.below(late_harm, rules["c4_little"]))
    return {"early_harm": early, "contrast": contrast, "late_harm": late_harm, "early_codes": harms,
            "late_codes": little, "codes": I.all_of(harms, little)}


# ------------------------------------------------------------------------------------------------
# simulated studies from the declared table shapes (the simulation tests and the dry run's power)
# ------------------------------------------------------------------------------------------------

C1_SHAPE = (0.0, 0.125, 0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 9.0, 12.0)
"""Checkpoint times of the simulated C1 curves, in units of the early phase: 13 checkpoints, 8 of them in the
first quarter (as the fmnist schedule); the rise completes at time 0.25."""


def simulate_c1(spread: Spread = Spread(), stages: int = 3, rise: float = 0.05) -> I.Simulate:
    """C1 studies: every stage rises `rise` above its initial CSI by time 0.25, then gives back `effect` linearly
    until time 3 and stays; each seed adds an offset (c1_seed_sd), each checkpoint noise (c1_checkpoint_sd). Nulls:
    rise 0.02 and effect 0 (rises, then stays flat), rise 0 (nothing happens), effect = rise (recedes completely)."""
    t = np.asarray(C1_SHAPE)
    early = t <= 0.25 * t[-1]

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        mean = np.where(t < 0.25, rise * t / 0.25, rise - effect * np.clip((t - 0.25) / 2.75, 0, 1))
        shape = (studies, stages, seeds, len(t))
        curves = (0.15 + mean + rng.normal(0, spread.c1_seed_sd, shape[:-1])[..., None]
                  + rng.normal(0, spread.c1_checkpoint_sd, shape))
        return I.majority(c1_parts(curves, early)["codes"], axis=-1)
    return sim


def simulate_c2(spread: Spread = Spread(), stages: int = 3, end_share: float = 0.0) -> I.Simulate:
    """C2 studies: per seed and stage, excess ln ratio `effect` at the peak and end_share * effect at the end, with
    noise c2_sd. Nulls: effect 0 (no special role), end_share 1 (the role does not shrink)."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        peak = effect + rng.normal(0, spread.c2_sd, (studies, stages, seeds))
        end = end_share * effect + rng.normal(0, spread.c2_sd, (studies, stages, seeds))
        return I.majority(c2_parts(peak, end)["codes"], axis=-1)
    return sim


def simulate_c3(spread: Spread = Spread(), level_offset: float = 0.05) -> I.Simulate:
    """C3 studies: every measure at its level + level_offset early and `effect` lower at the end, noise c3_sd.
    Nulls: effect 0 (no fall), level_offset 0 (early exactly at the level, not above it)."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        codes = []
        for m in C3_MEASURES:
            level = THRESHOLDS["c3_min_level_" + m]
            early = level + level_offset + rng.normal(0, spread.c3_sd, (studies, seeds))
            last = early - effect + rng.normal(0, spread.c3_sd, (studies, seeds))
            codes.append(c3_parts(early, last, level)["codes"])
        return I.majority(np.stack(codes, axis=-1), axis=-1)
    return sim


def simulate_c4(spread: Spread = Spread(), late_share: float = 0.0) -> I.Simulate:
    """C4 studies: final accuracies with per-run noise c4_run_sd; from step 0 costs `effect`, the late onset
    late_share * effect. Nulls: effect 0 (nothing harms), late_share 1 (late costs as much), late_share with
    late_share * effect = c4_little (late costs exactly the 'little' bound)."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        b, f, lt = (rng.normal(0, spread.c4_run_sd, (studies, seeds)) for _ in range(3))
        return c4_parts(b, f - effect, lt - late_share * effect)["codes"]
    return sim


def scenarios(spread: Spread = Spread()) -> list[dict]:
    """The simulation tests' studies, per claim: nulls (where "reproduced" must come <= 5 % of the time) and the
    declared effect (where "not reproduced" must come <= 5 %, and the power is reported). `seeds` says which of
    the study's seed counts the claim uses (baseline seeds, or the seeds every C4 condition shares)."""
    e = EFFECTS
    return [
        dict(claim="C1", kind="null", what="rises 0.02, then flat", sim=simulate_c1(spread, rise=0.02), effect=0.0),
        dict(claim="C1", kind="null", what="nothing happens", sim=simulate_c1(spread, rise=0.0), effect=0.0),
        dict(claim="C1", kind="null", what="rises 0.05, recedes completely", sim=simulate_c1(spread), effect=0.05),
        dict(claim="C1", kind="effect", what="rises 0.05, gives back 0.02", sim=simulate_c1(spread),
             effect=e["c1_recession"]),
        dict(claim="C2", kind="null", what="selective = random damage", sim=simulate_c2(spread), effect=0.0),
        dict(claim="C2", kind="null", what="excess 0.3 that does not shrink", sim=simulate_c2(spread, end_share=1.0),
             effect=e["c2_excess"]),
        dict(claim="C2", kind="effect", what="excess 0.3 at the peak, 0 at the end", sim=simulate_c2(spread),
             effect=e["c2_excess"]),
        dict(claim="C3", kind="null", what="near linear, no fall", sim=simulate_c3(spread), effect=0.0),
        dict(claim="C3", kind="null", what="falls 0.08 from exactly the level", sim=simulate_c3(spread, level_offset=0.0),
             effect=e["c3_drop"]),
        dict(claim="C3", kind="effect", what="0.05 above the level, falls 0.08", sim=simulate_c3(spread),
             effect=e["c3_drop"]),
        dict(claim="C4", kind="null", what="no harm at all", sim=simulate_c4(spread), effect=0.0),
        dict(claim="C4", kind="null", what="early and late both cost 0.8 points", sim=simulate_c4(spread, 1.0),
             effect=0.008),
        dict(claim="C4", kind="null", what="early 0.8, late 0.5 points (= little)", sim=simulate_c4(spread, 0.625),
             effect=0.008),
        dict(claim="C4", kind="effect", what="early 0.5 points, late nothing", sim=simulate_c4(spread),
             effect=e["c4_harm"]),
    ]


def planned_power(seeds: int, spread: Spread = Spread(), studies: int = I.SIM_STUDIES) -> list[dict]:
    """Per claim: the declared effect, the power at `seeds`, the minimal detectable effect there and the seeds the
    declared effect needs (power >= inference.POWER), from the study's spread."""
    c1_upper = 0.03  # of a 0.05 rise: power falls again beyond it, where "final above init" starts to fail
    plans = (("C1", "recession of a stage's CSI", simulate_c1(spread), EFFECTS["c1_recession"], c1_upper),
             ("C2", "ln(D_selective / D_random) at the peak", simulate_c2(spread), EFFECTS["c2_excess"], 2.0),
             ("C3", "drop of each linearity measure", simulate_c3(spread), EFFECTS["c3_drop"], 0.5),
             ("C4", "accuracy cost of suppression from step 0", simulate_c4(spread), EFFECTS["c4_harm"], 0.05))
    out = []
    for claim, what, sim, effect, upper in plans:
        out.append({"claim": claim, "effect": what, "declared": effect, "seeds": seeds,
                    "power": I.power(sim, effect, seeds, studies),
                    "mde": I.minimal_detectable_effect(sim, seeds, upper, studies=studies),
                    "seeds_needed": I.seeds_needed(sim, effect, studies=studies)})
    return out


# ------------------------------------------------------------------------------------------------
# from tables to verdicts
# ------------------------------------------------------------------------------------------------

def _claim_word(code) -> str:
    return CLAIM_WORDS[int(np.asarray(code).reshape(-1)[0])]


def _mde_text(iv: I.Interval, minimal: float, rules: Mapping[str, float]) -> str:
    """'MDE 0.004 at 3 seeds': the smallest true effect this interval's spread would detect with power
    inference.POWER (a directional rule, normal per-seed values with the observed SD)."""
    one = iv.item()
    if not (one.n >= 2 and math.isfinite(one.sd)):
        return "MDE: needs 2+ seeds"
    sd, n = max(one.sd, 1e-12), int(one.n)

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        return I.directional(_ci(effect + rng.normal(0, sd, (studies, seeds)), rules), minimal)
    mde = I.minimal_detectable_effect(sim, n, upper=max(minimal, 10 * sd), studies=1000)
    return f"MDE {_fmt(mde, 4)} at {n} seeds"


def _curves(sel: pd.DataFrame, value: str) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per stage: ([seeds, checkpoints] mean `value` per run and step on the steps every run has, the steps,
    the runs)."""
    out = {}
    means = sel.groupby(["stage", "run", "step"], sort=False)[value].mean()
    for stage in dict.fromkeys(sel["stage"]):
        m = means.loc[stage].unstack("step")
        m = m.loc[:, m.notna().all(axis=0)].sort_index(axis=1)
        out[stage] = (m.to_numpy(dtype=np.float64), m.columns.to_numpy(), [str(r) for r in m.index])
    return out


def peak_step(sel: pd.DataFrame, total_steps: int, rules: Mapping[str, float] = THRESHOLDS) -> int | None:
    """A run's selectivity peak: the checkpoint step (0 < step <= early_fraction of training) where the mean CSI
    of every stage but the last is largest (every stage with one stage). None without such a checkpoint."""
    if sel is None or sel.empty:
        return None
    stages = list(dict.fromkeys(sel["stage"]))
    part = sel[sel["stage"].isin(stages[:-1] if len(stages) > 1 else stages)]
    curve = part.groupby("step")["csi"].mean()
    curve = curve[(curve.index > 0) & (curve.index <= rules["early_fraction"] * total_steps)]
    return None if curve.empty else int(curve.idxmax())


def claim_c1(sel: pd.DataFrame | None, total_steps: int, rules: Mapping[str, float] = THRESHOLDS) -> Verdict:
    """C1 from the selectivity tables of the baseline runs (column `run` identifies the seed)."""
    rule = (f"per stage over seeds (t intervals, {rules['confidence']:.0%}): each seed's peak is taken where the other "
            f"seeds' mean CSI peaks in the first {rules['early_fraction']:.0%} of training; rise = peak - init >= "
            f"{rules['c1_min_rise']:g}, recession = peak - final >= {rules['c1_min_recession']:g} and final - init >= "
            f"{rules['c1_min_final_above_init']:g}, each with its interval above 0 (reproduced for the stage); any "
            "interval inside +-its minimum: not reproduced; the claim: a majority of stages. CSI decides; eta² is "
            "judged the same way and reported")
    stat = "mean CSI per stage: init, early peak (leave-one-seed-out), final; the same for eta²"
    if sel is None or sel.empty:
        return Verdict("C1", INCONCLUSIVE, stat, rule, "no selectivity table was found.")
    per_stage, parts, codes = {}, [], []
    eta = _curves(sel, "eta2") if "eta2" in sel else {}
    for stage, (curves, steps, runs) in _curves(sel, "csi").items():
        early = (steps > 0) & (steps <= rules["early_fraction"] * total_steps)
        p = c1_parts(curves, early, rules)
        e = c1_parts(eta[stage][0], (eta[stage][1] > 0) & (eta[stage][1] <= rules["early_fraction"] * total_steps),
                     rules) if stage in eta else None
        codes.append(int(p["codes"]))
        per_stage[stage] = {"verdict": _claim_word(p["codes"]), "seeds": len(runs),
                            **{k: p[k].to_dict() for k in ("rise", "recession", "above_init")},
                            "init": float(curves[:, 0].mean()), "final": float(curves[:, -1].mean()),
                            "eta2_verdict": _claim_word(e["codes"]) if e else None,
                            "eta2_recession": e["recession"].to_dict() if e else None}
        eta_text = f"; eta² {_claim_word(e['codes'])} (recession {e['recession'].text()})" if e else ""
        parts.append(f"{stage}: {_claim_word(p['codes'])} (init {_fmt(per_stage[stage]['init'])}, rise "
                     f"{p['rise'].text()}, recession {p['recession'].text()}, final - init {p['above_init'].text()}, "
                     f"{len(runs)} seeds, {_mde_text(p['recession'], rules['c1_min_recession'], rules)}{eta_text})")
    verdict = _claim_word(I.majority(np.array(codes))) if codes else INCONCLUSIVE
    return Verdict("C1", verdict, stat, rule, "; ".join(parts) + ".", {"stages": per_stage})


def excess_damage(areas: pd.DataFrame, rules: Mapping[str, float] = THRESHOLDS) -> pd.DataFrame:
    """ln(D_selective / D_random) per (run, step, stage) from an ablation summary's gaps table (selective_area,
    random_area and the grid's max fraction): D = 1 - area / max_fraction; NaN where D_random < c2_min_damage or
    D_selective <= 0."""
    d = areas.copy()
    width = d["max_fraction"].where(d["max_fraction"] > 0)
    d_sel, d_rnd = 1 - d["selective_area"] / width, 1 - d["random_area"] / width
    ok = (d_rnd >= rules["c2_min_damage"]) & (d_sel > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d["excess"] = np.where(ok, np.log(d_sel.where(ok) / d_rnd.where(ok)), np.nan)
    d["damage_selective"], d["damage_random"] = d_sel, d_rnd
    return d


def claim_c2(gaps: pd.DataFrame | None, peak_by_run: dict, end_by_run: dict,
             rules: Mapping[str, float] = THRESHOLDS) -> Verdict:
    """C2 from ablation summaries (columns run, step, stage, selective_area, random_area, max_fraction): the
    excess damage of selective over random ablation at each run's selectivity peak and at its last checkpoint."""
    rule = (f"per stage over seeds (t intervals, {rules['confidence']:.0%}): excess = ln(D_selective / D_random), D = 1 - "
            f"mean normalized top-1 over the grid; excess at the run's selectivity peak >= {rules['c2_min_excess']:g} "
            f"and excess(peak) - excess(end) >= {rules['c2_min_shrink']:g}, each with its interval above 0 (reproduced "
            "for the stage); either interval inside +-its minimum: not reproduced; the claim: a majority of stages")
    stat = "ln(damage of selective / damage of random ablation) at the selectivity peak and at the end, per stage"
    if gaps is None or gaps.empty:
        return Verdict("C2", INCONCLUSIVE, stat, rule, "no ablation table was found.")
    ex = excess_damage(gaps, rules).set_index(["run", "step", "stage"])["excess"]
    per_stage, parts, codes = {}, [], []
    for stage in dict.fromkeys(gaps["stage"]):
        peak, end = (np.array([float(ex.get((r, steps.get(r), stage), np.nan)) for r in end_by_run])
                     for steps in (peak_by_run, end_by_run))
        p = c2_parts(peak, end, rules)
        codes.append(int(p["codes"]))
        per_stage[stage] = {"verdict": _claim_word(p["codes"]), "seeds": int(np.isfinite(peak - end).sum()),
                            **{k: p[k].to_dict() for k in ("excess_peak", "excess_end", "shrink")}}
        parts.append(f"{stage}: {_claim_word(p['codes'])} (excess {p['excess_peak'].text(fmt='.3f')} at the peak vs "
                     f"{p['excess_end'].text(fmt='.3f')} at the end, "
                     f"{_mde_text(p['excess_peak'], rules['c2_min_excess'], rules)})")
    verdict = _claim_word(I.majority(np.array(codes))) if codes else INCONCLUSIVE
    return Verdict("C2", verdict, stat, rule, "; ".join(parts) + " (positive: selective ablation does more damage).",
                   {"stages": per_stage})


def claim_c3(lin: pd.DataFrame | None, early_by_run: dict, end_by_run: dict,
             rules: Mapping[str, float] = THRESHOLDS) -> Verdict:
    """C3 from linearity tables (columns run, step, measure, value): per measure, near linear at each run's early
    checkpoint (its declared level) and falling by its last checkpoint."""
    levels = ", ".join(f"{m} >= {rules['c3_min_level_' + m]:g}" for m in C3_MEASURES)
    rule = (f"per measure over seeds (t intervals, {rules['confidence']:.0%}): near linear early = the early value's "
            f"interval at or above its level ({levels}; early = the run's selectivity peak), falls = early - last >= "
            f"{rules['c3_min_drop']:g} with its interval above 0; reproduced if a majority of measures show both, not "
            "reproduced if a majority shows evidence against (early interval below the level, or drop inside "
            f"+-{rules['c3_min_drop']:g})")
    stat = "linearity measures at the early checkpoint (level) and early - last (fall), per measure"
    if lin is None or lin.empty:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "no linearity table was found.")
    vals, parts, codes = {}, [], []
    for m in C3_MEASURES:
        d = lin[lin["measure"] == m]
        early, last = [], []
        for run, g in d.groupby("run"):
            ge, gl = g[g["step"] == early_by_run.get(run)], g[g["step"] == end_by_run.get(run)]
            if not ge.empty and not gl.empty:
                early.append(float(ge["value"].iloc[0]))
                last.append(float(gl["value"].iloc[0]))
        if not early:
            continue
        p = c3_parts(np.array(early), np.array(last), rules["c3_min_level_" + m], rules)
        codes.append(int(p["codes"]))
        vals[m] = {"verdict": _claim_word(p["codes"]), "level": rules["c3_min_level_" + m], "seeds": len(early),
                   **{k: p[k].to_dict() for k in ("early", "last", "drop")}}
        parts.append(f"{m}: {_claim_word(p['codes'])} ({p['early'].text(fmt='.3f')} early vs level "
                     f"{rules['c3_min_level_' + m]:g}, drop {p['drop'].text(fmt='.3f')})")
    if not vals:
        return Verdict("C3", INCONCLUSIVE, stat, rule, "the linearity tables hold none of the measures at both the "
                       "runs' selectivity peaks and their last checkpoints (csn linearity RUN --checkpoints STEP,end).")
    return Verdict("C3", _claim_word(I.majority(np.array(codes))), stat, rule, "; ".join(parts) + ".", {"measures": vals})


def _by_seed(per_seed: pd.DataFrame, mask: pd.Series, col: str = "final_test_acc") -> dict[int, float]:
    d = per_seed[mask]
    return {int(s): float(v) for s, v in zip(d["seed"], d[col]) if v is not None and math.isfinite(float(v))} \
        if col in d else {}


def c4_dose(per_seed: pd.DataFrame, seeds: list[int]) -> dict:
    """Per condition over the paired seeds: final mean CSI / eta² of the regularized stages, their reduction
    against the baseline, and the regularized steps and mean learning rate inside the window (when recorded)."""
    out = {}
    for name, g in per_seed[per_seed["seed"].isin(seeds)].groupby("condition", sort=False):
        out[name] = {k: float(g[k].mean()) for k in ("final_csi", "final_eta2", "reg_steps", "reg_mean_lr") if k in g}
    base = out.get("baseline", {})
    for d in out.values():
        for k in ("final_csi", "final_eta2"):
            if k in d and base.get(k):
                d[k + "_reduction"] = 1 - d[k] / base[k]
    return out


def claim_c4(per_seed: pd.DataFrame | None, late_onset: float, rules: Mapping[str, float] = THRESHOLDS) -> Verdict:
    """C4 from the regularization runs' per-seed table (condition, onset, seed, final_test_acc, final_csi, ...),
    conditions paired by seed (same initialization and data order)."""
    rule = (f"final test accuracy after BatchNorm re-estimation, paired by seed, t intervals ({rules['confidence']:.0%}): "
            f"early harm = baseline - from step 0 >= "
            f"{rules['c4_min_harm']:g} with its interval above 0; late costs little = late - from step 0 >= "
            f"{rules['c4_min_harm']:g} with its interval above 0 and the late harm's interval below {rules['c4_little']:g}; "
            f"reproduced if both; not reproduced if the early harm's or the contrast's interval lies inside "
            f"+-{rules['c4_min_harm']:g} or the late harm's above {rules['c4_little']:g}; inconclusive otherwise, or "
            f"unless suppression from step 0 lowered the final CSI of its stages by >= {rules['c4_min_csi_reduction']:.0%}")
    stat = "final test accuracy paired by seed: early harm, late - early contrast, late harm; dose beside"
    if per_seed is None or per_seed.empty:
        return Verdict("C4", INCONCLUSIVE, stat, rule, "no regularization runs were found.")
    base = _by_seed(per_seed, per_seed["onset"].isna())
    from0 = _by_seed(per_seed, per_seed["onset"] == 0)
    late = _by_seed(per_seed, per_seed["onset"] == late_onset)
    if not (base and from0 and late):
        unmeasured = "final_test_acc_eval" in per_seed and per_seed["final_test_acc"].isna().any()
        why = ("the final accuracy after BatchNorm re-estimation was not measured for "
               f"{int(per_seed['final_test_acc'].isna().sum())} run(s): run `csn accuracy RUN... --checkpoints last "
               "--bn-recalibrate 16` on them (csn reproduce does)" if unmeasured
               else "a condition is missing (baseline, from 0, late onset)")
        return Verdict("C4", INCONCLUSIVE, stat, rule, why + ".")
    seeds = sorted(set(base) & set(from0) & set(late))
    p = c4_parts(*(np.array([d[s] for s in seeds], dtype=np.float64) for d in (base, from0, late)), rules)
    dose = c4_dose(per_seed, seeds)
    name0 = str(per_seed.loc[per_seed["onset"] == 0, "condition"].iloc[0])
    red = dose.get(name0, {}).get("final_csi_reduction")
    values = {"paired_seeds": seeds, **{k: p[k].to_dict() for k in ("early_harm", "contrast", "late_harm")},
              "early_verdict": _claim_word(p["early_codes"]), "late_verdict": _claim_word(p["late_codes"]), "dose": dose,
              "acc": {k: float(np.mean(list(v.values()))) for k, v in (("baseline", base), ("from0", from0), ("late", late))},
              "acc_se_unpaired": {k: standard_error(list(v.values())) for k, v in
                                  (("baseline", base), ("from0", from0), ("late", late))}}
    observed = (f"paired over seeds {', '.join(map(str, seeds)) or 'none'}: early harm {p['early_harm'].text()} "
                f"({_claim_word(p['early_codes'])}; {_mde_text(p['early_harm'], rules['c4_min_harm'], rules)}); late - "
                f"early {p['contrast'].text()}, late harm {p['late_harm'].text()} (late costs little: "
                f"{_claim_word(p['late_codes'])}); final CSI of the regularized stages "
                + ", ".join(f"{k} {_fmt(d.get('final_csi', math.nan))}" for k, d in dose.items())
                + "; eta² " + ", ".join(f"{k} {_fmt(d.get('final_eta2', math.nan))}" for k, d in dose.items()))
    if red is None or not math.isfinite(red) or red < rules["c4_min_csi_reduction"]:
        return Verdict("C4", INCONCLUSIVE, stat, rule, observed + "; the regularizer did not lower selectivity enough to "
                       "test the claim.", values)
    return Verdict("C4", _claim_word(p["codes"]), stat, rule, observed + ".", values)


def verdict_table(verdicts: list[Verdict]) -> str:
    """A plain-text table of verdicts (printed at the end of `csn reproduce`)."""
    lines = [f"{'claim':<6} {'verdict':<16} what was seen", f"{'-' * 6} {'-' * 16} {'-' * 40}"]
    for v in verdicts:
        lines.append(f"{v.claim:<6} {v.verdict:<16} {v.observed}")
    return "\n".join(lines)


__all__ = ["REPRODUCED", "NOT_REPRODUCED", "INCONCLUSIVE", "RULES_VERSION", "RULES_DECLARED", "THRESHOLDS", "C3_MEASURES",
           "Spread", "EFFECTS", "Verdict", "loo_peak_values", "c1_parts", "c2_parts", "c3_parts", "c4_parts",
           "simulate_c1", "simulate_c2", "simulate_c3", "simulate_c4", "scenarios", "planned_power", "peak_step", "claim_c1",
           "excess_damage", "claim_c2", "claim_c3", "c4_dose", "claim_c4", "verdict_table"]
