"""Inference over seeds: the one statistics module behind every verdict csn gives (claims C1-C4, the
critical-period map, the regime study), and the power of those verdicts.

The unit of replication is the **seed**. A quantity is measured once per seed: a paired difference between
two conditions trained with the same seed (same initialization, same batches), a per-seed contrast, or a
per-seed level. Its estimate is the mean over seeds and its interval a two-sided **Student t interval** on
those n values. That interval is right at n = 2-10 when the per-seed values are roughly normal. Two
alternatives are not used, on purpose: a percentile bootstrap over 3 seeds has 10 distinct resamples, so
its "95 %" interval is the seeds' [min, max] (about a 75 % interval); an exact sign-flip test over 3-4 seeds
cannot reach 95 % at all (its smallest one-sided p-value is 1/8 or 1/16).

A verdict is three-valued, by a rule declared before the data are seen (SPEC "Statistics of verdicts"):

    holds          the interval excludes 0 in the claimed direction and the estimate is at least the
                   declared minimal effect;
    does not hold  the interval lies inside the negligible range: evidence of absence. For a claimed direction
                   (a harm, a recession) that range is everything below +minimal, so the interval's far
                   end must lie below the minimal effect (a one-sided test at (1 - confidence) / 2; an
                   effect clearly in the other direction is evidence against the claim too); for a change
                   of either sign it is (-minimal, +minimal) (an equivalence test, two one-sided tests);
    inconclusive   otherwise, printed with the minimal detectable effect at the seeds used.

"holds" needs estimate >= minimal and "does not hold" needs the estimate below it, so the two never meet.
Under a zero effect a directional "holds" comes at most (1 - confidence) / 2 = 2.5 % of the time; a rule
that needs several parts to hold (all_of) is an intersection-union test and keeps that bound.

Every function is vectorized over leading axes (the last axis is seeds; NaN values are left out), so the
simulation tests and the dry-run's power estimates call the very rule functions the verdicts use, on
thousands of simulated studies at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
CODES = {1: HOLDS, -1: DOES_NOT_HOLD, 0: INCONCLUSIVE}
"""Verdict codes of the vectorized rules: 1 holds, -1 does not hold, 0 inconclusive."""

CONFIDENCE = 0.95
"""Two-sided confidence of every interval csn prints and judges with."""

POWER = 0.8
"""The power at which a minimal detectable effect and the seeds a declared effect needs are given."""


@dataclass(frozen=True)
class Interval:
    """Mean over seeds with its two-sided t interval (arrays over leading axes, or floats): mean, lo, hi,
    the standard error, the per-seed standard deviation and the number of seeds."""

    mean: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    se: np.ndarray
    sd: np.ndarray
    n: np.ndarray

    def item(self) -> Interval:
        """The same interval with Python floats (for one study)."""
        return Interval(*(float(np.asarray(v).reshape(-1)[0]) for v in
                          (self.mean, self.lo, self.hi, self.se, self.sd, self.n)))

    def to_dict(self) -> dict[str, float]:
        one = self.item()
        return {"mean": one.mean, "lo": one.lo, "hi": one.hi, "se": one.se, "sd": one.sd, "n": int(one.n)}

    def text(self, fmt: str = ".4f", scale: float = 1.0) -> str:
        """'0.0123 [0.0040, 0.0206]' (values times scale, e.g. 100 for points)."""
        one = self.item()

        def f(v: float) -> str:
            return "nan" if not math.isfinite(v) else format(v * scale, fmt)
        return f"{f(one.mean)} [{f(one.lo)}, {f(one.hi)}]"


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Mean over the last axis (seeds) and its two-sided Student t interval; NaNs are left out, and an
    interval over fewer than 2 values is NaN."""
    x = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(x)
    n = ok.sum(axis=-1)
    xs = np.where(ok, x, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, xs.sum(axis=-1) / np.maximum(n, 1), np.nan)
        dev = np.where(ok, x - mean[..., None], 0.0)
        sd = np.where(n > 1, np.sqrt((dev**2).sum(axis=-1) / np.maximum(n - 1, 1)), np.nan)
        se = sd / np.sqrt(np.maximum(n, 1))
        from scipy import stats  # here, not at the top: 0.4 s of every csn process start, only verdicts use it

        t = stats.t.ppf(0.5 + confidence / 2, np.maximum(n - 1, 1))
        half = np.where(n > 1, t * se, np.nan)
    return Interval(mean, mean - half, mean + half, se, sd, n)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[list[int], np.ndarray]:
    """The seeds both conditions have (sorted) and the per-seed differences a - b; seeds whose value is
    missing or not finite in either are left out."""
    seeds = sorted(s for s in set(a) & set(b)
                   if a[s] is not None and b[s] is not None and math.isfinite(a[s]) and math.isfinite(b[s]))
    return seeds, np.array([float(a[s]) - float(b[s]) for s in seeds], dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# the rule shapes (codes: 1 holds, -1 does not hold, 0 inconclusive; vectorized)
# ------------------------------------------------------------------------------------------------

def _codes(holds, fails) -> np.ndarray:
    return np.where(holds, 1, np.where(fails, -1, 0)).astype(np.int8)


def directional(iv: Interval, minimal: float, direction: int = 1) -> np.ndarray:
    """An effect in the claimed direction (+1: positive, -1: negative): holds if the interval excludes 0 on
    that side and direction * mean >= minimal; does not hold if the whole interval lies below the minimal effect
    in the claimed direction (direction * far end < minimal: no effect of the claimed size, or one the other way)."""
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    lo, hi, mean = (iv.lo, iv.hi, iv.mean) if direction == 1 else (-iv.hi, -iv.lo, -iv.mean)
    with np.errstate(invalid="ignore"):
        return _codes((lo > 0) & (mean >= minimal), hi < minimal)


def two_sided(iv: Interval, minimal: float) -> np.ndarray:
    """An effect of either sign ("changes"): holds if the interval excludes 0 and |mean| >= minimal; does not
    hold if the interval lies inside (-minimal, minimal)."""
    with np.errstate(invalid="ignore"):
        return _codes(((iv.lo > 0) | (iv.hi < 0)) & (np.abs(iv.mean) >= minimal),
                      (iv.lo > -minimal) & (iv.hi < minimal))


def below(iv: Interval, bound: float) -> np.ndarray:
    """"At most bound" (e.g. a cost that is little): holds if the whole interval lies below bound; does not
    hold if it lies above."""
    with np.errstate(invalid="ignore"):
        return _codes(iv.hi < bound, iv.lo > bound)


def at_least(iv: Interval, level: float) -> np.ndarray:
    """"At least level" (e.g. near linear): holds if the whole interval lies at or above level; does not hold
    if it lies below."""
    with np.errstate(invalid="ignore"):
        return _codes(iv.lo >= level, iv.hi < level)


def all_of(*codes) -> np.ndarray:
    """Every part must hold (an intersection-union test): holds if all hold, does not hold if any does not,
    inconclusive otherwise."""
    return np.minimum.reduce([np.asarray(c, dtype=np.int8) for c in codes])


def majority(codes, axis: int = -1) -> np.ndarray:
    """Over parts (stages, measures) on `axis`: holds if more than half hold, does not hold if more than half
    do not, inconclusive otherwise."""
    c = np.asarray(codes, dtype=np.int8)
    n = c.shape[axis]
    return _codes((c == 1).sum(axis=axis) > n / 2, (c == -1).sum(axis=axis) > n / 2)


def word(code) -> str:
    """The verdict word of one code."""
    return CODES[int(np.asarray(code).reshape(-1)[0])]


# ------------------------------------------------------------------------------------------------
# power: a verdict's rule applied to simulated studies
# ------------------------------------------------------------------------------------------------

Simulate = Callable[[np.random.Generator, float, int, int], np.ndarray]
"""simulate(rng, effect, seeds, studies) -> verdict codes [studies]: draw `studies` studies of `seeds` seeds
each from a verdict's table shapes with the given true effect, and judge each by the verdict's own rule."""

SIM_STUDIES = 2000
SIM_SEED = 0


def rates(simulate: Simulate, effect: float, seeds: int, studies: int = SIM_STUDIES, seed: int = SIM_SEED) -> dict[str, float]:
    """Shares of holds / does not hold / inconclusive over simulated studies at one true effect."""
    c = np.asarray(simulate(np.random.default_rng(seed), float(effect), int(seeds), int(studies)))
    return {HOLDS: float((c == 1).mean()), DOES_NOT_HOLD: float((c == -1).mean()), INCONCLUSIVE: float((c == 0).mean())}


def power(simulate: Simulate, effect: float, seeds: int, studies: int = SIM_STUDIES, seed: int = SIM_SEED) -> float:
    """P(holds) at a true effect, by simulation (the same random numbers for every effect and seed count)."""
    return rates(simulate, effect, seeds, studies, seed)[HOLDS]


def minimal_detectable_effect(simulate: Simulate, seeds: int, upper: float, target: float = POWER,
                              studies: int = SIM_STUDIES, tol: float = 1e-3) -> float:
    """The smallest true effect at which the rule says "holds" with probability >= target at this many seeds
    (bisection on [0, upper], to tol relative to upper); inf when even `upper` falls short."""
    if power(simulate, upper, seeds, studies) < target:
        return math.inf
    lo, hi = 0.0, float(upper)
    while hi - lo > tol * upper:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if power(simulate, mid, seeds, studies) >= target else (mid, hi)
    return hi


def seeds_needed(simulate: Simulate, effect: float, target: float = POWER, most: int = 50,
                 studies: int = SIM_STUDIES) -> int | None:
    """The fewest seeds (2..most) at which the rule says "holds" with probability >= target at `effect`;
    None when even `most` seeds fall short."""
    for n in range(2, most + 1):
        if power(simulate, effect, n, studies) >= target:
            return n
    return None


__all__ = ["HOLDS", "DOES_NOT_HOLD", "INCONCLUSIVE", "CODES", "CONFIDENCE", "POWER", "Interval", "t_interval",
           "paired", "directional", "two_sided", "below", "at_least", "all_of", "majority", "word", "Simulate",
           "SIM_STUDIES", "SIM_SEED", "rates", "power", "minimal_detectable_effect", "seeds_needed"]
