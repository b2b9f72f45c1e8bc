"""Which regularizer, which regime? Claim C4 judged per dataset x regularizer (`csn experiment regime`).

csn's C4 said "not reproduced" with csn's regularizer statistic (class MEANS over the global batch: 10 classes x
~13 images, close to the dataset-level CSI). The study's code computed, per training process (32-64 images, never
all-reduced), class SUMS over the classes present: with 1,000 classes nearly every class appears once, so it
penalizes how sparse each unit's responses are across images (SPEC "Selectivity regularizer"). This experiment
crosses the two statistics with two regimes, on the framework of `csn experiment regularize`
(csn.experiments.conditions: Condition, train_conditions; csn.experiments.regularize: final_per_run, dose):

    dataset      fashion-mnist (10 classes)  x  fmnist-pairs (100 classes, about one image per class per group)
    regularizer  csn (reg_mode=csn: class means over the global batch)
                 study (reg_mode=study: class sums within groups of 32 images, eps 1e-6)
    condition    baseline (shared by both regularizers of a dataset), suppressed from step 0,
                 suppressed from the late onset (a fraction of training) to the end
    seeds        paired: the same seed gives the same initialization and batches in every condition

Per condition and seed, at the final checkpoint with BatchNorm statistics re-estimated from END_BN_BATCHES training
batches (rule set 2 as amended: C4's final accuracy after re-estimation, csn.analysis.accuracy; the checkpoint's
eval-mode accuracy kept beside): final test accuracy (whole test split), the dose (regularized steps, mean learning
rate in the window), the final CSI and eta² (dataset-level, csn's selectivity analysis) and the per-image sparsity and
the two regularizers' own statistics (csn.analysis.sparsity) of the regularized stages. Per cell (dataset
x regularizer): C4 by rule set 2 (csn.experiments.claims.c4_parts: early harm, the late - early contrast, late harm,
t intervals over seeds). Written to the study folder:

    regime_runs.parquet        one row per (condition, seed)
    regime_conditions.parquet  one row per condition (regularize.condition_table: mean, SE, every seed)
    regime.parquet             one row per cell: the C4 parts and verdict, dose, reductions vs the baseline
    regime.json                the plan, the rules version and thresholds, wall times

`--pilot` trains the first part of the recipe at several alphas per statistic (one seed) and writes
OUT/pilot/pilot.parquet: each statistic's own value against the baseline's, for choosing the alphas.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from csn import dist
from csn._version import __version__
from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.analysis.sparsity import Sparsity
from csn.core import inference as I
from csn.core import presets
from csn.core.progress import hms
from csn.core.schema import Float, Int, Schema
from csn.core.stats import STUDY_GROUP
from csn.errors import CsnError
from csn.experiments import claims, conditions
from csn.experiments.conditions import Condition, job, onset_condition, train_conditions
from csn.experiments.launcher import LauncherOptions, at_a_time, estimate_note
from csn.experiments.regularize import (
    FINAL_BN_BATCHES,
    condition_table,
    final_accuracy,
    final_per_run,
    measure_final,
    regularized_stages,
)
from csn.experiments.runner import PresetRunnerOptions, finished_seconds, is_complete
from csn.experiments.windows import Seeds
from csn.runs.config import TrainConfig, load_data
from csn.runs.config import preset as train_preset
from csn.runs.io import read_table, write_json, write_table
from csn.runs.run import Run, check_run_path

REGULARIZERS: dict[str, dict[str, Any]] = {"csn": {"reg_mode": "csn"}, "study": {"reg_mode": "study"}}
"""The two regularizer statistics as training-config keys (csn.training.regularizer; README "Which statistic")."""
REGULARIZER_TEXT = {"csn": "csn's: class means over the global batch",
                    "study": f"the study's: class sums per group of {STUDY_GROUP} images (reg_mode=study)"}
OWN_MEASURE = {"csn": "batch_csi", "study": "group_csi_excess"}
"""Each regularizer's own statistic as csn.analysis.sparsity measures it (eval mode, test split): csn's batch CSI
(class means per training batch), and the study's group CSI above its floor (group_csi - group_csi_floor: the part
of the class-sums statistic that is not the groups' class counts, which no network can change)."""
ROLES = ("baseline", "from0", "late")
END_BN_BATCHES = FINAL_BN_BATCHES
"""Training batches BatchNorm statistics are re-estimated from before every final-checkpoint analysis (accuracy, CSI,
sparsity), baseline and regularized runs alike (regularize.FINAL_BN_BATCHES: one number for every C4 measurement)."""


