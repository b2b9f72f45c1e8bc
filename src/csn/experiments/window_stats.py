"""The critical-period map's statistic and verdicts, declared before any map was run (SPEC "Pairing and the
critical-period map").

Conditions share seeds with the baseline, so the effect of a condition is the per-seed difference to the
baseline of the same seed (paired): **harm** = baseline final test accuracy - condition final test
accuracy. A *family* is one (alpha, stage set) over its windows. Per family:

- the paired mean harm of every window, its paired SE (over seeds) beside the unpaired SE;
- the trend: Spearman rho between the window start (in steps) and the mean paired harm over the family's
  windows ("early windows harm more than late ones" is rho < 0);
- the harm of the earliest window;
- percentile bootstrap CIs over seeds for all of them (seeds resampled with replacement, the same resample
  for every window and the baseline, so the pairing is kept; seeded, so the numbers repeat);
- a verdict by the rules below (WINDOW_RULES and the rule texts, printed with the results).

Every threshold lives in WINDOW_RULES. csn reports what it saw; it does not advocate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd

from csn.core.stats import standard_error

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"

WINDOW_RULES: dict[str, float] = {
    # Two-sided confidence of every bootstrap interval (percentile bootstrap over seeds) ...
    "confidence": 0.95,
    # ... from this many resamples of the seeds, drawn with this seed (so the numbers repeat).
    "bootstrap_resamples": 2000,
    "bootstrap_seed": 0,
    # A family needs at least this many seeds (paired with the baseline) to be judged ...
    "min_seeds": 3,
    # ... and, for the trend over windows, at least this many windows.
    "min_windows": 3,
    # The smallest change of final (or early) test accuracy that counts as an effect (0.2 points).
    "min_harm": 0.002,
    # Suppression is only judged when the earliest window lowered the regularized stages' mean CSI at the
    # window's end by at least this share of the baseline's CSI at the same step (paired, mean over seeds) ...
    "min_csi_reduction": 0.5,
    # ... and promotion when it raised it by at least this share.
    "min_csi_increase": 0.2,
}

SUPPRESSION_QUESTION = "early windows harm more than late ones"
PROMOTION_QUESTION = "early promotion changes accuracy (final, or at the end of the window)"

VERDICT_COLUMNS = ("kind", "alpha", "stage_set", "question", "verdict", "n_windows", "n_seeds", "windows", "rho", "rho_lo",
                   "rho_hi", "earliest_window", "earliest_harm", "earliest_harm_lo", "earliest_harm_hi", "earliest_gap",
                   "earliest_gap_lo", "earliest_gap_hi", "earliest_csi_reduction", "observed", "rule")
"""Columns of windows_verdicts.parquet (one row per alpha and stage set)."""

PER_SEED_COLUMNS = ("alpha", "stage_set", "window", "start_step", "end_step", "seed", "harm", "early_gap",
                    "csi_reduction_end")
"""What the statistic reads from the per-seed table (one row per regularized condition and seed)."""


def _pct(x: float) -> str:
    return f"{x:.0%}"


def suppression_rule(rules: Mapping[str, float] = WINDOW_RULES) -> str:
    """The suppression verdict's rule in words (printed with the results)."""
    r = rules
    return (f"paired harm = baseline − condition final test accuracy, same seed; trend = Spearman ρ between window start "
            f"and mean paired harm over the windows of one (alpha, stage set); {_pct(r['confidence'])} percentile bootstrap "
            f"CIs over seeds ({int(r['bootstrap_resamples'])} resamples, seed {int(r['bootstrap_seed'])}). "
            f"holds: ρ's CI below 0 and the earliest window's harm >= {r['min_harm']:g} with its CI above 0; "
            f"does not hold: the earliest window's harm CI below {r['min_harm']:g}, or ρ's CI above 0; inconclusive "
            f"otherwise, or with < {int(r['min_seeds'])} seeds or < {int(r['min_windows'])} windows, or when the earliest "
            f"window lowered the regularized stages' CSI at its end (vs the baseline at that step) by < "
            f"{_pct(r['min_csi_reduction'])}.")


