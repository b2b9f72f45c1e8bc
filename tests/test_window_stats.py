"""The critical-period map's declared statistic: paired harm, Spearman rho, bootstrap CIs over seeds, and the
verdicts on hand-made tables with known trends (against naive float64 references where it computes a number)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from csn.experiments import window_stats as W
from csn.experiments.window_stats import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE, WINDOW_RULES

STARTS = [0, 20, 40, 60, 80, 700]


# ------------------------------------------------------------------------------------------------
# naive references
# ------------------------------------------------------------------------------------------------

def _naive_ranks(v: list[float]) -> list[float]:
    order = sorted(range(len(v)), key=lambda i: v[i])
    ranks = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _naive_spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _naive_ranks(x), _naive_ranks(y)
    mx, my = math.fsum(rx) / len(rx), math.fsum(ry) / len(ry)
    num = math.fsum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(math.fsum((a - mx) ** 2 for a in rx) * math.fsum((b - my) ** 2 for b in ry))
    return num / den if den > 0 else 0.0


def _naive_quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    h = (len(s) - 1) * q
    lo = math.floor(h)
    return s[lo] + (h - lo) * (s[min(lo + 1, len(s) - 1)] - s[lo])


def _naive_se(v: list[float]) -> float:
    m = math.fsum(v) / len(v)
    return math.sqrt(math.fsum((a - m) ** 2 for a in v) / (len(v) - 1)) / math.sqrt(len(v))


def _table(harm: list[list[float]], *, alpha: float = -1.0, stage_set: str = "default", starts=STARTS, gap=None,
           csi_reduction: float = 0.9, seeds=None) -> pd.DataFrame:
    """Per-seed rows of one family: harm[window][seed]."""
    rows = []
    seeds = seeds or list(range(len(harm[0])))
    for w, (start, hs) in enumerate(zip(starts, harm)):
        for s, h in zip(seeds, hs):
            rows.append(dict(condition=f"a{alpha:+g}_w{start}_{stage_set}", alpha=alpha, stage_set=stage_set,
                             window=f"step={start}:step={start + 20}", start_step=start, end_step=start + 20, seed=s,
                             harm=h, early_gap=(gap[w][s] if gap else -h), csi_reduction_end=csi_reduction))
    return pd.DataFrame(rows)


def _jitter(values, seeds=3, scale=0.0005, seed=0):
    rng = np.random.default_rng(seed)
    return [[v + scale * rng.standard_normal() for _ in range(seeds)] for v in values]


# ------------------------------------------------------------------------------------------------
# numbers against references
# ------------------------------------------------------------------------------------------------

def test_spearman_matches_naive_reference_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(50):
        w = int(rng.integers(2, 8))
        x = rng.integers(0, 4, size=w).astype(float)  # ties in the starts too
        y = rng.integers(0, 5, size=(6, w)).astype(float)
        got = W.spearman(x, y)
        for row, g in zip(y, got):
            assert abs(g - _naive_spearman(list(x), list(row))) < 1e-12
    assert W.spearman([0, 1, 2], [[5, 5, 5]])[0] == 0.0  # no order: no trend
    assert W.spearman([0, 1, 2], [[3, 2, 1]])[0] == pytest.approx(-1.0)


def test_paired_and_unpaired_se_against_reference():
    rng = np.random.default_rng(1)
    base = 0.9 + 0.01 * rng.standard_normal(5)
    cond = base - 0.004 + 0.001 * rng.standard_normal(5)
    p = W.paired(cond, base)
    h = [b - c for b, c in zip(base.tolist(), cond.tolist())]
    assert abs(p["harm_mean"] - math.fsum(h) / 5) < 1e-15
    assert abs(p["harm_se_paired"] - _naive_se(h)) < 1e-15
    assert abs(p["harm_se_unpaired"] - math.sqrt(_naive_se(base.tolist()) ** 2 + _naive_se(cond.tolist()) ** 2)) < 1e-15
    assert p["harm_se_paired"] < p["harm_se_unpaired"] / 3  # pairing removes the seed-to-seed noise


def test_family_statistics_against_a_naive_bootstrap():
    harm = _jitter([0.02, 0.015, 0.01, 0.004, 0.002, 0.001], seeds=4, scale=0.004, seed=7)
    s = W.family_statistics(_table(harm))
    idx = W.bootstrap_indices(4)
    assert idx.shape == (int(WINDOW_RULES["bootstrap_resamples"]), 4)
    rhos, early = [], []
    for row in idx.tolist():
        means = [math.fsum(hw[i] for i in row) / len(row) for hw in harm]
        rhos.append(_naive_spearman([float(v) for v in STARTS], means))
        early.append(means[0])
    tail = (1 - WINDOW_RULES["confidence"]) / 2
    assert s["rho_ci"][0] == pytest.approx(_naive_quantile(rhos, tail), abs=1e-12)
    assert s["rho_ci"][1] == pytest.approx(_naive_quantile(rhos, 1 - tail), abs=1e-12)
    assert s["earliest_harm_ci"][0] == pytest.approx(_naive_quantile(early, tail), abs=1e-15)
    assert s["earliest_harm_ci"][1] == pytest.approx(_naive_quantile(early, 1 - tail), abs=1e-15)
    assert s["rho"] == pytest.approx(_naive_spearman([float(v) for v in STARTS], [math.fsum(h) / 4 for h in harm]))
    assert s["earliest_harm"] == pytest.approx(math.fsum(harm[0]) / 4, abs=1e-15)
    # seeded: the same numbers every time
    assert W.family_statistics(_table(harm)) == s


# ------------------------------------------------------------------------------------------------
# verdicts on tables with known trends
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trend, harm, verdict", [
    ("early windows harm more", [0.03, 0.02, 0.012, 0.006, 0.003, 0.0], HOLDS),
    ("late windows harm more", [0.005, 0.008, 0.012, 0.02, 0.025, 0.03], DOES_NOT_HOLD),
    ("flat at zero", [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], DOES_NOT_HOLD),
])
def test_suppression_verdicts_on_known_trends(trend, harm, verdict):
    v = W.verdicts(_table(_jitter(harm)))
    assert len(v) == 1 and v["verdict"].iloc[0] == verdict, (trend, v["observed"].iloc[0])
    assert v["kind"].iloc[0] == "suppress" and v["question"].iloc[0] == W.SUPPRESSION_QUESTION
    assert v["rule"].iloc[0] == W.suppression_rule()


def test_flat_but_harmful_is_inconclusive():
    rng = np.random.default_rng(5)
    harm = [[0.01 + 0.004 * rng.standard_normal() for _ in range(3)] for _ in STARTS]  # no order in the means
    v = W.verdicts(_table(harm)).iloc[0]
    assert v["verdict"] == INCONCLUSIVE and v["rho_lo"] < 0 < v["rho_hi"], v["observed"]


@pytest.mark.parametrize("kw, reason", [
    (dict(seeds=[0, 1]), "fewer than 3"),
    (dict(csi_reduction=0.3), "did not take"),
    (dict(csi_reduction=float("nan")), "no selectivity was measured"),
])
def test_suppression_preconditions(kw, reason):
    harm = _jitter([0.03, 0.02, 0.012, 0.006, 0.003, 0.0], seeds=len(kw.get("seeds", [0, 1, 2])))
    v = W.verdicts(_table(harm, **kw)).iloc[0]
    assert v["verdict"] == INCONCLUSIVE and reason in v["observed"]


def test_two_windows_are_too_few_for_a_trend():
    v = W.verdicts(_table(_jitter([0.03, 0.0]), starts=[0, 700])).iloc[0]
    assert v["verdict"] == INCONCLUSIVE and "windows, fewer than 3" in v["observed"]


def test_promotion_verdicts():
    up = dict(alpha=1.0, csi_reduction=-0.5, starts=[0, 700])
    # final accuracy unchanged, but the accuracy at the window's end clearly higher
    v = W.verdicts(_table(_jitter([0.0, 0.0]), gap=_jitter([0.02, 0.0]), **up)).iloc[0]
    assert v["kind"] == "promote" and v["verdict"] == HOLDS and "early accuracy changed" in v["observed"]
    v = W.verdicts(_table(_jitter([0.0, 0.0], scale=0.0002), gap=_jitter([0.0, 0.0], scale=0.0002), **up)).iloc[0]
    assert v["verdict"] == DOES_NOT_HOLD
    v = W.verdicts(_table(_jitter([0.0, 0.0]), **{**up, "csi_reduction": -0.05})).iloc[0]
    assert v["verdict"] == INCONCLUSIVE and "promotion did not take" in v["observed"]


def test_families_are_judged_apart_and_baseline_rows_ignored():
    a = _table(_jitter([0.03, 0.02, 0.012, 0.006, 0.003, 0.0]), alpha=-5.0)
    b = _table(_jitter([0.0] * 6), alpha=-1.0)
    c = _table(_jitter([0.02]), stage_set="layer3", starts=[0], alpha=-5.0)
    base = pd.DataFrame([dict(alpha=0.0, stage_set="", window="", start_step=0, end_step=0, seed=s, harm=0.0,
                              early_gap=0.0, csi_reduction_end=float("nan")) for s in range(3)])
    v = W.verdicts(pd.concat([a, b, c, base], ignore_index=True)).set_index(["alpha", "stage_set"])
    assert len(v) == 3
    assert v.loc[(-5.0, "default"), "verdict"] == HOLDS and v.loc[(-1.0, "default"), "verdict"] == DOES_NOT_HOLD
    assert v.loc[(-5.0, "layer3"), "verdict"] == INCONCLUSIVE  # one window: no trend
    with pytest.raises(ValueError, match="lacks columns"):
        W.verdicts(a.drop(columns="harm"))


def test_condition_intervals_cover_the_mean():
    t = _table(_jitter([0.03, 0.0], scale=0.003), starts=[0, 700])
    ci = W.condition_intervals(t).set_index("condition")
    for name, g in t.groupby("condition"):
        assert ci.loc[name, "harm_lo"] <= g["harm"].mean() <= ci.loc[name, "harm_hi"]
