"""The mechanism study's three questions, their statistics and verdicts (issue "By which mechanism?").

Rule set 1, declared on 2026-12-05 before the mechanism study was measured (RULES_VERSION, RULES_DECLARED; the
study's runs were training, no table of them had been read). The study (`csn experiment windows --preset
mechanism`) trains, with the same seeds, a baseline, the regularized stages suppressed from step 0 to the end and
from the late onset to the end, and rewinds of the same stages (csn.training.interventions.rewind) at the
selectivity peak and at the late onset. Every quantity is a per-seed value or a per-seed difference to the
baseline of the same seed; every interval is a two-sided t interval over seeds (csn.core.inference).

(a) **Does early suppression lower the regularized stages' probe accuracy at the window's end?**
    Per seed: drop = baseline probe accuracy - suppressed probe accuracy at the end of the early window (the
    suppression from step 0; its window ends with training), the probe accuracy of the regularized stages being
    the mean of their per-stage linear-probe test accuracies (csn.analysis.probe). Holds: interval above 0 and
    mean >= min_probe_drop; does not hold: the interval's upper end below min_probe_drop (no drop of that size);
    inconclusive otherwise, with fewer than min_seeds seeds, or when the suppression did not take (the stages'
    CSI at the window's end lowered by less than min_csi_reduction of the baseline's, paired mean).
(b) **Does the Fisher-trace peak come within the selectivity peak's step range?**
    Per baseline seed, over its measured checkpoints in the first half of training: the step of the maximum of
    the regularized stages' Fisher-information trace (summed over the stages, csn.analysis.fisher) and the step
    of the maximum of their live-unit mean CSI; lag = log2((fisher step + s1) / (CSI step + s1)) in octaves, s1 the
    first checkpoint after initialization (so step 0 has a finite position one octave before s1). Holds (within):
    the interval lies inside (-peak_octaves, +peak_octaves); does not hold: it lies wholly beyond one of them (the
    Fisher peak comes more than peak_octaves earlier or later); inconclusive otherwise (an equivalence test: at a
    true lag of exactly peak_octaves "holds" comes at most (1 - confidence) / 2 of the time).
(c) **Does a rewind right after the peak harm as much as suppression from step 0?**
    Per seed: d = harm(rewind) - harm(suppression from step 0) = accuracy(suppressed) - accuracy(rewound), final
    test accuracy after BatchNorm re-estimation (harm as in the critical-period map: baseline - condition). The
    rewind judged is the first rewind condition at the selectivity peak with source step 0 (re-initialization:
    the strongest). Holds (as much): the interval's lower end above -as_much (the rewind harms at most as_much
    less than the suppression: a non-inferiority test); does not hold: the interval's upper end below -as_much
    (it harms less by more than as_much); inconclusive otherwise, with fewer than min_seeds seeds, or when the
    suppression from step 0 does not itself harm (its harm's verdict by the map's rule is not "holds": then
    "as much" says nothing).

The per-run spread the dry run plans power with is MECHANISM_SPREAD (probe accuracy and the lag: assumptions, not
measurements, until the study has run; the accuracy SD is the regime study's measured one).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from csn.core import inference as I

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = I.HOLDS, I.DOES_NOT_HOLD, I.INCONCLUSIVE

RULES_VERSION = 1
RULES_DECLARED = "2026-12-05"

MECHANISM_RULES: dict[str, float] = {
    # Two-sided confidence of every t interval over seeds.
    "confidence": I.CONFIDENCE,
    # A question is answered with at least this many seeds paired with the baseline.
    "min_seeds": 3,
    # (a) the smallest drop of probe accuracy that counts (one point of test accuracy).
    "min_probe_drop": 0.01,
    # (a) the suppression took: the regularized stages' CSI at the window's end lowered by at least this share.
    "min_csi_reduction": 0.5,
    # (b) "within the selectivity peak's range": the Fisher peak within this many octaves (factor 2) of it.
    "peak_octaves": 1.0,
    # (c) "as much": the rewind's harm at most this much (half a point of accuracy) below the suppression's.
    "as_much": 0.005,
    # (c) the suppression from step 0 harms: its paired harm's interval above 0 and mean >= this (the map's min_harm).
    "min_harm": 0.0025,
}

Q_PROBE = "early suppression lowers the regularized stages' probe accuracy at the window's end"
Q_FISHER = "the Fisher-trace peak comes within the selectivity peak's step range"
Q_REWIND = "a rewind right after the peak harms as much as suppression from step 0"
QUESTIONS = (Q_PROBE, Q_FISHER, Q_REWIND)

MECHANISM_SPREAD: dict[str, float] = {
    # per-run SD of final test accuracy at a constant learning rate (measured: the regime study's 2-epoch baselines)
    "acc_sd": 0.0031,
    # per-run SD of the regularized stages' probe accuracy (assumed; to be replaced by the study's own)
    "probe_sd": 0.005,
    # per-seed SD of the peak lag in octaves (assumed: one checkpoint of the doubling schedule either way)
    "lag_sd": 0.7,
}
"""The spreads the planned power is simulated with (the tests check the rules' error rates at them)."""

EFFECTS: dict[str, float] = {"probe": 0.03, "lag": 0.0, "rewind": 0.0}
"""Declared effects for planning: a 3-point probe drop; the peaks at the same step; a rewind as harmful as the
suppression."""


def probe_parts(drop: np.ndarray, rules: Mapping[str, float] = MECHANISM_RULES) -> dict:
    """(a) from per-seed probe-accuracy drops [..., seeds] (baseline - suppressed)."""
    iv = I.t_interval(drop, rules["confidence"])
    return {"interval": iv, "codes": I.directional(iv, rules["min_probe_drop"])}


def lag_octaves(fisher_step: np.ndarray, csi_step: np.ndarray, first_step: int) -> np.ndarray:
    """log2((fisher step + s1) / (CSI step + s1)), s1 = the first checkpoint after initialization."""
    f, c = np.asarray(fisher_step, dtype=np.float64), np.asarray(csi_step, dtype=np.float64)
    return np.log2((f + first_step) / (c + first_step))


def within(iv: I.Interval, bound: float) -> np.ndarray:
    """Equivalence: holds if the interval lies inside (-bound, bound); does not hold if it lies wholly beyond one
    of them; inconclusive otherwise."""
    with np.errstate(invalid="ignore"):
        inside = (iv.lo > -bound) & (iv.hi < bound)
        beyond = (iv.lo > bound) | (iv.hi < -bound)
    return np.where(inside, 1, np.where(beyond, -1, 0)).astype(np.int8)


def fisher_parts(lag: np.ndarray, rules: Mapping[str, float] = MECHANISM_RULES) -> dict:
    """(b) from per-seed lags in octaves [..., seeds]."""
    iv = I.t_interval(lag, rules["confidence"])
    return {"interval": iv, "codes": within(iv, rules["peak_octaves"])}


def rewind_parts(d: np.ndarray, suppression_harm: np.ndarray, rules: Mapping[str, float] = MECHANISM_RULES) -> dict:
    """(c) from per-seed d = harm(rewind) - harm(suppression) and the suppression's own harm [..., seeds]: the
    non-inferiority codes, gated on the suppression harming (its directional verdict holds)."""
    conf, m = rules["confidence"], rules["as_much"]
    iv, harm = I.t_interval(d, conf), I.t_interval(suppression_harm, conf)
    harms = I.directional(harm, rules["min_harm"]) == 1
    with np.errstate(invalid="ignore"):
        codes = np.where(iv.lo > -m, 1, np.where(iv.hi < -m, -1, 0)).astype(np.int8)
    return {"interval": iv, "harm": harm, "suppression_harms": harms, "codes": np.where(harms, codes, 0).astype(np.int8)}


# ------------------------------------------------------------------------------------------------
# simulation: each rule applied to simulated studies (tests and the planned power)
# ------------------------------------------------------------------------------------------------

def simulate_probe(sd: float = MECHANISM_SPREAD["probe_sd"]) -> I.Simulate:
    """(a): baseline and suppressed probe accuracy per seed, each with per-run noise sd; the suppression lowers it by
    `effect`."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        base, cond = rng.normal(0, sd, (2, studies, seeds))
        return probe_parts(base - (cond - effect))["codes"]
    return sim


def simulate_lag(sd: float = MECHANISM_SPREAD["lag_sd"]) -> I.Simulate:
    """(b): per-seed lags around a true lag of `effect` octaves with noise sd."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        return fisher_parts(effect + rng.normal(0, sd, (studies, seeds)))["codes"]
    return sim


def simulate_rewind(sd: float = MECHANISM_SPREAD["acc_sd"], suppression: float = 0.0127) -> I.Simulate:
    """(c): per seed a baseline, a suppressed and a rewound run (accuracy noise sd each); the suppression costs
    `suppression` (default: the regime study's 1.27 points from step 0), the rewind `suppression + effect`
    (effect = d, negative: the rewind harms less)."""
    def sim(rng: np.random.Generator, effect: float, seeds: int, studies: int) -> np.ndarray:
        base, sup, rew = rng.normal(0, sd, (3, studies, seeds))
        sup, rew = sup - suppression, rew - (suppression + effect)
        return rewind_parts(sup - rew, base - sup)["codes"]
    return sim


def planned_power(seeds: int, studies: int = I.SIM_STUDIES, acc_sd: float = MECHANISM_SPREAD["acc_sd"]) -> list[dict]:
    """Per question: the power at `seeds` under the declared effect (EFFECTS) and the rate of the opposite verdict;
    acc_sd: the per-run SD of final accuracy (the study's preset's run_sd)."""
    out = []
    for q, sim, effect in ((Q_PROBE, simulate_probe(), EFFECTS["probe"]), (Q_FISHER, simulate_lag(), EFFECTS["lag"]),
                           (Q_REWIND, simulate_rewind(acc_sd), EFFECTS["rewind"])):
        r = I.rates(sim, effect, seeds, studies)
        out.append({"question": q, "effect": effect, "seeds": seeds, **r})
    return out


def verdict_row(question: str, parts: dict, why: str | None, n: int, minimal: float, rules: Mapping[str, float]) -> dict:
    """One answer row: the verdict word (inconclusive with a reason when gated), the interval and what was seen."""
    one = parts["interval"].item()
    code = parts["codes"]
    verdict = INCONCLUSIVE if why or n < rules["min_seeds"] else I.word(code)
    if n < rules["min_seeds"] and not why:
        why = f"{n} seeds, fewer than {int(rules['min_seeds'])}"
    seen = f"{one.mean:.4f} [{one.lo:.4f}, {one.hi:.4f}] over {n} seeds" if n else "nothing measured"
    return {"question": question, "verdict": verdict, "estimate": one.mean if n else math.nan,
            "lo": one.lo if n else math.nan, "hi": one.hi if n else math.nan, "minimal": minimal, "n_seeds": n,
            "observed": seen + (f"; {why}" if why else ""), "rules_version": RULES_VERSION}


__all__ = ["RULES_VERSION", "RULES_DECLARED", "MECHANISM_RULES", "MECHANISM_SPREAD", "EFFECTS", "QUESTIONS", "Q_PROBE",
           "Q_FISHER", "Q_REWIND", "probe_parts", "lag_octaves", "within", "fisher_parts", "rewind_parts",
           "simulate_probe", "simulate_lag", "simulate_rewind", "planned_power", "verdict_row"]