class RegimePreset(Schema):
    """A regime study, declared before it is run: the training recipe, the datasets (training-config keys each),
    alpha per regularizer and dataset, the late onset, the seeds, the pilot, and the declared cost per run."""

    name: str
    train_preset: str
    overrides: list[str] = []
    datasets: dict[str, dict[str, Any]] = Field(min_length=1)
    alphas: dict[str, dict[str, Float]]
    late_fraction: Float = Field(0.25, gt=0, lt=1, description="Late onset as a fraction of training.")
    seeds: Seeds = [0, 1, 2, 3, 4]
    parallel: Int = Field(2, ge=1)
    run_seconds: dict[str, Float] = Field(description="One run per dataset, single-threaded, 2 at a time.")
    analysis_seconds: dict[str, Float] = Field(description="Selectivity and sparsity of one run's final checkpoint.")
    pilot_fraction: Float = Field(0.25, gt=0, le=1, description="The pilot trains this fraction of the recipe.")
    pilot_alphas: dict[str, list[Float]] = {}
    pilot_seed: Int = 0


def get_regime_preset(name: str) -> RegimePreset:
    """A regime preset by name."""
    return RegimePreset.model_validate(presets.data("regime", name))


class RegimeOptions(PresetRunnerOptions):
    """What `csn experiment regime` takes (its command-line options are built from these fields)."""

    preset: str = Field("fmnist", description="Regime preset: fmnist (Fashion-MNIST vs fmnist-pairs, 50 runs, under "
                        "2 hours on 2 CPU cores) or smoke (synthetic, seconds).")
    seeds: Seeds | None = Field(None, description="N (seeds 0..N-1) or a comma-separated list, shared by every "
                                "condition [default: the preset's].", json_schema_extra={"metavar": "N|LIST"})
    out: str | None = Field(None, description="Study folder [default: runs/regime-<preset>].",
                            json_schema_extra={"metavar": "DIR"})
    pilot: bool = Field(False, description="Run the pilot instead (the first part of the recipe at the preset's pilot "
                        "alphas, one seed) into OUT/pilot, and print each statistic's own value against the baseline.")
    dry_run: bool = Field(False, description="Print the plan (conditions, seeds, estimated time, C4 power per cell) "
                          "and stop; writes nothing.")


# ------------------------------------------------------------------------------------------------
# conditions, cells and the plan
# ------------------------------------------------------------------------------------------------

def condition_name(dataset: str, regularizer: str | None = None, role: str = "baseline") -> str:
    """'fmnist-baseline', 'pairs-study-from0', 'fmnist-csn-late' (runs are named <condition>-s<seed>)."""
    return f"{dataset}-baseline" if regularizer is None else f"{dataset}-{regularizer}-{role}"


def _keys(pre: RegimePreset, dataset: str, regularizer: str | None = None) -> tuple[tuple[str, Any], ...]:
    return tuple({**pre.datasets[dataset], **(REGULARIZERS[regularizer] if regularizer else {})}.items())


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: a dataset and a regularizer at its alpha, with its three conditions' names."""

    dataset: str
    regularizer: str
    alpha: float

    def name(self, role: str) -> str:
        return condition_name(self.dataset, None if role == "baseline" else self.regularizer, role)


def grid(pre: RegimePreset, epochs: float) -> tuple[list[Condition], list[Cell]]:
    """The conditions (per dataset: the baseline, then per regularizer from step 0 and from the late onset) and the
    cells; alphas checked (< 0: the study suppresses selectivity)."""
    late = pre.late_fraction * epochs
    conds, cells = [], []
    for d in pre.datasets:
        conds.append(onset_condition(None, label=condition_name(d), overrides=_keys(pre, d)))
        for r in REGULARIZERS:
            alpha = pre.alphas.get(r, {}).get(d)
            if alpha is None or not alpha < 0:
                raise CsnError(f"regime preset {pre.name!r} gives regularizer {r!r} on dataset {d!r} the alpha {alpha!r}; "
                               "give a negative alpha (suppression) for every regularizer and dataset.")
            cells.append(Cell(d, r, float(alpha)))
            for role, onset in (("from0", 0.0), ("late", late)):
                conds.append(onset_condition(onset, float(alpha), condition_name(d, r, role), _keys(pre, d, r)))
    return conds, cells


