#!/usr/bin/env python3
"""The README's table of every verdict's false rates and power at the default seeds (the same scenarios the
simulation tests check: tests/test_verdict_power.py), as Markdown rows.

usage: python scripts/verdict_power.py [--studies 1000]
"""

from __future__ import annotations

import argparse

from csn.core import inference as I
from csn.experiments import claims as C
from csn.experiments import window_stats as W
from csn.experiments.study import load_study
from csn.experiments.windows import get_windows_preset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1000, help="simulated studies per scenario")
    args = ap.parse_args()
    st = load_study("fmnist")[1].study
    seeds = {"C1": st.seeds, "C2": st.seeds, "C3": st.seeds, "C4": min(st.seeds, st.reg_seeds)}
    map_seeds = len(get_windows_preset("fmnist").seeds)
    print("| verdict | scenario | seeds | holds | does not hold | inconclusive |")
    print("|---|---|---|---|---|---|")
    for case in C.scenarios() + W.scenarios(get_windows_preset("fmnist").run_sd):
        n = seeds.get(case["claim"], map_seeds)
        r = I.rates(case["sim"], case["effect"], n, args.studies, seed=1)
        tag = "null" if case["kind"] == "null" else "**declared effect**"
        print(f"| {case['claim']} | {tag}: {case['what']} | {n} | {r[I.HOLDS]:.1%} | {r[I.DOES_NOT_HOLD]:.1%} | "
              f"{r[I.INCONCLUSIVE]:.1%} |")


if __name__ == "__main__":
    main()
