"""`csn claims DIR`: the four verdicts of a study, (re)computed from the tables of its runs.

What a study folder needs: run folders named `<condition>-s<seed>` (`baseline-s0`, `reg-from-0-s0`,
`reg-from-1-s0`, as `csn reproduce` and `csn experiment regularize` write them), each a finished run
(its last checkpoint saved). A run's condition is what its run.json records: no regularizer (a baseline), or the
regularizer from an onset (its first window's start step, exact) at an alpha; the folder name only labels it.
Each claim reads what it needs and is inconclusive, saying what is missing, when the tables are not there:

- C1: tables/selectivity.parquet of the baseline runs;
- C2: tables/ablation.parquet of the baseline runs (at the run's selectivity peak and its last checkpoint);
- C3: tables/linearity.parquet of the baseline runs (at the run's selectivity peak and its last checkpoint);
- C4: the final checkpoints of the baseline and regularized runs, paired by seed, and their selectivity
  tables (the regularizer must have lowered the final CSI of the regularized stages).

Unfinished runs are left out (listed in claims.json). The early checkpoint of C2 and C3 is each baseline run's
own selectivity peak (claims.peak_step, from its selectivity table); the late onset comes from the study
(reproduce.json, written by `csn reproduce`), else from the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from csn.analysis.ablation import summarize_ablation
from csn.core.times import onset_epoch
from csn.errors import CsnError
from csn.experiments import claims as C
from csn.experiments.conditions import Condition, onset_condition
from csn.experiments.regularize import condition_table, final_per_run, recorded_condition
from csn.experiments.runner import is_complete
from csn.runs.io import write_json, write_table
from csn.runs.naming import parse_run_name
from csn.runs.run import Run, run_dirs


@dataclass
class StudyRuns:
    """The finished runs of a study folder by (condition, seed), in condition then seed order."""

    runs: dict[tuple[str, int], Run]
    unfinished: list[str] = field(default_factory=list)

    def of(self, condition: str) -> list[Run]:
        return [r for (c, _), r in self.runs.items() if c == condition]

    @property
    def conditions(self) -> list[str]:
        return list(dict.fromkeys(c for c, _ in self.runs))


def study_runs(out: Path) -> StudyRuns:
    """Every `<condition>-s<seed>` run folder under `out` that is a baseline (no regularizer in its run.json) or
    regularized from an onset to the end of training; finished ones kept, ordered baseline first, then by onset
    (run.json's), then name."""
    found, unfinished = [], []
    for p in run_dirs(out):
        cond, seed = parse_run_name(p.name)
        if seed is None or p == Path(out):
            continue
        if not is_complete(p):
            unfinished.append(p.name)
            continue
        run = Run(p)
        onset, _ = recorded_condition(run)
        to_end = onset is not None and run.reg_windows[-1].end_step == int(run.info["total_steps"])
        if (cond == "baseline" and onset is None) or (cond != "baseline" and to_end):  # a baseline, or from an onset on
            found.append(((0 if onset is None else 1, onset or 0.0, cond), seed, cond, run))
    found.sort(key=lambda t: (t[0], t[1]))
    return StudyRuns({(c, s): r for _, s, c, r in found}, sorted(unfinished, key=parse_run_name))


def _stacked(runs: list[Run], table: str) -> pd.DataFrame | None:
    frames = []
    for run in runs:
        df = run.read(table)
        if df is not None and not df.empty:
            frames.append(df.assign(run=str(run.path)))
    return pd.concat(frames, ignore_index=True) if frames else None


def _peak_end_steps(runs: list[Run]) -> tuple[dict, dict]:
    """Per baseline run: its selectivity peak (claims.peak_step; the early checkpoint of C2 and C3) and its last
    checkpoint. A run without a selectivity table has no peak."""
    peak, last = {}, {}
    for run in runs:
        step = C.peak_step(run.read("selectivity"), int(run.info["total_steps"]))
        if step is not None:
            peak[str(run.path)] = step
        last[str(run.path)] = run.checkpoints[-1].step
    return peak, last


def _late_condition(found: StudyRuns, late_onset: float | None) -> tuple[list[Condition], float | None]:
    """Baseline, from-0 and late conditions present, onset and alpha as the runs' run.json record them (every seed of
    a condition must agree); the late onset in epochs: the given one, else the one regularized condition whose onset
    is not 0."""
    conds = [onset_condition(None)]
    for c in found.conditions:
        if c == "baseline":
            continue
        recorded = {recorded_condition(r) for r in found.of(c)}
        if len(recorded) > 1:
            shown = ", ".join(f"onset {o:g}, alpha {a:g}" for o, a in sorted(recorded))
            raise CsnError(f"the runs of condition {c} were trained differently ({shown}, by their run.json); give each "
                           "condition its own folder name.")
        ((onset, alpha),) = recorded
        conds.append(onset_condition(onset, alpha, label=c))
    late = [c.onset for c in conds[1:] if c.onset != 0]
    if late_onset is None and len(late) == 1:
        late_onset = late[0]
    return conds, late_onset


def _c4_runs(found: StudyRuns, conds: list[Condition]) -> dict[tuple[str, int], Run]:
    """Baseline runs whose seed a regularized condition shares, and the regularized runs whose seed the
    baseline has: the runs C4 pairs by seed."""
    base = {s for c, s in found.runs if c == "baseline"}
    reg = {s for c, s in found.runs if c != "baseline"}
    names = {c.name for c in conds}
    return {(c, s): r for (c, s), r in found.runs.items() if c in names and s in (reg if c == "baseline" else base)}


def judge(out: str | Path, *, late_onset: float | str | None = None, judge: bool = True, name: str = "study",
          study: dict | None = None) -> list[C.Verdict]:
    """Compute C1-C4 from the runs' tables under `out`, write regularize*.parquet and claims.json; return the verdicts.

    The early checkpoint of C2 and C3 is each baseline run's selectivity peak (claims.peak_step); late_onset: the
    late condition's onset in epochs (default: the one regularized condition with a nonzero onset); judge=False
    reports every verdict as inconclusive (a study too small to test the claims), saying what the rule alone gave.
    A late_onset given as text is a point in training (csn.core.times: 0.667, step=312, f0.3333), resolved on the
    runs' training length."""
    out = Path(out)
    found = study_runs(out)
    base_runs = found.of("baseline")
    if not found.runs:
        raise CsnError(f"{out} holds no finished runs named <condition>-s<seed> (baseline-s0, reg-from-0-s0, ...); "
                       "pass the folder of a reproduction or of `csn experiment regularize`.")
    if isinstance(late_onset, str):
        ref = (base_runs or list(found.runs.values()))[0].info
        spe, steps = int(ref["steps_per_epoch"]), int(ref["total_steps"])
        late_onset = onset_epoch(late_onset, spe, steps, what="--late-onset")
    peak, last = _peak_end_steps(base_runs)
    total = int(base_runs[0].info["total_steps"]) if base_runs else 0
    c1 = C.claim_c1(_stacked(base_runs, "selectivity"), total)
    abl = _stacked(base_runs, "ablation")
    c2 = C.claim_c2(summarize_ablation(abl).gaps if abl is not None else None, peak, last)
    c3 = C.claim_c3(_stacked(base_runs, "linearity"), peak, last)
    conds, late_onset = _late_condition(found, late_onset)
    runs4 = _c4_runs(found, conds)
    per_seed = final_per_run(runs4, conds) if runs4 else None
    if per_seed is not None:
        write_table(out / "regularize_runs.parquet", per_seed)
        write_table(out / "regularize.parquet", condition_table(per_seed))
    c4 = C.claim_c4(per_seed, late_onset if late_onset is not None else math.nan)
    verdicts = [c1, c2, c3, c4]
    if not judge:
        for v in verdicts:
            v.observed = (f"preset {name} is too small to test the claim (the rule alone gives '{v.verdict}'): "
                          f"{v.observed}")
            v.verdict = C.INCONCLUSIVE
    write_json(out / "claims.json", {
        "preset": name, "rules_version": C.RULES_VERSION, "rules_declared": C.RULES_DECLARED,
        "thresholds": C.THRESHOLDS, "reproduce_preset": study or {},
        "claims": [v.to_dict() for v in verdicts],
        "runs": {"baseline": [r.name for r in base_runs], "c4": [r.name for r in runs4.values()],
                 "unfinished": found.unfinished, "selectivity_peak_step": peak, "late_onset_epoch": late_onset},
    })
    return verdicts


__all__ = ["StudyRuns", "study_runs", "judge"]