@dataclass
class RegimePlan:
    """Everything the study will do, resolved before anything trains."""

    preset: RegimePreset
    base: TrainConfig
    conditions: list[Condition]
    cells: list[Cell]
    seeds: list[int]
    root: Path
    parallel: int

    @property
    def late_onset(self) -> float:
        """The late onset in epochs."""
        return self.preset.late_fraction * self.base.epochs

    def dataset_of(self, cond: Condition) -> str:
        """The dataset (slug) a condition trains on."""
        names = {condition_name(d): d for d in self.preset.datasets}
        names.update({c.name(role): c.dataset for c in self.cells for role in ROLES})
        return names[cond.name]

    def jobs(self) -> list[tuple[Condition, int, Any]]:
        return [(c, s, job(self.base, c, s, self.root)) for c in self.conditions for s in self.seeds]

    def estimate(self) -> dict[str, Any]:
        """Seconds: training (per dataset: runs left x cost per run, the median of finished runs here else the
        preset's declared cost scaled by epochs, over the runs at once) and the final-checkpoint analyses."""
        declared_epochs = train_preset(self.preset.train_preset).override(list(self.preset.overrides)).epochs
        per, todo, train_s, measured = {}, {}, 0.0, {}
        for d in self.preset.datasets:
            jobs = [j for c, _, j in self.jobs() if self.dataset_of(c) == d]
            done = finished_seconds([j.out for j in jobs])
            measured[d] = len(done)
            per[d] = statistics.median(done) if done else self.preset.run_seconds[d] * self.base.epochs / declared_epochs
            todo[d] = sum(not is_complete(j.out) for j in jobs)
            train_s += todo[d] * per[d]
        n_todo = sum(todo.values())
        analysis_s = sum(self.preset.analysis_seconds[d] * len(self.seeds) * 5 for d in self.preset.datasets)
        return {"runs": len(self.jobs()), "runs_todo": n_todo, "run_seconds": per, "measured_runs": measured,
                "training_s": train_s / max(1, min(self.parallel, max(1, n_todo))), "analysis_s": analysis_s}


def make_plan(opts: RegimeOptions, overrides: list[str] | tuple[str, ...] = ()) -> RegimePlan:
    """Resolve the options against the preset; every mistake is one CsnError (nothing is loaded or written)."""
    pre = get_regime_preset(opts.preset)
    base = train_preset(pre.train_preset).override(list(pre.overrides) + list(overrides))
    if base.reg_alpha is not None or base.reg_window is not None or base.reg_schedule:
        raise CsnError("the training config already has a regularizer (reg_alpha/reg_window/reg_schedule); the regime "
                       "study sets it per condition, so drop those overrides.")
    conds, cells = grid(pre, base.epochs)
    seeds = list(opts.seeds) if opts.seeds is not None else list(pre.seeds)
    root = Path(opts.out) if opts.out else Path("runs") / f"regime-{pre.name}"
    check_run_path(root, "--out")
    return RegimePlan(pre, base, conds, cells, seeds, root, opts.parallel or pre.parallel)


# ------------------------------------------------------------------------------------------------
# power, and the plan in words
# ------------------------------------------------------------------------------------------------

def c4_power(sd: float, seeds: int) -> dict[str, float]:
    """C4's power (rule set 2, claims.c4_parts: both parts) at the declared effect (claims.EFFECTS['c4_harm']: from
    step 0 costs half a point, the late onset nothing), and the early-harm part's power there and its minimal
    detectable effect, for a per-run spread `sd` of final accuracy. With a large spread the late part ("late costs
    little": the late harm's interval below c4_little) cannot hold whatever the early effect, so C4's MDE is
    infinite while the early harm stays measurable."""
    if seeds < 2 or not math.isfinite(sd):
        return {"sd": sd, "power": math.nan, "mde": math.nan, "early_power": math.nan, "early_mde": math.nan}
    sd = max(sd, 1e-9)
    sim = claims.simulate_c4(claims.Spread(c4_run_sd=sd))

    def early(rng: np.random.Generator, effect: float, n: int, studies: int) -> np.ndarray:
        b, f = (rng.normal(0, sd, (studies, n)) for _ in range(2))
        return claims.c4_parts(b, f - effect, b)["early_codes"]
    effect = claims.EFFECTS["c4_harm"]
    return {"sd": sd, "power": I.power(sim, effect, seeds),
            "mde": I.minimal_detectable_effect(sim, seeds, upper=0.05, studies=1000),
            "early_power": I.power(early, effect, seeds),
            "early_mde": I.minimal_detectable_effect(early, seeds, upper=0.2, studies=1000)}


def _power_text(p: dict[str, float]) -> str:
    mde = "inf" if not math.isfinite(p["mde"]) else f"{100 * p['mde']:.2f}"
    return (f"C4 power {p['power']:.2f} (MDE {mde} points), early harm alone power {p['early_power']:.2f} "
            f"(MDE {100 * p['early_mde']:.2f} points)")


def measured_spread(plan: RegimePlan, dataset: str) -> float:
    """The SD over seeds of the finished baselines' final test accuracy after BatchNorm re-estimation (the accuracy
    C4 judges; their accuracy tables) of a dataset; NaN with fewer than 2. The checkpoints' eval-mode accuracy is
    not used: at a constant learning rate it is far noisier (2.25 points against 0.31 on the first 5 fmnist baselines)."""
    accs = [final_accuracy(Run(j.out)) for c, _, j in plan.jobs()
            if c.onset is None and plan.dataset_of(c) == dataset and is_complete(j.out)]
    accs = [a for a in accs if math.isfinite(a)]
    return float(np.std(accs, ddof=1)) if len(accs) >= 2 else math.nan


