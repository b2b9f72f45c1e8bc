"""The critical-period map's statistics and verdicts (SPEC "Pairing and the critical-period map", "Statistics of
verdicts").

Rule set 2, declared on 2026-12-05 before it was run on any map (RULES_VERSION, RULES_DECLARED; windows.json
records both). Rule set 1 (declared 2026-11-28 in 74933f0) judged "early windows harm more" on a Spearman rho
between window start and mean harm with percentile bootstrap intervals over 3 seeds (whose "95 %" interval is
the seeds' [min, max]); it said "holds" 8.5-12 % of the time when every window harmed the same. Rule set 2
judges contrasts per seed with t intervals (csn.core.inference) and asks the study's two questions apart.

Conditions share seeds with the baseline, so the effect of a condition is the per-seed difference to the
baseline of the same seed: **harm** = baseline final test accuracy - condition final test accuracy, both measured
after BatchNorm re-estimation (amended 2026-12-05, before any map was judged with rule set 2: at a constant
learning rate eval-mode accuracy lagged by 3-40 points in regularized runs of the pilot). A *family*
is one (alpha, stage set) over its windows; its *late* windows are those starting at or after `late_from` of
training. Per suppression family (alpha < 0), three verdicts:

- **the earliest window harms**: its paired harm >= min_harm, interval above 0;
- **early harms more**: per seed, harm(earliest) - mean harm(late windows) >= min_harm, interval above 0;
- **late costs little**: per seed, the mean harm of the late windows has its interval below `little`.

Per promotion family (alpha > 0), two: **promotion changes final accuracy** and **promotion changes accuracy at
the window's end** (the earliest window; either sign, >= min_harm, interval excluding 0; accuracy at the
window's end is measured after BatchNorm re-estimation). Every verdict is holds / does not hold / inconclusive
by csn.core.inference's rule shapes, printed with the minimal detectable effect at the seeds used. A suppression
family is only judged when its earliest window lowered the stages' CSI at the window's end by >= min_csi_reduction
(the suppression took); a promotion family when it raised it by >= min_csi_increase. The Spearman rho between
window start and mean harm is reported as a description, without a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from csn.core import inference as I
from csn.core.stats import standard_error

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = I.HOLDS, I.DOES_NOT_HOLD, I.INCONCLUSIVE

RULES_VERSION = 2
RULES_DECLARED = "2026-12-05"

WINDOW_RULES: dict[str, float] = {
    # Two-sided confidence of every t interval over seeds.
    "confidence": I.CONFIDENCE,
    # A family is judged with at least this many seeds paired with the baseline.
    "min_seeds": 3,
    # The smallest change of accuracy that counts as an effect (a quarter point); "does not hold" needs the
    # interval inside +-min_harm.
    "min_harm": 0.0025,
    # A cost is "little" when its interval lies below this (half a point).
    "little": 0.005,
    # Late windows: those starting at or after this fraction of training.
    "late_from": 0.5,
    # Suppression is only judged when the earliest window lowered the regularized stages' mean CSI at the window's
    # end by at least this share of the baseline's CSI at the same step (paired, mean over seeds) ...
    "min_csi_reduction": 0.5,
    # ... and promotion when it raised it by at least this share.
    "min_csi_increase": 0.2,
}

Q_EARLIEST = "the earliest window harms"
Q_MORE = "early windows harm more than late ones"
Q_LITTLE = "late windows cost little"
Q_PROMOTE_FINAL = "promotion changes final accuracy"
Q_PROMOTE_END = "promotion changes accuracy at the window's end"

VERDICT_COLUMNS = ("kind", "alpha", "stage_set", "question", "verdict", "estimate", "lo", "hi", "minimal", "n_seeds",
                   "n_windows", "windows", "mde", "rho", "csi_change", "observed", "rule", "rules_version")
"""Columns of windows_verdicts.parquet (one row per (alpha, stage set) and question)."""

PER_SEED_COLUMNS = ("alpha", "stage_set", "window", "start_step", "end_step", "start_fraction", "seed", "harm",
                    "early_gap", "csi_reduction_end")
"""What the statistic reads from the per-seed table (one row per regularized condition and seed): harm = baseline -
condition final accuracy; early_gap = condition - baseline accuracy at the window's end (BN re-estimated)."""