def promotion_rule(rules: Mapping[str, float] = WINDOW_RULES) -> str:
    """The promotion verdict's rule in words (printed with the results)."""
    r = rules
    return (f"earliest window: Δ final = condition − baseline final test accuracy, Δ early = the same at the window's end "
            f"checkpoint, same seed; {_pct(r['confidence'])} percentile bootstrap CIs over seeds. holds: either Δ's CI "
            f"excludes 0 with |mean| >= {r['min_harm']:g}; does not hold: both CIs inside ±{r['min_harm']:g}; "
            f"inconclusive otherwise, or with < {int(r['min_seeds'])} seeds, or when the window raised the regularized "
            f"stages' CSI at its end by < {_pct(r['min_csi_increase'])}.")


# ------------------------------------------------------------------------------------------------
# the numbers: paired and unpaired summaries, Spearman rho, bootstrap over seeds
# ------------------------------------------------------------------------------------------------

def paired(condition: np.ndarray, baseline: np.ndarray) -> dict[str, float]:
    """Paired harm (baseline - condition, per seed): mean, paired SE, and the unpaired SE beside it.

    The unpaired SE treats the two conditions as independent samples: sqrt(SE(baseline)² + SE(condition)²).
    """
    c, b = np.asarray(condition, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    h = b - c
    return {"harm_mean": float(h.mean()) if len(h) else float("nan"), "harm_se_paired": standard_error(h),
            "harm_se_unpaired": math.sqrt(standard_error(b) ** 2 + standard_error(c) ** 2) if len(h) > 1 else float("nan"),
            "n": len(h)}


def bootstrap_indices(n: int, rules: Mapping[str, float] = WINDOW_RULES) -> np.ndarray:
    """[resamples, n] indices of seeds drawn with replacement, from the rules' bootstrap seed."""
    rng = np.random.default_rng(int(rules["bootstrap_seed"]))
    return rng.integers(0, n, size=(int(rules["bootstrap_resamples"]), n))


def ci(samples: np.ndarray, rules: Mapping[str, float] = WINDOW_RULES) -> tuple[float, float]:
    """Two-sided percentile interval of bootstrap samples at the rules' confidence."""
    tail = (1 - float(rules["confidence"])) / 2
    s = np.asarray(samples, dtype=np.float64)
    return float(np.quantile(s, tail)), float(np.quantile(s, 1 - tail))


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rank correlation of x [W] with each row of y [..., W] (ties get average ranks).

    A row whose values are all equal has no order: its rho is defined as 0 (no trend). A row holding a NaN has
    no rho (NaN), so a missing value never reads as "no trend".
    """
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    rx = pd.Series(np.asarray(x, dtype=np.float64)).rank(method="average").to_numpy()
    ry = pd.DataFrame(y).rank(axis=1, method="average").to_numpy()
    rx = rx - rx.mean()
    ry = ry - ry.mean(axis=1, keepdims=True)
    den = np.sqrt((rx**2).sum() * (ry**2).sum(axis=1))
    num = (ry * rx).sum(axis=1)
    rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return np.where(np.isnan(y).any(axis=1) | np.isnan(rx).any(), np.nan, rho)


def _matrix(rows: pd.DataFrame, value: str, seeds: list[int]) -> np.ndarray:
    """[windows, seeds] of one column, windows in (start_step, end_step) order."""
    m = rows.pivot(index=["start_step", "end_step", "window"], columns="seed", values=value)
    return m.sort_index()[seeds].to_numpy(dtype=np.float64)


def family_statistics(rows: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> dict:
    """The numbers of one (alpha, stage set): per window mean harm; rho and the earliest window's harm and early
    accuracy gap with bootstrap CIs; the earliest window's mean CSI reduction. Seeds missing from any window of
    the family are left out (the pairing needs every window)."""
    windows = rows.drop_duplicates(["start_step", "end_step", "window"]).sort_values(["start_step", "end_step"])
    seeds = sorted(set.intersection(*(set(g["seed"]) for _, g in rows.groupby("window"))))
    out: dict = {"n_windows": len(windows), "n_seeds": len(seeds), "windows": list(windows["window"]),
                 "starts": [int(s) for s in windows["start_step"]], "earliest_window": str(windows["window"].iloc[0])}
    nan2 = (float("nan"), float("nan"))
    if not seeds:
        return {**out, "rho": float("nan"), "rho_ci": nan2, "earliest_harm": float("nan"), "earliest_harm_ci": nan2,
                "earliest_gap": float("nan"), "earliest_gap_ci": nan2, "earliest_csi_reduction": float("nan"),
                "harm_by_window": []}
    harm = _matrix(rows, "harm", seeds)
    gap = _matrix(rows, "early_gap", seeds)
    red = _matrix(rows, "csi_reduction_end", seeds)
    idx = bootstrap_indices(len(seeds), rules)
    harm_b, gap_b = harm[:, idx].mean(axis=-1), gap[:, idx].mean(axis=-1)  # [windows, resamples]
    starts = windows["start_step"].to_numpy(dtype=np.float64)
    trend = len(windows) >= 2
    out.update(
        harm_by_window=[float(v) for v in harm.mean(axis=1)],
        rho=float(spearman(starts, harm.mean(axis=1))[0]) if trend else float("nan"),
        rho_ci=ci(spearman(starts, harm_b.T), rules) if trend else nan2,
        earliest_harm=float(harm[0].mean()), earliest_harm_ci=ci(harm_b[0], rules),
        earliest_gap=float(gap[0].mean()), earliest_gap_ci=ci(gap_b[0], rules),
        earliest_csi_reduction=float(np.nanmean(red[0])) if np.isfinite(red[0]).any() else float("nan"),
    )
    return out


# ------------------------------------------------------------------------------------------------
# verdicts
# ------------------------------------------------------------------------------------------------

def judge_suppression(s: dict, rules: Mapping[str, float] = WINDOW_RULES) -> tuple[str, str]:
    """(verdict, reason) of "early windows harm more than late ones" from family_statistics."""
    r = rules
    if s["n_seeds"] < r["min_seeds"]:
        return INCONCLUSIVE, f"{s['n_seeds']} seeds paired with the baseline, fewer than {int(r['min_seeds'])}"
    if s["n_windows"] < r["min_windows"]:
        return INCONCLUSIVE, f"{s['n_windows']} windows, fewer than {int(r['min_windows'])} for a trend"
    red = s["earliest_csi_reduction"]
    if not math.isfinite(red):
        return INCONCLUSIVE, "no selectivity was measured at the end of the earliest window"
    if red < r["min_csi_reduction"]:
        return INCONCLUSIVE, (f"the earliest window lowered CSI by {_num(red, '.0%')}, less than {_pct(r['min_csi_reduction'])}:"
                              " the suppression did not take")
    (rlo, rhi), (hlo, hhi) = s["rho_ci"], s["earliest_harm_ci"]
    if hhi < r["min_harm"]:
        return DOES_NOT_HOLD, f"the earliest window's harm CI lies below {r['min_harm']:g}"
    if rlo > 0:
        return DOES_NOT_HOLD, "ρ's CI lies above 0: later windows harm more"
    if rhi < 0 and hlo > 0 and s["earliest_harm"] >= r["min_harm"]:
        return HOLDS, "ρ's CI lies below 0 and the earliest window harms"
    return INCONCLUSIVE, "the intervals do not decide"


def judge_promotion(s: dict, rules: Mapping[str, float] = WINDOW_RULES) -> tuple[str, str]:
    """(verdict, reason) of "early promotion changes accuracy" from family_statistics (harm = -change)."""
    r = rules
    if s["n_seeds"] < r["min_seeds"]:
        return INCONCLUSIVE, f"{s['n_seeds']} seeds paired with the baseline, fewer than {int(r['min_seeds'])}"
    inc = -s["earliest_csi_reduction"]
    if not math.isfinite(inc):
        return INCONCLUSIVE, "no selectivity was measured at the end of the earliest window"
    if inc < r["min_csi_increase"]:
        return INCONCLUSIVE, (f"the earliest window raised CSI by {_num(inc, '.0%')}, less than {_pct(r['min_csi_increase'])}:"
                              " the promotion did not take")
    m = r["min_harm"]
    final = (-s["earliest_harm"], tuple(-v for v in reversed(s["earliest_harm_ci"])))
    early = (s["earliest_gap"], s["earliest_gap_ci"])
    changed = [name for name, (mean, (lo, hi)) in (("final", final), ("early", early))
               if (lo > 0 or hi < 0) and abs(mean) >= m]
    if changed:
        return HOLDS, f"the {' and '.join(changed)} accuracy changed"
    if all(-m < lo and hi < m for _, (lo, hi) in (final, early)):
        return DOES_NOT_HOLD, f"both changes lie inside ±{m:g}"
    return INCONCLUSIVE, "the intervals do not decide"


def _num(x: float, fmt: str = ".4f") -> str:
    return "nan" if x is None or not math.isfinite(x) else format(x, fmt)


def _ci_text(pair: tuple[float, float], fmt: str = ".4f") -> str:
    return f"[{_num(pair[0], fmt)}, {_num(pair[1], fmt)}]"


def verdicts(per_seed: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> pd.DataFrame:
    """One row per (alpha, stage set) of the regularized conditions: the statistic, the verdict, the rule, and
    a sentence of what was seen. per_seed holds PER_SEED_COLUMNS (baseline rows, alpha 0, are ignored)."""
    missing = [c for c in PER_SEED_COLUMNS if c not in per_seed.columns]
    if missing:
        raise ValueError(f"the per-seed table lacks columns {missing}")
    reg = per_seed[per_seed["alpha"] != 0]
    out = []
    for (alpha, stage_set), rows in reg.groupby(["alpha", "stage_set"], sort=False):
        s = family_statistics(rows, rules)
        promote = alpha > 0
        verdict, why = (judge_promotion if promote else judge_suppression)(s, rules)
        trend = (f"ρ = {_num(s['rho'], '.2f')} {_ci_text(s['rho_ci'], '.2f')}" if s["n_windows"] > 1 else "no trend (one window)")
        observed = (f"{s['n_windows']} window(s), {s['n_seeds']} seeds; {trend}; "
                    f"earliest window {s['earliest_window']}: harm {_num(s['earliest_harm'])} {_ci_text(s['earliest_harm_ci'])}, "
                    f"early accuracy change {_num(s['earliest_gap'])} {_ci_text(s['earliest_gap_ci'])}, CSI at its end "
                    f"{_num(-s['earliest_csi_reduction'], '+.0%')} vs baseline; {why}")
        out.append({"kind": "promote" if promote else "suppress", "alpha": float(alpha), "stage_set": stage_set,
                    "question": PROMOTION_QUESTION if promote else SUPPRESSION_QUESTION, "verdict": verdict,
                    "n_windows": s["n_windows"], "n_seeds": s["n_seeds"], "windows": ", ".join(s["windows"]),
                    "rho": s["rho"], "rho_lo": s["rho_ci"][0], "rho_hi": s["rho_ci"][1],
                    "earliest_window": s["earliest_window"], "earliest_harm": s["earliest_harm"],
                    "earliest_harm_lo": s["earliest_harm_ci"][0], "earliest_harm_hi": s["earliest_harm_ci"][1],
                    "earliest_gap": s["earliest_gap"], "earliest_gap_lo": s["earliest_gap_ci"][0],
                    "earliest_gap_hi": s["earliest_gap_ci"][1], "earliest_csi_reduction": s["earliest_csi_reduction"],
                    "observed": observed, "rule": promotion_rule(rules) if promote else suppression_rule(rules)})
    return pd.DataFrame(out, columns=list(VERDICT_COLUMNS))


def condition_intervals(per_seed: pd.DataFrame, rules: Mapping[str, float] = WINDOW_RULES) -> pd.DataFrame:
    """Per regularized condition: the bootstrap CI of its mean paired harm (columns condition, harm_lo, harm_hi)."""
    rows = []
    for name, g in per_seed[per_seed["alpha"] != 0].groupby("condition", sort=False):
        h = g["harm"].to_numpy(dtype=np.float64)
        h = h[np.isfinite(h)]
        lo, hi = ci(h[bootstrap_indices(len(h), rules)].mean(axis=-1), rules) if len(h) else (float("nan"),) * 2
        rows.append({"condition": name, "harm_lo": lo, "harm_hi": hi})
    return pd.DataFrame(rows, columns=["condition", "harm_lo", "harm_hi"])


__all__ = ["WINDOW_RULES", "HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "SUPPRESSION_QUESTION", "PROMOTION_QUESTION",
           "PER_SEED_COLUMNS", "VERDICT_COLUMNS", "suppression_rule", "promotion_rule", "paired", "bootstrap_indices", "ci", "spearman",
           "family_statistics", "judge_suppression", "judge_promotion", "verdicts", "condition_intervals"]
