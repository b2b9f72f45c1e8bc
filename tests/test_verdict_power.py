"""Every verdict rule, tested by simulation at the seeds it is used with (SPEC "Statistics of verdicts").

For each verdict of the claims (C1-C4) and of the critical-period map, 1,000 studies are drawn from the declared
table shapes (claims.scenarios, window_stats.scenarios) under each null and under the declared effect, at the
default seeds of the shipped fmnist study and map, and judged by the very functions that judge real studies:
"reproduced / holds" must come <= 5 % of the time under every null, "not reproduced / does not hold" <= 5 % under
the declared effect. The power at the default seeds is printed (pytest -s) and recorded in the README
(scripts/verdict_power.py writes that table). Deterministic: fixed simulation seeds.
"""

from __future__ import annotations

import pytest

from csn.core import inference as I
from csn.experiments import claims as C
from csn.experiments import window_stats as W
from csn.experiments.study import load_study
from csn.experiments.windows import get_windows_preset

STUDIES = 1000
LIMIT = 0.05


def _study_seeds() -> dict[str, int]:
    st = load_study("fmnist")[1].study
    return {"C1": st.seeds, "C2": st.seeds, "C3": st.seeds, "C4": min(st.seeds, st.reg_seeds)}


CLAIM_CASES = C.scenarios()
MAP_CASES = W.scenarios(get_windows_preset("fmnist").run_sd)


def _check(case: dict, seeds: int) -> dict[str, float]:
    r = I.rates(case["sim"], case["effect"], seeds, STUDIES, seed=1)
    if case["kind"] == "null":
        assert r[I.HOLDS] <= LIMIT, f"{case['claim']} under '{case['what']}': holds {r[I.HOLDS]:.1%} at {seeds} seeds"
    else:
        assert r[I.DOES_NOT_HOLD] <= LIMIT, (f"{case['claim']} under '{case['what']}': does not hold "
                                             f"{r[I.DOES_NOT_HOLD]:.1%} at {seeds} seeds")
    print(f"{case['claim']:<48} {case['kind']:<6} {case['what']:<44} seeds {seeds}: holds {r[I.HOLDS]:.3f}, "
          f"does not hold {r[I.DOES_NOT_HOLD]:.3f}")
    return r


@pytest.mark.parametrize("case", CLAIM_CASES, ids=[f"{c['claim']}-{c['kind']}-{c['what']}" for c in CLAIM_CASES])
def test_claim_rules_by_simulation(case):
    _check(case, _study_seeds()[case["claim"]])


@pytest.mark.parametrize("case", MAP_CASES, ids=[f"{c['claim']}-{c['kind']}-{c['what']}" for c in MAP_CASES])
def test_map_rules_by_simulation(case):
    _check(case, len(get_windows_preset("fmnist").seeds))


@pytest.mark.parametrize("seeds", [2, 3, 5, 10])
def test_the_bounds_hold_from_2_to_10_seeds(seeds):
    """The false rates do not depend on the default: t intervals keep them at 2-10 seeds."""
    for case in CLAIM_CASES + MAP_CASES:
        r = I.rates(case["sim"], case["effect"], seeds, 500, seed=2)
        key = I.HOLDS if case["kind"] == "null" else I.DOES_NOT_HOLD
        assert r[key] <= LIMIT + 0.02, (case["claim"], case["what"], seeds, r)


def test_rule_set_1_failed_what_rule_set_2_passes():
    """The issue's measurements of rule set 1, re-done on rule set 2's functions: C4 with true costs 0.008 (early)
    and 0.005 (late, = 'little') said 'reproduced' ~27 % of the time under rule set 1; the map said 'holds' 8.5-12 %
    when every window harmed the same."""
    late_little = next(c for c in CLAIM_CASES if c["claim"] == "C4" and "= little" in c["what"])
    assert I.rates(late_little["sim"], late_little["effect"], 3, STUDIES)[I.HOLDS] <= LIMIT
    equal = next(c for c in MAP_CASES if c["claim"] == W.Q_MORE and c["kind"] == "null")
    assert I.rates(equal["sim"], 0.0, 3, STUDIES)[I.HOLDS] <= LIMIT