def plan_text(plan: RegimePlan, launcher: LauncherOptions | None = None) -> str:
    """The plan as printed before anything starts: the grid, the cells, the estimate and the power per cell.
    launcher: where the runs train (--launcher slurm: one job per run)."""
    e, b = plan.estimate(), plan.base
    lines = [f"regime study '{plan.preset.name}' in {plan.root}: {len(plan.conditions)} conditions x {len(plan.seeds)} "
             f"seeds ({', '.join(map(str, plan.seeds))}) = {e['runs']} runs, {e['runs_todo']} to train, "
             f"{at_a_time(launcher, plan.parallel)}",
             f"  each run: {b.model} (width {b.width:g}), {b.epochs:g} epochs, lr {b.lr:g} {b.lr_schedule}, batch "
             f"{b.batch_size}; late onset at {plan.preset.late_fraction:.0%} of training (epoch {plan.late_onset:g})",
             f"  {'condition':<22} {'alpha':>6}  {'onset (epoch)':<14} keys"]
    for c in plan.conditions:
        keys = " ".join(f"{k}={v}" for k, v in c.overrides)
        lines.append(f"  {c.name:<22} {c.alpha:>6g}  {'–' if c.onset is None else f'{c.onset:g}':<14} {keys}")
    recorded = claims.Spread().c4_run_sd
    lines.append(f"  C4 per cell (claims.c4_parts, rule set {claims.RULES_VERSION}); power at the declared effect "
                 f"(from step 0 costs {100 * claims.EFFECTS['c4_harm']:.1f} points, late nothing) with "
                 f"{len(plan.seeds)} seeds, from the recorded spread (SD {100 * recorded:.2f} points, fmnist study) and "
                 "from this study's finished baselines where 2 or more have their accuracy after BatchNorm "
                 "re-estimation (measured at the end of training, or by an earlier invocation):")
    rec = c4_power(recorded, len(plan.seeds))
    spread = {d: c4_power(measured_spread(plan, d), len(plan.seeds)) for d in plan.preset.datasets}
    for cell in plan.cells:
        meas = spread[cell.dataset]
        mtxt = (f"\n      measured SD {100 * meas['sd']:.2f} points: {_power_text(meas)}" if math.isfinite(meas["sd"]) else "")
        lines.append(f"    {cell.dataset:<8} {cell.regularizer:<6} alpha {cell.alpha:>6g}: recorded SD: {_power_text(rec)}{mtxt}")
    src = ", ".join(f"{d} {e['run_seconds'][d]:.0f} s ({'median of ' + str(e['measured_runs'][d]) + ' finished runs' if e['measured_runs'][d] else 'declared'})"
                    for d in plan.preset.datasets)
    lines.append(f"  estimated time: about {hms(e['training_s'] + e['analysis_s'])} (per run: {src}; "
                 f"{estimate_note(launcher, plan.parallel)}; analyses {hms(e['analysis_s'])})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# training and measuring
# ------------------------------------------------------------------------------------------------

def check_existing(plan: RegimePlan, base: TrainConfig | None = None, conds: list[Condition] | None = None,
                   seeds: list[int] | None = None, root: Path | None = None) -> None:
    """Refuse runs already in the study folder that were trained with another configuration."""
    base, conds = base or plan.base, conds or plan.conditions
    conditions.check_existing(((c, job(base, c, s, root or plan.root)) for c in conds for s in seeds or plan.seeds),
                              what="study")


def measure(runs: dict[tuple[str, int], Run], *, progress: bool = True) -> None:
    """Test accuracy (csn.analysis.accuracy), CSI/eta² (csn's selectivity analysis) and sparsity
    (csn.analysis.sparsity) at every run's final checkpoint, BatchNorm statistics re-estimated from END_BN_BATCHES
    training batches; resumable (checkpoints already in the tables are skipped); each dataset is loaded once."""
    notes: list[str] = []

    def log(msg: str) -> None:  # a note once, not once per run (the experiment takes no --bn-recalibrate)
        msg = msg.replace(" (--bn-recalibrate 0 to turn off)", "")
        if msg not in notes:
            notes.append(msg)
            if dist.is_main():
                print(msg, file=sys.stderr, flush=True)

    by_data: dict[str, list[Run]] = {}
    for run in runs.values():
        cfg = run.config
        by_data.setdefault(json.dumps([cfg.dataset, cfg.data_root, cfg.synthetic], sort_keys=True), []).append(run)
    for group in by_data.values():
        data = load_data(group[0].config)
        measure_final(group, data=data, progress=progress, log=log)
        for analysis in (Selectivity(), Sparsity()):
            run_analysis(group, analysis, data=data, checkpoints="last", bn_recalibrate=END_BN_BATCHES,
                         progress=progress, log=log)


SPARSITY_COLUMNS = ("sparsity", "group_csi", "group_csi_floor", "group_csi_excess", "batch_csi")
"""The sparsity table's measures in regime_runs (final_<column>); group_csi_excess = group_csi - group_csi_floor
(a dead unit counts as at the floor)."""


def _sparsity_means(run: Run, stages: list[str]) -> dict[str, float]:
    """Mean over the units of `stages` at the run's last measured step of each SPARSITY_COLUMNS (NaN without it)."""
    df = run.read("sparsity")
    if df is None or df.empty:
        return {c: math.nan for c in SPARSITY_COLUMNS}
    part = df[(df["step"] == df["step"].max()) & df["stage"].isin(stages)]
    part = part.assign(group_csi_excess=np.where(part["dead"], 0.0, part["group_csi"] - part["group_csi_floor"]))
    return {c: float(part[c].mean()) if len(part) else math.nan for c in SPARSITY_COLUMNS}


def per_seed_table(plan: RegimePlan, runs: dict[tuple[str, int], Run], conds: list[Condition] | None = None) -> pd.DataFrame:
    """One row per (condition, seed): regularize.final_per_run's columns (dose, final CSI and eta² of the regularized
    stages) with final_test_acc the whole test split's accuracy after BatchNorm re-estimation (csn.analysis.accuracy;
    the checkpoint's eval-mode one is final_test_acc_eval), plus dataset, regularizer, role, the statistic that ran,
    and the final sparsity, group_csi (and floor) and batch_csi of the regularized stages (mean over their units)."""
    conds = conds or plan.conditions
    df = final_per_run(runs, conds)
    info = {c.name: (plan.dataset_of(c) if c in plan.conditions else _pilot_dataset(plan, c), *_role(c)) for c in conds}
    extra = []
    for (name, _seed), run in runs.items():
        stages = regularized_stages(run)
        resolved = run.config.reg_resolved
        d, reg, role = info[name]
        extra.append({"dataset": d, "regularizer": reg, "role": role, "reg_statistic": resolved["statistic"],
                      "reg_group": str(resolved["group"]),
                      **{f"final_{k}": v for k, v in _sparsity_means(run, stages).items()}})
    return pd.concat([df.reset_index(drop=True), pd.DataFrame(extra)], axis=1)


def _role(cond: Condition) -> tuple[str, str]:
    """(regularizer, role) of a condition from its keys and onset ('' and 'baseline' for a baseline)."""
    if cond.onset is None:
        return "", "baseline"
    reg = next((r for r, keys in REGULARIZERS.items() if all(dict(cond.overrides).get(k) == v for k, v in keys.items())), "")
    return reg, "from0" if cond.onset == 0 else ("late" if cond.name.endswith("-late") else "pilot")


def _pilot_dataset(plan: RegimePlan, cond: Condition) -> str:
    keys = dict(cond.overrides)
    return next(d for d, dk in plan.preset.datasets.items() if all(keys.get(k) == v for k, v in dk.items()))


MEASURES = ("csi", "eta2", "sparsity", "group_csi", "group_csi_excess", "batch_csi")
"""Per-condition measures of the regularized stages compared with the baseline (final_<measure> in regime_runs)."""


def cell_row(cell: Cell, per_seed: pd.DataFrame, rules: dict[str, float] | None = None) -> dict[str, Any]:
    """One cell: C4 by claims.c4_parts on the final accuracies paired by seed, the verdict and its two parts, the
    dose (claims.c4_dose: regularized steps, mean lr) and each measure's reduction against the baseline."""
    rules = rules or claims.THRESHOLDS
    role_of = {cell.name(r): r for r in ROLES}
    sub = per_seed[per_seed["condition"].isin(list(role_of))].assign(condition=lambda x: x["condition"].map(role_of))
    acc = {r: {int(s): float(a) for s, a in zip(g["seed"], g["final_test_acc"]) if a is not None and math.isfinite(a)}
           for r, g in sub.groupby("condition")}
    seeds = sorted(set.intersection(*(set(acc.get(r, {})) for r in ROLES)))
    row: dict[str, Any] = {"dataset": cell.dataset, "regularizer": cell.regularizer, "alpha": cell.alpha,
                           "statistic": REGULARIZER_TEXT[cell.regularizer], "seeds": ",".join(map(str, seeds)),
                           "n_seeds": len(seeds)}
    arrays = [np.array([acc[r][s] for s in seeds], dtype=np.float64) for r in ROLES] if seeds else [np.array([])] * 3
    p = claims.c4_parts(*arrays, rules)
    for r, a in zip(ROLES, arrays):
        row[f"acc_{r}"] = float(a.mean()) if len(a) else math.nan
    if "final_test_acc_eval" in sub:  # the checkpoints' eval-mode accuracy (no re-estimation), described only
        ev = sub[sub["seed"].isin(seeds)].groupby("condition")["final_test_acc_eval"].mean()
        row.update({f"acc_{r}_eval": float(ev.get(r, math.nan)) for r in ROLES})
        row["early_harm_eval_mean"] = row["acc_baseline_eval"] - row["acc_from0_eval"]
        row["late_harm_eval_mean"] = row["acc_baseline_eval"] - row["acc_late_eval"]
    for k in ("early_harm", "contrast", "late_harm"):
        iv = p[k].item()
        row.update({f"{k}_mean": iv.mean, f"{k}_lo": iv.lo, f"{k}_hi": iv.hi, f"{k}_se": iv.se})
    row.update(early_verdict=claims.CLAIM_WORDS[int(p["early_codes"])], late_verdict=claims.CLAIM_WORDS[int(p["late_codes"])],
               verdict=claims.CLAIM_WORDS[int(p["codes"])])
    dose = claims.c4_dose(sub, seeds)
    paired = sub[sub["seed"].isin(seeds)]
    for r in ROLES:
        g = paired[paired["condition"] == r]
        for m in MEASURES:
            row[f"{r}_{m}"] = float(g[f"final_{m}"].mean()) if f"final_{m}" in g and len(g) else math.nan
        if r != "baseline":
            row[f"{r}_reg_steps"] = dose.get(r, {}).get("reg_steps", math.nan)
            row[f"{r}_reg_mean_lr"] = dose.get(r, {}).get("reg_mean_lr", math.nan)
            for m in MEASURES:
                base = row[f"baseline_{m}"]
                row[f"{r}_{m}_reduction"] = 1 - row[f"{r}_{m}"] / base if base else math.nan
    own = OWN_MEASURE[cell.regularizer]
    row["own_measure"] = own
    row["own_reduction_from0"] = row[f"from0_{own}_reduction"]
    return row


def cell_table(cells: list[Cell], per_seed: pd.DataFrame, rules: dict[str, float] | None = None) -> pd.DataFrame:
    """regime.parquet: one row per cell (cell_row)."""
    return pd.DataFrame([cell_row(c, per_seed, rules) for c in cells])


def c4_rule_text(rules: dict[str, float] | None = None) -> str:
    """C4 per cell in words (rule set 2's c4_parts)."""
    r = rules or claims.THRESHOLDS
    return (f"final test accuracy after BatchNorm re-estimation ({END_BN_BATCHES} batches), paired by seed, t intervals "
            f"({r['confidence']:.0%}): early harm = baseline - from step 0 >= "
            f"{r['c4_min_harm']:g} with its interval above 0; late costs little = late - from step 0 >= "
            f"{r['c4_min_harm']:g} with its interval above 0 and the late harm's interval below {r['c4_little']:g}; "
            f"reproduced if both, not reproduced if either part's interval excludes it (claims.c4_parts, rule set "
            f"{claims.RULES_VERSION}); the dose and the reductions are reported beside, not judged")


def run_regime(plan: RegimePlan, *, progress: bool = True,
               launcher: LauncherOptions | None = None) -> dict[str, pd.DataFrame]:
    """Train every (condition, seed) (finished runs skipped, partial ones resumed; here, or where `launcher` says),
    measure the final checkpoints, write the tables and regime.json; returns the tables by name."""
    dist.on_main(check_existing, plan)
    t0 = time.perf_counter()
    runs = train_conditions(plan.base, plan.conditions, plan.seeds, plan.root, parallel=plan.parallel, progress=progress,
                            launcher=launcher)
    t_train = time.perf_counter() - t0
    measure(runs, progress=progress)
    t_measure = time.perf_counter() - t0 - t_train
    per_seed = per_seed_table(plan, runs)
    tables = {"regime_runs": per_seed, "regime_conditions": condition_table(per_seed),
              "regime": cell_table(plan.cells, per_seed)}

    def write() -> None:
        for name, df in tables.items():
            write_table(plan.root / f"{name}.parquet", df)
        write_json(plan.root / "regime.json", record(plan, {"training": round(t_train, 1), "analyses": round(t_measure, 1)}))

    dist.on_main(write)
    return tables


def record(plan: RegimePlan, wall: dict[str, float] | None = None) -> dict[str, Any]:
    """regime.json: the plan as declared and resolved, the rules (version, date, C4 thresholds) and wall times."""
    return {"preset": plan.preset.to_dict(), "train_config": plan.base.to_dict(), "seeds": plan.seeds,
            "late_onset_epochs": plan.late_onset, "conditions": [c.record() for c in plan.conditions],
            "cells": [{"dataset": c.dataset, "regularizer": c.regularizer, "alpha": c.alpha,
                       "statistic": REGULARIZER_TEXT[c.regularizer],
                       "conditions": {r: c.name(r) for r in ROLES}} for c in plan.cells],
            "rules_version": claims.RULES_VERSION, "rules_declared": claims.RULES_DECLARED,
            "thresholds": {k: v for k, v in claims.THRESHOLDS.items() if k.startswith("c4_") or k == "confidence"},
            "c4_rule": c4_rule_text(), "recorded_spread": claims.Spread().c4_run_sd, "parallel": plan.parallel,
            "end_bn_batches": END_BN_BATCHES,
            "estimate": plan.estimate(), "wall_seconds": wall or {}, "csn_version": __version__,
            "torch_version": torch.__version__}


# ------------------------------------------------------------------------------------------------
# the pilot: alpha per statistic
# ------------------------------------------------------------------------------------------------

PILOT_CHECKPOINTS = "f0.5,end"
"""The pilot's checkpoints (extra checkpoints never change training; the analyses read the last)."""


def pilot_plan(plan: RegimePlan) -> tuple[TrainConfig, list[Condition], list[int], Path]:
    """The pilot: the first pilot_fraction of the recipe (constant lr: the same steps as the full runs' first part),
    per dataset the baseline and each regularizer from step 0 at each pilot alpha, one seed, under OUT/pilot."""
    pre = plan.preset
    base = plan.base.replace(epochs=pre.pilot_fraction * plan.base.epochs, checkpoints=PILOT_CHECKPOINTS)
    conds = []
    for d in pre.datasets:
        conds.append(onset_condition(None, label=condition_name(d), overrides=_keys(pre, d)))
        for r in REGULARIZERS:
            for a in pre.pilot_alphas.get(r, []):
                conds.append(onset_condition(0.0, float(a), f"{d}-{r}-a{a:g}", _keys(pre, d, r)))
    return base, conds, [pre.pilot_seed], plan.root / "pilot"


def pilot_text_plan(plan: RegimePlan) -> str:
    """The pilot's plan in words."""
    base, conds, seeds, root = pilot_plan(plan)
    return (f"pilot of regime study '{plan.preset.name}' in {root}: {len(conds)} runs (seed {seeds[0]}), {base.epochs:g} "
            f"epochs each ({plan.preset.pilot_fraction:.0%} of the recipe, lr {base.lr:g} {base.lr_schedule}); "
            + "; ".join(f"{r}: alpha {', '.join(f'{a:g}' for a in plan.preset.pilot_alphas.get(r, []))}" for r in REGULARIZERS)
            + "; measured at the end of the pilot (inside the from-step-0 window)")


def run_pilot(plan: RegimePlan, *, progress: bool = True, launcher: LauncherOptions | None = None) -> pd.DataFrame:
    """Train the pilot (here, or where `launcher` says), measure each run's last checkpoint, write OUT/pilot/pilot.parquet and pilot.json; returns
    one row per (dataset, regularizer, alpha) with every measure and its reduction against the baseline."""
    base, conds, seeds, root = pilot_plan(plan)
    dist.on_main(check_existing, plan, base, conds, seeds, root)
    runs = train_conditions(base, conds, seeds, root, parallel=plan.parallel, progress=progress, launcher=launcher)
    measure(runs, progress=progress)
    per_seed = per_seed_table(plan, runs, conds)
    rows = []
    for d in plan.preset.datasets:
        b = per_seed[per_seed["condition"] == condition_name(d)].iloc[0]
        for r in per_seed[(per_seed["dataset"] == d) & (per_seed["role"] != "baseline")].itertuples():
            row = {"dataset": d, "regularizer": r.regularizer, "alpha": r.alpha, "test_acc": r.final_test_acc,
                   "base_test_acc": b["final_test_acc"], "own_measure": OWN_MEASURE[r.regularizer]}
            for m in MEASURES:
                row[m], row[f"base_{m}"] = getattr(r, f"final_{m}"), b[f"final_{m}"]
                row[f"{m}_reduction"] = 1 - row[m] / row[f"base_{m}"] if row[f"base_{m}"] else math.nan
            row["own_reduction"] = row[f"{row['own_measure']}_reduction"]
            rows.append(row)
    table = pd.DataFrame(rows)

    def write() -> None:
        write_table(root / "pilot.parquet", table)
        write_table(root / "pilot_runs.parquet", per_seed)
        write_json(root / "pilot.json", {"train_config": base.to_dict(), "seed": seeds[0],
                                         "conditions": [c.record() for c in conds], "csn_version": __version__})

    dist.on_main(write)
    return table


def pilot_text(table: pd.DataFrame) -> str:
    """The pilot's table: per (dataset, regularizer, alpha) each measure of the regularized stages against the
    baseline (the statistic's own measure marked *), and test accuracy."""
    shown = ("batch_csi", "group_csi_excess", "group_csi", "csi", "eta2", "sparsity")
    lines = [f"{'dataset':<8} {'reg':<6} {'alpha':>6}  " + " ".join(f"{m:>16}" for m in shown) + f" {'test acc':>14}"]
    for r in table.itertuples():
        cells = []
        for m in shown:
            mark = "*" if m == r.own_measure else " "
            cells.append(f"{getattr(r, m):.3f}/{getattr(r, 'base_' + m):.3f} {-100 * getattr(r, m + '_reduction'):+4.0f}%{mark}")
        lines.append(f"{r.dataset:<8} {r.regularizer:<6} {r.alpha:>6g}  " + " ".join(f"{c:>16}" for c in cells)
                     + f" {r.test_acc:.4f}/{r.base_test_acc:.4f}")
    lines.append("values: run/baseline and the change; * = the regularizer's own statistic (csn: batch_csi, class "
                 "means per training batch; study: group_csi_excess, class sums per group of 32 above the floor the "
                 "groups' class counts give), eval mode, test split; regularized stages")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# reading a study back, and its text
# ------------------------------------------------------------------------------------------------

REGIME_TABLES: dict[str, tuple[str, ...]] = {
    "regime": ("dataset", "regularizer", "alpha", "n_seeds", "early_harm_mean", "early_harm_lo", "early_harm_hi",
               "contrast_mean", "contrast_lo", "contrast_hi", "late_harm_mean", "late_harm_lo", "late_harm_hi",
               "early_verdict", "late_verdict", "verdict", "from0_reg_steps", "from0_reg_mean_lr", "late_reg_steps",
               "late_reg_mean_lr", "from0_csi_reduction", "from0_eta2_reduction", "from0_sparsity_reduction"),
    "regime_runs": ("condition", "dataset", "regularizer", "role", "seed", "final_test_acc"),
    "regime_conditions": ("condition", "seeds", "final_test_acc_mean", "final_test_acc_se"),
}
"""The study's tables and the columns the report reads from each."""


def read_regime(root: str | Path) -> dict[str, Any]:
    """A study's tables (by name) and regime.json ('info'), checked: a missing, unreadable or incomplete file is one
    CsnError naming it and the fix."""
    root = Path(root)
    fix = "run the same `csn experiment regime` command again to rewrite it"
    out: dict[str, Any] = {}
    for name, cols in REGIME_TABLES.items():
        path = root / f"{name}.parquet"
        if not path.is_file():
            raise CsnError(f"{path} is missing; {fix}.")
        df = read_table(path, columns={})
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise CsnError(f"{path} lacks columns {missing}; {fix}.")
        out[name] = df
    try:
        info = json.loads((root / "regime.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CsnError(f"{root / 'regime.json'} is missing or corrupt; {fix}.") from None
    out["info"] = info if isinstance(info, dict) else {}
    return out


def _ci(r: Any, k: str) -> str:
    return f"{100 * getattr(r, k + '_mean'):+.2f} [{100 * getattr(r, k + '_lo'):+.2f}, {100 * getattr(r, k + '_hi'):+.2f}]"


def _pct(x: float) -> str:
    return f"{-100 * x:+.0f}%" if x is not None and math.isfinite(x) else "–"


def cell_text(table: pd.DataFrame) -> str:
    """One line per cell: where early suppression harms, and how much (accuracy points, 95 % t intervals)."""
    lines = [f"{'dataset':<8} {'reg':<6} {'alpha':>6} {'early harm [95% CI]':>22} {'late - early [CI]':>22} "
             f"{'late harm [CI]':>22}  {'C4 (early / late)':<40} {'dose from0 | late (steps, lr)':<30} "
             "CSI / eta2 / sparsity / own, from step 0"]
    for r in table.itertuples():
        verdict = f"{r.verdict} ({r.early_verdict} / {r.late_verdict})"
        dose = f"{r.from0_reg_steps:.0f}, {r.from0_reg_mean_lr:.3g} | {r.late_reg_steps:.0f}, {r.late_reg_mean_lr:.3g}"
        red = " / ".join(_pct(getattr(r, f"from0_{m}_reduction")) for m in ("csi", "eta2", "sparsity")) \
            + f" / {_pct(r.own_reduction_from0)}"
        lines.append(f"{r.dataset:<8} {r.regularizer:<6} {r.alpha:>6g} {_ci(r, 'early_harm'):>22} {_ci(r, 'contrast'):>22} "
                     f"{_ci(r, 'late_harm'):>22}  {verdict:<40} {dose:<30} {red}")
    lines.append("accuracy in points (paired by seed); C4 by " + c4_rule_text())
    return "\n".join(lines)


__all__ = ["REGULARIZERS", "REGULARIZER_TEXT", "OWN_MEASURE", "ROLES", "END_BN_BATCHES", "RegimePreset",
           "get_regime_preset", "RegimeOptions", "condition_name", "Cell", "grid", "RegimePlan", "make_plan", "c4_power",
           "measured_spread", "plan_text", "check_existing", "measure", "per_seed_table", "MEASURES", "cell_row",
           "cell_table", "c4_rule_text", "run_regime", "record", "PILOT_CHECKPOINTS", "pilot_plan", "pilot_text_plan",
           "run_pilot", "pilot_text", "REGIME_TABLES", "read_regime", "cell_text"]
