"""Claims C1-C4: the declared rules on hand-made tables (each verdict reachable, each rule can fail)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

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


def _lin(values_by_step: dict[int, tuple[float, float, float]], runs=("a", "b")) -> pd.DataFrame:
    """Linearity rows: per step, the values of C3_MEASURES (linearized_agreement_init, relu_same_as_init, mu_y_share)."""
    rows = []
    for run in runs:
        for step, vals in values_by_step.items():
            for m, v in zip(C.C3_MEASURES, vals):
                rows.append(dict(run=run, step=step, measure=m, value=v))
    return pd.DataFrame(rows)


def test_c3_levels_are_declared_per_measure():
    assert C.C3_MEASURES == ("linearized_agreement_init", "relu_same_as_init", "mu_y_share")
    for m in C.C3_MEASURES:
        assert C.THRESHOLDS[f"c3_min_level_{m}"] == 0.9


def test_c3_rules():
    lin = _lin({0: (1.0, 1.0, 0.1), 5: (0.95, 0.92, 0.95), 9: (0.5, 0.6, 0.6)})
    v = C.claim_c3(lin, {"a": 5, "b": 5})
    assert v.verdict == C.REPRODUCED and all(x["shows"] for x in v.values["measures"].values())
    assert C.claim_c3(lin, {"a": 9, "b": 9}).verdict == C.NOT_REPRODUCED  # neither near linear nor falling


def test_c3_a_fall_from_a_low_level_is_not_near_linear():
    """SPEC's fmnist numbers: the linearized agreement is 0.25 early and falls; the ReLU states 0.73 at the early
    checkpoint; only the mu_Y share (0.94 -> 0.86) is near linear and falls: one measure of three."""
    lin = _lin({64: (0.25, 0.73, 0.94), 1407: (0.15, 0.66, 0.86)})
    v = C.claim_c3(lin, {"a": 64, "b": 64})
    m = v.values["measures"]
    assert [m[k]["near_linear"] for k in C.C3_MEASURES] == [False, False, True]
    assert [m[k]["falls"] for k in C.C3_MEASURES] == [True, True, True]
    assert [m[k]["shows"] for k in C.C3_MEASURES] == [False, False, True]
    assert v.verdict == C.INCONCLUSIVE  # under the former rule (falls only): reproduced
    assert "linearized_agreement_init: 0.250 early (below 0.9) -> 0.150 last (falls)" in v.observed
    high_flat = C.claim_c3(_lin({5: (0.95, 0.95, 0.95), 9: (0.94, 0.93, 0.92)}), {"a": 5, "b": 5})
    assert high_flat.verdict == C.NOT_REPRODUCED  # near linear but not falling: no measure shows it
    assert C.claim_c3(_lin({5: (0.8, 0.95, 0.95), 9: (0.7, 0.5, 0.5)}), {"a": 5, "b": 5}).verdict == C.REPRODUCED


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


def _rows(cond: str, onset: float, accs: dict[int, float], csi: float = 0.2) -> list[dict]:
    return [dict(condition=cond, onset=onset, seed=s, final_test_acc=a, final_csi=csi, final_eta2=0.3)
            for s, a in accs.items()]


def test_c4_pairs_by_seed():
    """Seeds differ a lot (0.90 / 0.92 / 0.94) but every seed loses 0.010 +- 0.0005 when regularized from 0:
    paired, the harm is far above 2 SE; unpaired (the former rule) it was within 2 SE."""
    base = {0: 0.90, 1: 0.92, 2: 0.94, 3: 0.95}  # seed 3 has no regularized run: not paired, left out
    from0 = {0: 0.8905, 1: 0.9095, 2: 0.9300, 4: 0.5}  # seed 4 has no baseline: left out
    late = {0: 0.8995, 1: 0.9205, 2: 0.9390}
    per_seed = pd.DataFrame(_rows("baseline", math.nan, base) + _rows("reg-from-0", 0.0, from0, csi=0.05)
                            + _rows("reg-from-1", 1.0, late, csi=0.06))
    v = C.claim_c4(per_seed, 1.0)
    e = v.values["from0"]
    assert e["seeds"] == [0, 1, 2] and v.values["paired_seeds"] == [0, 1, 2]
    assert e["per_seed"] == pytest.approx([0.0095, 0.0105, 0.0100])
    assert e["harm"] == pytest.approx(0.0100) and e["se"] == pytest.approx(0.000288675, rel=1e-4)
    assert v.values["late"]["harm"] == pytest.approx(0.0003333, rel=1e-3)
    assert v.verdict == C.REPRODUCED and "paired over seeds 0, 1, 2" in v.observed
    unpaired = math.hypot(v.values["acc_se_unpaired"]["baseline"], v.values["acc_se_unpaired"]["from0"])
    assert e["harm"] < C.THRESHOLDS["c4_min_harm_se"] * unpaired  # what the former rule would have compared
    noisy = dict(from0)
    noisy.update({0: 0.905, 1: 0.900, 2: 0.935})  # harms -0.005, 0.020, 0.005: mean 0.0067, SE 0.0076
    v = C.claim_c4(pd.DataFrame(_rows("baseline", math.nan, base) + _rows("reg-from-0", 0.0, noisy, csi=0.05)
                                + _rows("reg-from-1", 1.0, late, csi=0.06)), 1.0)
    assert v.verdict == C.NOT_REPRODUCED
    one = pd.DataFrame(_rows("baseline", math.nan, {0: 0.9}) + _rows("reg-from-0", 0.0, {0: 0.8}, csi=0.05)
                       + _rows("reg-from-1", 1.0, {0: 0.9}, csi=0.05))
    assert C.claim_c4(one, 1.0).verdict == C.INCONCLUSIVE and "fewer than 2 paired seeds" in C.claim_c4(one, 1.0).observed