def _pct(x: float) -> str:
    return f"{x:.0%}"


def suppression_rule(rules: Mapping[str, float] = WINDOW_RULES) -> str:
    """The suppression verdicts' rules in words (printed with the results)."""
    r = rules
    return (f"paired harm = baseline − condition final test accuracy after BatchNorm re-estimation, same seed; t "
            f"intervals over seeds "
            f"({_pct(r['confidence'])}); late windows start at >= {_pct(r['late_from'])} of training. "
            f"'{Q_EARLIEST}': harm of the earliest window >= {r['min_harm']:g}, interval above 0. '{Q_MORE}': per seed "
            f"harm(earliest) − mean harm(late windows) >= {r['min_harm']:g}, interval above 0. Each does not hold when "
            f"its interval lies below {r['min_harm']:g} (no harm of that size; or one the other way). '{Q_LITTLE}': the late windows' mean harm has its interval "
            f"below {r['little']:g} (does not hold: above it). Inconclusive otherwise, with < {int(r['min_seeds'])} "
            f"seeds, or when the earliest window lowered the stages' CSI at its end (vs the baseline at that step) by < "
            f"{_pct(r['min_csi_reduction'])}.")


def promotion_rule(rules: Mapping[str, float] = WINDOW_RULES) -> str:
    """The promotion verdicts' rules in words (printed with the results)."""
    r = rules
    return (f"earliest window: Δ final = condition − baseline final test accuracy after BatchNorm re-estimation; Δ end "
            f"= the same at the window's "
            f"end checkpoint, after BatchNorm re-estimation; same seed, t intervals ({_pct(r['confidence'])}). Each "
            f"holds when its interval excludes 0 and |Δ| >= {r['min_harm']:g}, does not hold when its interval lies "
            f"inside ±{r['min_harm']:g}; inconclusive otherwise, with < {int(r['min_seeds'])} seeds, or when the "
            f"window raised the stages' CSI at its end by < {_pct(r['min_csi_increase'])}.")


# ------------------------------------------------------------------------------------------------
# the numbers
# ------------------------------------------------------------------------------------------------

