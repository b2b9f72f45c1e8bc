"""Claims C1-C4: the declared rules on hand-made tables (each verdict reachable, each rule can fail)."""

from __future__ import annotations

import math

import pandas as pd

from csn.experiments import claims as C


def _sel(curves: dict[str, list[float]], epochs: list[float], runs=("r0", "r1", "r2")) -> pd.DataFrame:
    rows = []
    for run in runs:
        for stage, vals in curves.items():
            for step, (e, v) in enumerate(zip(epochs, vals)):
                for unit, d in enumerate((-0.01, 0.01)):  # two units whose mean is v
                    rows.append(dict(run=run, step=step, epoch=e, stage=stage, unit=unit, csi=v + d))
    return pd.DataFrame(rows)


EPOCHS = [0, 0.125, 0.25, 0.5, 1, 2, 3, 4]


def test_c1_rise_and_partial_recede_is_reproduced():
    sel = _sel({"s1": [0.15, 0.19, 0.15, 0.13, 0.12, 0.12, 0.12, 0.12],
                "s2": [0.14, 0.27, 0.26, 0.22, 0.18, 0.19, 0.18, 0.19]}, EPOCHS)
    v = C.claim_c1(sel, total_epochs=4)
    assert v.verdict == C.INCONCLUSIVE  # s1 final (0.12) is below init (0.15): one of two stages shows it
    sel = _sel({"s1": [0.10, 0.19, 0.15, 0.13, 0.12, 0.12, 0.12, 0.12],
                "s2": [0.14, 0.27, 0.26, 0.22, 0.18, 0.19, 0.18, 0.19]}, EPOCHS)
    v = C.claim_c1(sel, total_epochs=4)
    assert v.verdict == C.REPRODUCED and v.values["stages"]["s2"]["peak_epoch"] == 0.125
    assert abs(v.values["stages"]["s2"]["recede_share"] - (0.27 - 0.19) / (0.27 - 0.14)) < 1e-9


def test_c1_late_peak_or_no_recede_is_not_reproduced():
    rising = [0.10, 0.12, 0.14, 0.16, 0.2, 0.3, 0.4, 0.45]
    v = C.claim_c1(_sel({"s1": rising, "s2": rising}, EPOCHS), total_epochs=4)
    assert v.verdict == C.NOT_REPRODUCED
    mixed = _sel({"s1": [0.10, 0.19, 0.15, 0.13, 0.12, 0.12, 0.12, 0.12], "s2": rising}, EPOCHS)
    assert C.claim_c1(mixed, total_epochs=4).verdict == C.INCONCLUSIVE  # one of two stages
    assert C.claim_c1(None, 4).verdict == C.INCONCLUSIVE


def _gaps(early_gap, late_gap, se=0.001):
    rows = []
    for run in ("a", "b"):
        rows += [dict(run=run, step=10, stage="s1", gap=early_gap, gap_se=se),
                 dict(run=run, step=99, stage="s1", gap=late_gap, gap_se=se)]
    return pd.DataFrame(rows), {"a": 10, "b": 10}, {"a": 99, "b": 99}


def test_c2_rules():
    assert C.claim_c2(*_gaps(-0.10, -0.01)).verdict == C.REPRODUCED
    assert C.claim_c2(*_gaps(-0.10, -0.09)).verdict == C.NOT_REPRODUCED  # gap does not shrink
    assert C.claim_c2(*_gaps(0.01, 0.0)).verdict == C.NOT_REPRODUCED  # selective no worse than random
    assert C.claim_c2(*_gaps(-0.10, -0.01, se=0.2)).verdict == C.NOT_REPRODUCED  # within noise


def test_c3_rules():
    rows = []
    for run in ("a", "b"):
        for step, vals in ((0, (0.2, 1.0, 0.1)), (5, (0.9, 0.8, 0.8)), (9, (0.5, 0.6, 0.6))):
            for m, v in zip(C.C3_MEASURES, vals):
                rows.append(dict(run=run, step=step, measure=m, value=v))
    lin = pd.DataFrame(rows)
    v = C.claim_c3(lin, {"a": 5, "b": 5})
    assert v.verdict == C.REPRODUCED and all(x["falls"] for x in v.values["measures"].values())
    assert C.claim_c3(lin, {"a": 9, "b": 9}).verdict == C.NOT_REPRODUCED


def _per_seed(acc_base, acc0, acc_late, csi0=0.05):
    rows = []
    for s in range(3):
        d = 0.001 * (s - 1)
        rows += [dict(condition="baseline", onset=math.nan, seed=s, final_test_acc=acc_base + d, final_csi=0.2, final_eta2=0.3),
                 dict(condition="reg-from-0", onset=0.0, seed=s, final_test_acc=acc0 + d, final_csi=csi0, final_eta2=0.3),
                 dict(condition="reg-from-1", onset=1.0, seed=s, final_test_acc=acc_late + d, final_csi=0.06, final_eta2=0.3)]
    return pd.DataFrame(rows)


def test_c4_rules():
    assert C.claim_c4(_per_seed(0.91, 0.88, 0.905), 1.0).verdict == C.REPRODUCED
    assert C.claim_c4(_per_seed(0.91, 0.909, 0.91), 1.0).verdict == C.NOT_REPRODUCED  # no harm from 0
    assert C.claim_c4(_per_seed(0.91, 0.88, 0.88), 1.0).verdict == C.NOT_REPRODUCED  # late as harmful
    assert C.claim_c4(_per_seed(0.91, 0.88, 0.905, csi0=0.19), 1.0).verdict == C.INCONCLUSIVE  # CSI not lowered
    assert C.claim_c4(None, 1.0).verdict == C.INCONCLUSIVE
    text = C.verdict_table([C.claim_c4(_per_seed(0.91, 0.88, 0.905), 1.0)])
    assert "C4" in text and "reproduced" in text
