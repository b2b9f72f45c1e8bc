"""The mechanism study's answers and curves, from a windows experiment's runs (`csn experiment windows --preset
mechanism`; the questions and rules: csn.experiments.mechanism_stats).

The regularized stages are those of the suppression from step 0 (the earliest suppression condition). Per run and
measured checkpoint, over those stages: the live-unit mean CSI and eta² (the selectivity summary), the mean linear-
probe test accuracy (csn.analysis.probe) and the summed Fisher-information trace (csn.analysis.fisher). Tables:

    windows_mechanism.parquet         one row per question: verdict, estimate, interval, what was seen
    windows_mechanism_curves.parquet  per condition, quantity and step: mean, SE and seeds
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from csn.analysis.selectivity import live_unit_means
from csn.core.stats import standard_error
from csn.experiments import mechanism_stats as ms
from csn.experiments.conditions import BASELINE
from csn.runs.run import Run

QUANTITIES = ("csi", "eta2", "probe_acc", "fisher_trace")
"""The curves' quantities, over the regularized stages: mean CSI, mean eta², mean probe accuracy, summed Fisher trace."""
ANSWER_COLUMNS = ("question", "verdict", "estimate", "lo", "hi", "minimal", "n_seeds", "observed", "detail",
                  "rules_version")
CURVE_COLUMNS = ("condition", "kind", "quantity", "step", "epoch", "mean", "se", "n")


def _run_series(run: Run, summary: pd.DataFrame | None, stages: Sequence[str]) -> dict[str, pd.Series]:
    """The run's four quantities per step over `stages` (empty where a table is missing)."""
    means = (live_unit_means(summary, stages).set_index("step") if summary is not None and len(summary)
             else pd.DataFrame(columns=["csi", "eta2"], dtype=float))
    out = {"csi": means["csi"], "eta2": means["eta2"]}
    probe, fisher = run.read("probe"), run.read("fisher")
    out["probe_acc"] = (probe[probe["stage"].isin(stages)].groupby("step")["acc"].mean()
                        if probe is not None and len(probe) else pd.Series(dtype=float))
    out["fisher_trace"] = (fisher[fisher["stage"].isin(stages)].groupby("step")["trace"].sum(min_count=len(stages))
                           if fisher is not None and len(fisher) else pd.Series(dtype=float))
    return out


def _from0(per_seed: pd.DataFrame) -> pd.DataFrame:
    sup = per_seed[(per_seed["kind"] == "suppress")]
    return sup[sup["start_step"] == sup["start_step"].min()] if len(sup) else sup