def paired(condition: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Paired harm (baseline - condition, per seed): mean, paired SE, and the unpaired SE beside it (the two
    conditions as independent samples: sqrt(SE(baseline)² + SE(condition)²)); condition_intervals gives its interval."""
    c, b = np.asarray(condition, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    return {"harm_mean": float(np.mean(b - c)) if len(b) else math.nan, "harm_se_paired": standard_error(b - c),
            "harm_se_unpaired": math.sqrt(standard_error(b) ** 2 + standard_error(c) ** 2) if len(b) > 1 else math.nan,
            "n": len(b)}


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of x [W] with each row of y [..., W] (ties get average ranks). A row whose values
    are all equal has no order: its rho is 0. A row holding a NaN has no rho (NaN)."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    rx = pd.Series(np.asarray(x, dtype=np.float64)).rank(method="average").to_numpy()
    ry = pd.DataFrame(y).rank(axis=1, method="average").to_numpy()
    rx = rx - rx.mean()
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum() * (ry**2).sum(axis=1))
    num = (ry * rx).sum(axis=1)
    rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(np.isnan(y).any(axis=1) | np.isnan(rx).any(), np.nan, rho)


def suppression_parts(harm: np.ndarray, late: np.ndarray, rules: Mapping[str, float] = WINDOW_RULES) -> dict:
    """The three suppression verdicts from harm [..., seeds, windows] (windows in start order, the earliest first)
    and late [windows] (bool). Vectorized over leading axes (the simulation tests call it on many maps)."""
    h = np.asarray(harm, dtype=np.float64)
    late = np.asarray(late, dtype=bool)
    conf = rules["confidence"]
    first = I.t_interval(h[..., 0], conf)
    out = {"earliest": first, "earliest_codes": I.directional(first, rules["min_harm"])}
    if late.any() and not late[0]:
        late_mean = h[..., late].mean(axis=-1)
        more, little = I.t_interval(h[..., 0] - late_mean, conf), I.t_interval(late_mean, conf)
        out.update(more=more, more_codes=I.directional(more, rules["min_harm"]), little=little,
                   little_codes=I.below(little, rules["little"]))
    return out


def promotion_parts(delta_final: np.ndarray, delta_end: np.ndarray, rules: Mapping[str, float] = WINDOW_RULES) -> dict:
    """The two promotion verdicts from per-seed changes (condition - baseline) [..., seeds]."""
    final, end = I.t_interval(delta_final, rules["confidence"]), I.t_interval(delta_end, rules["confidence"])
    return {"final": final, "final_codes": I.two_sided(final, rules["min_harm"]), "end": end,
            "end_codes": I.two_sided(end, rules["min_harm"])}


def mde(iv: I.Interval, minimal: float, rules: Mapping[str, float] = WINDOW_RULES, two_sided: bool = False) -> float:
    """The smallest true effect this interval's spread would detect with power inference.POWER at its seeds."""
    one = iv.item()
    if not (one.n >= 2 and math.isfinite(one.sd)):
        return math.nan
    sd, rule = max(one.sd, 1e-12), (I.two_sided if two_sided else I.directional)

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        return rule(I.t_interval(effect + rng.normal(0, sd, (studies, seeds)), rules["confidence"]), minimal)
    return I.minimal_detectable_effect(sim, int(one.n), upper=max(minimal, 10 * sd), studies=1000)


def simulate_suppression(question: str, run_sd: float = 0.0014, windows: int = 6, late_windows: int = 3,
                         null: str = "equal") -> I.Simulate:
    """Simulated maps for the simulation tests and planning: per seed a baseline and one run per window, each
    with per-run noise run_sd. Under the effect the earliest window costs `effect` and the late ones nothing; the
    nulls: 'equal' (every window costs 0.008: no window harms more), 'zero' (nothing harms), 'late' (the late
    windows cost `little`, the boundary of "little")."""
    late = np.arange(windows) >= windows - late_windows
    key = {Q_EARLIEST: "earliest_codes", Q_MORE: "more_codes", Q_LITTLE: "little_codes"}[question]

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        if effect == 0 and null == "equal":
            cost = np.full(windows, 0.008)
        elif effect == 0 and null == "late":
            cost = np.where(late, WINDOW_RULES["little"], 0.01)
        else:
            cost = np.where(np.arange(windows) == 0, effect, 0.0)
        base = rng.normal(0, run_sd, (studies, seeds, 1))
        cond = rng.normal(0, run_sd, (studies, seeds, windows)) - cost
        return suppression_parts(base - cond, late)[key]
    return sim


def simulate_little_margin(run_sd: float, windows: int, late_windows: int) -> I.Simulate:
    """"Late windows cost little" when the late windows cost `little - effect` (effect: the margin below `little`)
    and the earliest window the declared suppression effect: the planned power and MDE of that verdict."""
    late = np.arange(windows) >= windows - late_windows

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        cost = np.where(late, WINDOW_RULES["little"] - effect, 0.0)
        cost[0] = EFFECTS["suppression"]
        base = rng.normal(0, run_sd, (studies, seeds, 1))
        cond = rng.normal(0, run_sd, (studies, seeds, windows)) - cost
        return suppression_parts(base - cond, late)["little_codes"]
    return sim


def simulate_promotion(question: str, run_sd: float = 0.0014) -> I.Simulate:
    """Simulated promotion families: the change (final, or at the window's end) is `effect`, noise per run run_sd."""
    key = {Q_PROMOTE_FINAL: "final_codes", Q_PROMOTE_END: "end_codes"}[question]

    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        d = [rng.normal(0, run_sd, (studies, seeds)) - rng.normal(0, run_sd, (studies, seeds)) + effect for _ in range(2)]
        return promotion_parts(*d)[key]
    return sim


EFFECTS: dict[str, float] = {
    # The declared effects of the map's verdicts (simulation tests, planning): suppression in the earliest window
    # costs 0.8 points and late windows nothing; early promotion changes accuracy by 0.7 points.
    "suppression": 0.008,
    "promotion": 0.007,
}


def scenarios(run_sd: float = 0.0014) -> list[dict]:
    """The simulation tests' maps, per verdict: nulls ("holds" <= 5 %) and the declared effect ("does not hold"
    <= 5 %; power reported). run_sd: the per-run spread of final accuracy (the fmnist study's, claims.Spread)."""
    sup, pro = EFFECTS["suppression"], EFFECTS["promotion"]
    return [
        dict(claim=Q_EARLIEST, kind="null", what="no window harms", sim=simulate_suppression(Q_EARLIEST, run_sd, null="zero"),
             effect=0.0),
        dict(claim=Q_EARLIEST, kind="effect", what="earliest window costs 0.8 points",
             sim=simulate_suppression(Q_EARLIEST, run_sd), effect=sup),
        dict(claim=Q_MORE, kind="null", what="every window costs 0.8 points", sim=simulate_suppression(Q_MORE, run_sd),
             effect=0.0),
        dict(claim=Q_MORE, kind="effect", what="earliest 0.8 points, late nothing", sim=simulate_suppression(Q_MORE, run_sd),
             effect=sup),
        dict(claim=Q_LITTLE, kind="null", what="late windows cost 0.5 points (= little)",
             sim=simulate_suppression(Q_LITTLE, run_sd, null="late"), effect=0.0),
        dict(claim=Q_LITTLE, kind="effect", what="earliest 0.8 points, late nothing",
             sim=simulate_suppression(Q_LITTLE, run_sd), effect=sup),
        dict(claim=Q_PROMOTE_FINAL, kind="null", what="no change", sim=simulate_promotion(Q_PROMOTE_FINAL, run_sd),
             effect=0.0),
        dict(claim=Q_PROMOTE_FINAL, kind="effect", what="final accuracy changes 0.7 points",
             sim=simulate_promotion(Q_PROMOTE_FINAL, run_sd), effect=pro),
        dict(claim=Q_PROMOTE_END, kind="null", what="no change", sim=simulate_promotion(Q_PROMOTE_END, run_sd), effect=0.0),
        dict(claim=Q_PROMOTE_END, kind="effect", what="accuracy at the window's end changes 0.7 points",
             sim=simulate_promotion(Q_PROMOTE_END, run_sd), effect=pro),
    ]


# ------------------------------------------------------------------------------------------------
# verdicts of a map
# ------------------------------------------------------------------------------------------------

def _matrix(rows: pd.DataFrame, value: str, seeds: list[int]) -> np.ndarray:
    """[seeds, windows] of one column, windows in (start_step, end_step) order."""
    m = rows.pivot(index=["start_step", "end_step", "window"], columns="seed", values=value)
    return m.sort_index()[seeds].to_numpy(dtype=np.float64).T


def _gate(kind: str, change: float, n_seeds: int, rules: Mapping[str, float]) -> str | None:
    """Why a family cannot be judged (too few seeds, the intervention did not take), or None."""
    if n_seeds < rules["min_seeds"]:
        return f"{n_seeds} seeds paired with the baseline, fewer than {int(rules['min_seeds'])}"
    if not math.isfinite(change):
        return "no selectivity was measured at the end of the earliest window"
    if kind == "suppress" and -change < rules["min_csi_reduction"]:
        return f"the earliest window changed CSI by {change:+.0%}; the suppression did not take (needs -{_pct(rules['min_csi_reduction'])})"
    if kind == "promote" and change < rules["min_csi_increase"]:
        return f"the earliest window changed CSI by {change:+.0%}; the promotion did not take (needs +{_pct(rules['min_csi_increase'])})"
    return None


def _row(family: dict, question: str, iv: I.Interval | None, code, minimal: float, why: str | None,
         rules: Mapping[str, float], two: bool = False) -> dict:
    verdict = INCONCLUSIVE if why or iv is None else I.word(code)
    one = iv.item() if iv is not None else None
    m = mde(iv, minimal, rules, two) if iv is not None else math.nan
    seen = (f"{one.mean:.4f} [{one.lo:.4f}, {one.hi:.4f}] over {int(one.n)} seeds, MDE {m:.4f}" if one is not None
            else "no late window in the family")
    return {**family, "question": question, "verdict": verdict, "estimate": one.mean if one else math.nan,
            "lo": one.lo if one else math.nan, "hi": one.hi if one else math.nan, "minimal": minimal, "mde": m,
            "observed": seen + (f"; {why}" if why else ""), "rules_version": RULES_VERSION}


def family_rows(rows: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> list[dict]:
    """The verdict rows of one (alpha, stage set): seeds missing from any window of the family are left out (the
    pairing needs every window)."""
    windows = rows.drop_duplicates(["start_step", "end_step", "window"]).sort_values(["start_step", "end_step"])
    seeds = sorted(set.intersection(*(set(g["seed"]) for _, g in rows.groupby("window"))))
    alpha = float(rows["alpha"].iloc[0])
    kind = "promote" if alpha > 0 else "suppress"
    harm = _matrix(rows, "harm", seeds) if seeds else np.empty((0, len(windows)))
    change = -float(np.nanmean(_matrix(rows, "csi_reduction_end", seeds)[:, 0])) if seeds else math.nan
    rho = float(spearman(windows["start_step"].to_numpy(), np.nanmean(harm, axis=0))[0]) if seeds and len(windows) > 1 \
        else math.nan
    family = {"kind": kind, "alpha": alpha, "stage_set": str(rows["stage_set"].iloc[0]), "n_seeds": len(seeds),
              "n_windows": len(windows), "windows": ", ".join(windows["window"]), "rho": rho, "csi_change": change,
              "rule": promotion_rule(rules) if kind == "promote" else suppression_rule(rules)}
    why = _gate(kind, change, len(seeds), rules)
    if kind == "promote":
        p = promotion_parts(-harm[:, 0], _matrix(rows, "early_gap", seeds)[:, 0] if seeds else np.empty(0), rules)
        return [_row(family, Q_PROMOTE_FINAL, p["final"], p["final_codes"], rules["min_harm"], why, rules, True),
                _row(family, Q_PROMOTE_END, p["end"], p["end_codes"], rules["min_harm"], why, rules, True)]
    late = windows["start_fraction"].to_numpy(dtype=np.float64) >= rules["late_from"]
    p = suppression_parts(harm, late, rules)
    return [_row(family, Q_EARLIEST, p["earliest"], p["earliest_codes"], rules["min_harm"], why, rules),
            _row(family, Q_MORE, p.get("more"), p.get("more_codes"), rules["min_harm"], why, rules),
            _row(family, Q_LITTLE, p.get("little"), p.get("little_codes"), rules["little"], why, rules)]


def verdicts(per_seed: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> pd.DataFrame:
    """The verdict rows of every (alpha, stage set) of the regularized conditions. per_seed holds PER_SEED_COLUMNS
    (baseline rows, alpha 0, are ignored)."""
    missing = [c for c in PER_SEED_COLUMNS if c not in per_seed.columns]
    if missing:
        raise ValueError(f"the per-seed table lacks columns {missing}")
    reg = per_seed[per_seed["alpha"] != 0]
    out = []
    for _, rows in reg.groupby(["alpha", "stage_set"], sort=False):
        out += family_rows(rows, rules)
    return pd.DataFrame(out, columns=list(VERDICT_COLUMNS))


def condition_intervals(per_seed: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> pd.DataFrame:
    """Per regularized condition: the t interval of its mean paired harm (columns condition, harm_lo, harm_hi)."""
    rows = []
    for name, g in per_seed[per_seed["alpha"] != 0].groupby("condition", sort=False):
        iv = I.t_interval(g["harm"].to_numpy(dtype=np.float64), rules["confidence"]).item()
        rows.append({"condition": name, "harm_lo": iv.lo, "harm_hi": iv.hi})
    return pd.DataFrame(rows, columns=["condition", "harm_lo", "harm_hi"])


__all__ = ["WINDOW_RULES", "RULES_VERSION", "RULES_DECLARED", "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "Q_EARLIEST",
           "Q_MORE", "Q_LITTLE", "Q_PROMOTE_FINAL", "Q_PROMOTE_END", "PER_SEED_COLUMNS", "VERDICT_COLUMNS",
           "suppression_rule", "promotion_rule", "paired", "spearman", "suppression_parts", "promotion_parts", "mde",
           "simulate_suppression", "simulate_promotion", "EFFECTS", "scenarios", "family_rows", "verdicts", "condition_intervals"]
