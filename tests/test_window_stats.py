"""The critical-period map's declared statistics (rule set 2): paired harm, t intervals over seeds, the three
suppression and two promotion verdicts on hand-made tables, Spearman rho as a description (against naive float64
references where it computes a number)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from csn.experiments import window_stats as W
from csn.experiments.window_stats import DOES_NOT_HOLD, HOLDS, INCONCLUSIVE

STARTS = [0, 234, 468, 702, 936, 1170]  # six equal windows tiling 1,404 steps; the last three are late
TOTAL = 1404


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
                             window=f"step={start}:step={start + 234}", start_step=start, end_step=start + 234,
                             start_fraction=start / TOTAL, seed=s,
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


def _verdicts(harm, **kw) -> dict[str, dict]:
    v = W.verdicts(_table(harm, **kw))
    return {r["question"]: r for r in v.to_dict("records")}


def test_suppression_early_harms_more_and_late_costs_little():
    harm = _jitter([0.012, 0.006, 0.003, 0.0, 0.0005, -0.0005], seeds=5, scale=0.0007)
    v = _verdicts(harm)
    assert v[W.Q_EARLIEST]["verdict"] == HOLDS and v[W.Q_MORE]["verdict"] == HOLDS and v[W.Q_LITTLE]["verdict"] == HOLDS
    h = np.asarray(harm)  # [windows, seeds]
    contrast = (h[0] - h[3:].mean(axis=0)).tolist()
    m = math.fsum(contrast) / 5
    assert v[W.Q_MORE]["estimate"] == pytest.approx(m, abs=1e-15)
    assert v[W.Q_MORE]["lo"] == pytest.approx(m - 2.776 * _naive_se(contrast), rel=1e-3)
    assert v[W.Q_MORE]["mde"] > 0 and "MDE" in v[W.Q_MORE]["observed"] and v[W.Q_MORE]["rules_version"] == 2


def test_suppression_every_window_the_same_is_not_early_harms_more():
    v = _verdicts(_jitter([0.008] * 6, seeds=5, scale=0.0007, seed=2))
    assert v[W.Q_EARLIEST]["verdict"] == HOLDS
    assert v[W.Q_MORE]["verdict"] == DOES_NOT_HOLD  # the contrast lies below the minimal effect
    assert v[W.Q_LITTLE]["verdict"] == DOES_NOT_HOLD  # the late windows cost 0.8 points, above 'little'


def test_suppression_nothing_harms_and_noise_is_inconclusive():
    v = _verdicts(_jitter([0.0] * 6, seeds=5, scale=0.0005, seed=3))
    assert v[W.Q_EARLIEST]["verdict"] == DOES_NOT_HOLD and v[W.Q_LITTLE]["verdict"] == HOLDS
    v = _verdicts(_jitter([0.01, 0.0, 0.0, 0.0, 0.0, 0.0], seeds=3, scale=0.01, seed=4))
    assert v[W.Q_EARLIEST]["verdict"] == INCONCLUSIVE


def test_suppression_gates():
    harm = _jitter([0.012, 0.006, 0.003, 0.0, 0.0005, -0.0005], seeds=5, scale=0.0007)
    weak = _verdicts(harm, csi_reduction=0.3)
    assert all(r["verdict"] == INCONCLUSIVE and "did not take" in r["observed"] for r in weak.values())
    two = _verdicts([row[:2] for row in harm])
    assert all(r["verdict"] == INCONCLUSIVE and "fewer than 3" in r["observed"] for r in two.values())
    early_only = W.verdicts(_table(harm[:2], starts=STARTS[:2]))
    rows = {r["question"]: r for r in early_only.to_dict("records")}
    assert rows[W.Q_EARLIEST]["verdict"] == HOLDS
    assert rows[W.Q_MORE]["verdict"] == INCONCLUSIVE and "no late window" in rows[W.Q_MORE]["observed"]


def test_promotion_changes_final_and_window_end_accuracy():
    final_harm = _jitter([0.007], seeds=5, scale=0.0005)  # promotion lowers final accuracy by 0.7 points
    gap = [[0.06 + 0.005 * k for k in range(5)]]  # +6 points at the window's end
    v = _verdicts(final_harm, alpha=3.0, starts=[0], gap=gap, csi_reduction=-0.9)
    assert v[W.Q_PROMOTE_FINAL]["verdict"] == HOLDS and v[W.Q_PROMOTE_FINAL]["estimate"] == pytest.approx(-0.007, abs=1e-3)
    assert v[W.Q_PROMOTE_END]["verdict"] == HOLDS
    flat = _verdicts(_jitter([0.0], seeds=5, scale=0.0003), alpha=3.0, starts=[0], gap=[[0.0003, -0.0002, 0.0, 0.0001,
                                                                                          -0.0001]], csi_reduction=-0.9)
    assert flat[W.Q_PROMOTE_FINAL]["verdict"] == DOES_NOT_HOLD and flat[W.Q_PROMOTE_END]["verdict"] == DOES_NOT_HOLD
    weak = _verdicts(final_harm, alpha=3.0, starts=[0], gap=gap, csi_reduction=-0.1)
    assert all(r["verdict"] == INCONCLUSIVE for r in weak.values())


def test_condition_intervals_are_t_intervals():
    harm = _jitter([0.01, 0.0], seeds=4, scale=0.001, seed=5)
    t = _table(harm, starts=STARTS[:2])
    ci = W.condition_intervals(t).set_index("condition")
    h = harm[0]
    m = math.fsum(h) / 4
    assert ci["harm_lo"].iloc[0] == pytest.approx(m - 3.182 * _naive_se(h), rel=1e-3)
    assert ci["harm_hi"].iloc[0] == pytest.approx(m + 3.182 * _naive_se(h), rel=1e-3)


def test_verdicts_refuse_a_table_without_the_columns():
    with pytest.raises(ValueError, match="start_fraction"):
        W.verdicts(_table([[0.01, 0.01, 0.01]]).drop(columns=["start_fraction"]))
