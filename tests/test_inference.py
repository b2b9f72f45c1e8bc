"""csn.core.inference: t intervals against a naive float64 reference and textbook t quantiles, every rule shape on
hand-made intervals (each verdict reachable, the edges on the right side), and the power helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from csn.core import inference as I

# Two-sided 95 % Student t quantiles t_{0.975, df} from a printed table (not from scipy).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _naive(values: list[float]) -> tuple[float, float, float]:
    n = len(values)
    m = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (n - 1))
    half = T975[n - 1] * sd / math.sqrt(n)
    return m, m - half, m + half


def test_t_interval_matches_a_naive_reference_at_2_to_10_seeds():
    rng = np.random.default_rng(0)
    for n in range(2, 11):
        for _ in range(20):
            x = rng.normal(0.01, 0.003, n)
            iv = I.t_interval(x).item()
            m, lo, hi = _naive(x.tolist())
            assert iv.n == n and abs(iv.mean - m) < 1e-15
            assert abs(iv.lo - lo) < 2e-3 * abs(hi - m) and abs(iv.hi - hi) < 2e-3 * abs(hi - m)  # table's 3 decimals


def test_t_interval_is_vectorized_and_leaves_nans_out():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 3, 6))
    iv = I.t_interval(x)
    assert iv.mean.shape == (4, 3)
    one = I.t_interval(x[2, 1]).item()
    assert iv.lo[2, 1] == pytest.approx(one.lo, abs=1e-14) and iv.hi[2, 1] == pytest.approx(one.hi, abs=1e-14)
    y = np.array([0.1, np.nan, 0.3, 0.2])
    assert I.t_interval(y).item().n == 3 and I.t_interval(y).item().mean == pytest.approx(0.2)
    single = I.t_interval([0.5]).item()
    assert single.mean == 0.5 and math.isnan(single.lo) and math.isnan(single.hi)
    assert I.word(I.directional(I.t_interval([0.5]), 0.1)) == I.INCONCLUSIVE  # one seed decides nothing


def _iv(mean: float, lo: float, hi: float) -> I.Interval:
    return I.Interval(np.float64(mean), np.float64(lo), np.float64(hi), np.float64(0), np.float64(0), np.float64(3))


def test_directional_rule_every_verdict_and_edges():
    m = 0.0025
    assert I.word(I.directional(_iv(0.006, 0.001, 0.011), m)) == I.HOLDS
    assert I.word(I.directional(_iv(0.002, 0.0005, 0.0035), m)) == I.INCONCLUSIVE  # excludes 0 but below the minimum
    assert I.word(I.directional(_iv(0.0, -0.002, 0.002), m)) == I.DOES_NOT_HOLD  # inside +-minimal: absence shown
    assert I.word(I.directional(_iv(0.002, -0.02, 0.024), m)) == I.INCONCLUSIVE  # too wide either way
    assert I.word(I.directional(_iv(0.006, 0.0, 0.012), m)) == I.INCONCLUSIVE  # touching 0 does not exclude it
    assert I.word(I.directional(_iv(-0.006, -0.011, -0.001), m)) == I.DOES_NOT_HOLD  # clearly the other way
    assert I.word(I.directional(_iv(-0.006, -0.011, -0.001), m, direction=-1)) == I.HOLDS
    assert I.word(I.directional(_iv(0.006, 0.001, 0.011), m, direction=-1)) == I.DOES_NOT_HOLD
    assert I.word(I.directional(_iv(0.0, -0.003, 0.0025), m)) == I.INCONCLUSIVE  # the bound itself is not below
    with pytest.raises(ValueError):
        I.directional(_iv(0, 0, 0), m, direction=0)


def test_two_sided_below_at_least():
    assert I.word(I.two_sided(_iv(-0.01, -0.015, -0.005), 0.0025)) == I.HOLDS
    assert I.word(I.two_sided(_iv(0.01, 0.005, 0.015), 0.0025)) == I.HOLDS
    assert I.word(I.two_sided(_iv(0.0, -0.001, 0.001), 0.0025)) == I.DOES_NOT_HOLD
    assert I.word(I.two_sided(_iv(0.002, 0.001, 0.003), 0.0025)) == I.INCONCLUSIVE
    assert I.word(I.below(_iv(0.001, -0.002, 0.004), 0.005)) == I.HOLDS
    assert I.word(I.below(_iv(0.008, 0.006, 0.010), 0.005)) == I.DOES_NOT_HOLD
    assert I.word(I.below(_iv(0.004, 0.001, 0.007), 0.005)) == I.INCONCLUSIVE
    assert I.word(I.at_least(_iv(0.95, 0.92, 0.98), 0.9)) == I.HOLDS
    assert I.word(I.at_least(_iv(0.85, 0.82, 0.88), 0.9)) == I.DOES_NOT_HOLD
    assert I.word(I.at_least(_iv(0.91, 0.88, 0.94), 0.9)) == I.INCONCLUSIVE


def test_all_of_and_majority():
    assert I.all_of([1, 1, 1, 1], [1, 0, -1, 1]).tolist() == [1, 0, -1, 1]
    assert I.all_of([1, 0], [-1, 0], [1, 1]).tolist() == [-1, 0]
    assert I.majority([[1, 1, 0], [1, -1, 0], [-1, -1, 1], [1, 1, 1], [0, 0, 0]]).tolist() == [1, 0, -1, 1, 0]
    assert I.majority([[1, 1, 0, 0]]).tolist() == [0]  # two of four is not a majority


def test_paired_keeps_the_seeds_both_have():
    seeds, d = I.paired({0: 0.9, 1: 0.91, 2: 0.92, 5: float("nan")}, {1: 0.90, 2: 0.915, 3: 0.5, 5: 0.9})
    assert seeds == [1, 2] and d.tolist() == pytest.approx([0.01, 0.005])


def _normal_sim(sd: float, minimal: float):
    def sim(rng, effect, seeds, studies):
        return I.directional(I.t_interval(effect + rng.normal(0, sd, (studies, seeds))), minimal)
    return sim


def test_power_mde_and_seeds_needed_agree_with_the_normal_approximation():
    sd, minimal = 0.002, 0.0005
    sim = _normal_sim(sd, minimal)
    r0 = I.rates(sim, 0.0, 5)
    assert r0[I.HOLDS] <= 0.025 + 0.01 and abs(sum(r0.values()) - 1) < 1e-12
    # with a minimal effect well below the noise, the MDE at power 0.8 is close to (t_.975 + t_.8) sd / sqrt(n)
    for n in (4, 6, 10):
        approx = (T975[n - 1] + {3: 0.978, 5: 0.920, 9: 0.883}[n - 1]) * sd / math.sqrt(n)
        mde = I.minimal_detectable_effect(sim, n, upper=0.02)
        assert abs(mde - approx) < 0.12 * approx
        assert I.power(sim, mde, n) >= I.POWER - 0.02
    need = I.seeds_needed(sim, 0.004)
    assert need is not None and I.power(sim, 0.004, need) >= I.POWER > I.power(sim, 0.004, need - 1)
    assert I.seeds_needed(sim, 1e-6, most=6) is None
    assert I.minimal_detectable_effect(sim, 3, upper=1e-5) == math.inf
    assert I.power(sim, 0.003, 5) == I.power(sim, 0.003, 5)  # the same random numbers: repeatable
