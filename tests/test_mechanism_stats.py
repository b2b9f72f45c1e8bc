"""The mechanism study's rules: error rates and power by simulation at the seeds the study uses (8), and each rule
against hand-computed intervals."""

import numpy as np
import pytest
from scipy import stats

from csn.core import inference as I
from csn.experiments import mechanism_stats as M
from csn.experiments.windows import get_windows_preset

SEEDS = len(get_windows_preset("mechanism").seeds)
STUDIES = 4000
# a rate's Monte-Carlo SE at 4,000 studies is <= 0.8 points; a nominal 2.5 % rule may read up to ~3.5 %
NOMINAL = 0.035


def _t(values):
    v = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return v.mean() - half, v.mean() + half


def test_the_study_uses_the_seeds_its_power_was_planned_with():
    assert SEEDS == 8
    rows = {r["question"]: r for r in M.planned_power(SEEDS)}
    assert rows[M.Q_PROBE][I.HOLDS] >= 0.8
    assert rows[M.Q_FISHER][I.HOLDS] >= 0.8
    assert rows[M.Q_REWIND][I.HOLDS] >= 0.75  # 0.79-0.80 (2,000-4,000 simulated studies)


def test_probe_rule_error_rates_and_power():
    r0 = I.rates(M.simulate_probe(), 0.0, SEEDS, STUDIES)
    assert r0[I.HOLDS] <= NOMINAL  # no drop: "lowers" almost never
    assert r0[I.DOES_NOT_HOLD] >= 0.8  # and evidence of absence most of the time
    edge = I.rates(M.simulate_probe(), M.MECHANISM_RULES["min_probe_drop"], SEEDS, STUDIES)
    assert edge[I.DOES_NOT_HOLD] <= NOMINAL  # a drop of exactly the minimum is rarely called absent
    assert I.rates(M.simulate_probe(), 0.03, SEEDS, STUDIES)[I.HOLDS] >= 0.95


def test_lag_rule_is_an_equivalence_test():
    for boundary in (1.0, -1.0):
        r = I.rates(M.simulate_lag(), boundary, SEEDS, STUDIES)
        assert r[I.HOLDS] <= NOMINAL  # a lag of exactly one octave is rarely called "within"
    assert I.rates(M.simulate_lag(), 0.0, SEEDS, STUDIES)[I.HOLDS] >= 0.8
    assert I.rates(M.simulate_lag(), 0.0, SEEDS, STUDIES)[I.DOES_NOT_HOLD] == 0.0
    assert I.rates(M.simulate_lag(), 3.0, SEEDS, STUDIES)[I.DOES_NOT_HOLD] >= 0.95


def test_rewind_rule_non_inferiority_and_gate():
    m = M.MECHANISM_RULES["as_much"]
    assert I.rates(M.simulate_rewind(), -m, SEEDS, STUDIES)[I.HOLDS] <= NOMINAL
    assert I.rates(M.simulate_rewind(), 0.0, SEEDS, STUDIES)[I.HOLDS] >= 0.75
    assert I.rates(M.simulate_rewind(), -3 * m, SEEDS, STUDIES)[I.DOES_NOT_HOLD] >= 0.9
    assert I.rates(M.simulate_rewind(), 0.0, SEEDS, STUDIES)[I.DOES_NOT_HOLD] <= NOMINAL
    # a suppression that does not harm gates every answer to inconclusive, whatever the rewind does
    none = I.rates(M.simulate_rewind(suppression=0.0), 0.0, SEEDS, STUDIES)
    assert none[I.INCONCLUSIVE] >= 0.95


def test_rules_against_hand_computed_intervals():
    rng = np.random.default_rng(3)
    drop = rng.normal(0.02, 0.004, 8)
    lo, hi = _t(drop)
    p = M.probe_parts(drop)
    assert p["interval"].item().lo == pytest.approx(lo, abs=1e-12) and p["interval"].item().hi == pytest.approx(hi, abs=1e-12)
    assert I.word(p["codes"]) == (I.HOLDS if lo > 0 and drop.mean() >= 0.01 else I.INCONCLUSIVE)
    lag = np.array([0.0, 0.2, -0.1, 0.1, 0.0, 0.3, -0.2, 0.1])
    lo, hi = _t(lag)
    assert -1 < lo < hi < 1 and I.word(M.fisher_parts(lag)["codes"]) == I.HOLDS
    assert I.word(M.fisher_parts(lag + 5)["codes"]) == I.DOES_NOT_HOLD
    assert I.word(M.fisher_parts(np.array([0.0, 2.0, -2.0, 1.5, -1.5, 0.0, 3.0, -3.0]))["codes"]) == I.INCONCLUSIVE
    harm = rng.normal(0.012, 0.002, 8)
    d = rng.normal(0.0, 0.002, 8)
    r = M.rewind_parts(d, harm)
    lo, _ = _t(d)
    assert I.word(r["codes"]) == (I.HOLDS if lo > -0.005 else I.INCONCLUSIVE)
    assert I.word(M.rewind_parts(d - 0.02, harm)["codes"]) == I.DOES_NOT_HOLD
    assert I.word(M.rewind_parts(d, harm - 0.012)["codes"]) == I.INCONCLUSIVE  # the suppression does not harm


def test_lag_in_octaves():
    assert M.lag_octaves(64, 64, 8) == 0.0
    assert M.lag_octaves(0, 8, 8) == pytest.approx(-1.0)
    assert M.lag_octaves(120, 56, 8) == pytest.approx(1.0)


def test_a_gated_or_thin_answer_is_inconclusive_with_its_reason():
    row = M.verdict_row(M.Q_PROBE, M.probe_parts(np.array([0.05, 0.06])), None, 2, 0.01, M.MECHANISM_RULES)
    assert row["verdict"] == I.INCONCLUSIVE and "fewer than 3" in row["observed"]
    row = M.verdict_row(M.Q_PROBE, M.probe_parts(np.full(8, 0.05) + np.arange(8) * 1e-3), "the suppression did not take",
                        8, 0.01, M.MECHANISM_RULES)
    assert row["verdict"] == I.INCONCLUSIVE and "did not take" in row["observed"]