def _peak_rewind(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Rows of the rewind judged in (c): at the earliest rewind step, source step 0."""
    rew = per_seed[(per_seed["kind"] == "rewind")]
    if "rewind_to_step" in rew:
        rew = rew[rew["rewind_to_step"] == 0]
    return rew[rew["end_step"] == rew["end_step"].min()] if len(rew) else rew


def _probe_answer(series: Mapping, from0: pd.DataFrame, rules: Mapping[str, float]) -> dict:
    if from0.empty:
        return ms.verdict_row(ms.Q_PROBE, ms.probe_parts(np.empty(0)), "no suppression condition", 0,
                              rules["min_probe_drop"], rules) | {"detail": ""}
    name, end = str(from0["condition"].iloc[0]), int(from0["end_step"].iloc[0])
    drops = {}
    for seed in from0["seed"]:
        b, c = series.get((BASELINE, seed)), series.get((name, seed))
        if b is not None and c is not None and end in b["probe_acc"].index and end in c["probe_acc"].index:
            drops[int(seed)] = float(b["probe_acc"][end] - c["probe_acc"][end])
    reduction = float(np.nanmean(from0["csi_reduction_end"])) if "csi_reduction_end" in from0 else math.nan
    why = None
    if not (math.isfinite(reduction) and reduction >= rules["min_csi_reduction"]):
        why = f"the suppression lowered the stages' CSI at the window's end by {reduction:.0%}, under " \
              f"{rules['min_csi_reduction']:.0%}: it did not take"
    v = np.array(list(drops.values()), dtype=np.float64)
    row = ms.verdict_row(ms.Q_PROBE, ms.probe_parts(v), why, len(v), rules["min_probe_drop"], rules)
    return row | {"detail": f"{name} vs baseline at step {end}; CSI reduction at the window's end {reduction:.0%}"}


def _peak_steps(s: Mapping[str, pd.Series], half: int) -> tuple[int, int] | None:
    f, c = s["fisher_trace"], s["csi"]
    steps = sorted(set(f.index) & set(c.index))
    steps = [t for t in steps if t <= half]
    if len(steps) < 2:
        return None
    return int(f[steps].idxmax()), int(c[steps].idxmax())


def _fisher_answer(series: Mapping, seeds: Sequence[int], total: int, rules: Mapping[str, float]) -> dict:
    peaks = {int(sd): p for sd in seeds if (s := series.get((BASELINE, sd))) is not None
             and (p := _peak_steps(s, total // 2)) is not None}
    if not peaks:
        return ms.verdict_row(ms.Q_FISHER, ms.fisher_parts(np.empty(0)), "no Fisher trace and CSI measured on the "
                              "baseline's first half", 0, rules["peak_octaves"], rules) | {"detail": ""}
    steps = sorted({int(t) for sd in peaks for t in series[(BASELINE, sd)]["fisher_trace"].index if t > 0})
    first = steps[0] if steps else 1
    lag = ms.lag_octaves([p[0] for p in peaks.values()], [p[1] for p in peaks.values()], first)
    row = ms.verdict_row(ms.Q_FISHER, ms.fisher_parts(lag), None, len(lag), rules["peak_octaves"], rules)
    shown = ", ".join(f"s{sd}: {f}/{c}" for sd, (f, c) in peaks.items())
    return row | {"detail": f"per seed, Fisher-trace peak step / CSI peak step (first half, s1 = step {first}): {shown}"}


def _rewind_answer(per_seed: pd.DataFrame, from0: pd.DataFrame, rules: Mapping[str, float]) -> dict:
    rew = _peak_rewind(per_seed)
    if rew.empty or from0.empty:
        return ms.verdict_row(ms.Q_REWIND, ms.rewind_parts(np.empty(0), np.empty(0)), "no rewind at the peak to step 0 "
                              "or no suppression from step 0", 0, rules["as_much"], rules) | {"detail": ""}
    r = rew.set_index("seed")["harm"]
    f = from0.set_index("seed")["harm"]
    seeds = sorted(s for s in set(r.index) & set(f.index) if math.isfinite(r[s]) and math.isfinite(f[s]))
    d = np.array([r[s] - f[s] for s in seeds], dtype=np.float64)
    parts = ms.rewind_parts(d, np.array([f[s] for s in seeds], dtype=np.float64))
    harm = parts["harm"].item()
    why = None if bool(np.all(parts["suppression_harms"])) or not seeds else (
        f"the suppression from step 0 does not itself harm by the map's rule (harm {harm.mean:.4f} "
        f"[{harm.lo:.4f}, {harm.hi:.4f}])")
    row = ms.verdict_row(ms.Q_REWIND, parts, why, len(seeds), rules["as_much"], rules)
    name = str(rew["condition"].iloc[0])
    return row | {"detail": f"d = harm({name}) - harm({from0['condition'].iloc[0]}); suppression's harm "
                            f"{harm.mean:.4f} [{harm.lo:.4f}, {harm.hi:.4f}]" if seeds else ""}


def answers(per_seed: pd.DataFrame, series: Mapping[tuple[str, int], Mapping[str, pd.Series]], total: int,
            rules: Mapping[str, float] = ms.MECHANISM_RULES) -> pd.DataFrame:
    """The three questions' rows from the per-seed table (windows_runs) and each run's quantities per step."""
    from0 = _from0(per_seed)
    seeds = sorted(int(s) for s in per_seed.loc[per_seed["kind"] == BASELINE, "seed"])
    rows = [_probe_answer(series, from0, rules), _fisher_answer(series, seeds, total, rules),
            _rewind_answer(per_seed, from0, rules)]
    return pd.DataFrame(rows, columns=list(ANSWER_COLUMNS))


def curves(series: Mapping[tuple[str, int], Mapping[str, pd.Series]], kinds: Mapping[str, str],
           steps_per_epoch: int) -> pd.DataFrame:
    """Per condition, quantity and step: mean, SE and number of seeds."""
    rows: list[dict[str, Any]] = []
    for name in dict.fromkeys(c for c, _ in series):
        runs = [s for (c, _), s in series.items() if c == name]
        for q in QUANTITIES:
            frame = pd.concat([r[q].rename(i) for i, r in enumerate(runs) if len(r[q])], axis=1) if any(
                len(r[q]) for r in runs) else None
            if frame is None:
                continue
            for step, vals in frame.iterrows():
                v = vals.dropna().to_numpy(dtype=np.float64)
                rows.append({"condition": name, "kind": kinds[name], "quantity": q, "step": int(step),
                             "epoch": int(step) / steps_per_epoch, "mean": float(v.mean()) if len(v) else math.nan,
                             "se": standard_error(v), "n": len(v)})
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def mechanism_tables(per_seed: pd.DataFrame, runs: Mapping[tuple[str, int], Run],
                     summaries: Mapping[tuple[str, int], pd.DataFrame | None], total: int,
                     steps_per_epoch: int) -> dict[str, pd.DataFrame]:
    """windows_mechanism and windows_mechanism_curves of a windows experiment's runs."""
    from0 = _from0(per_seed)
    stages = str(from0["stages"].iloc[0]).split("+") if len(from0) else []
    series = {key: _run_series(run, summaries.get(key), stages) for key, run in runs.items()}
    kinds = dict(zip(per_seed["condition"], per_seed["kind"]))
    return {"windows_mechanism": answers(per_seed, series, total),
            "windows_mechanism_curves": curves(series, kinds, steps_per_epoch)}


__all__ = ["QUANTITIES", "ANSWER_COLUMNS", "CURVE_COLUMNS", "answers", "curves", "mechanism_tables"]
