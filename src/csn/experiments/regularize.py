"""The causal experiment (claim C4): unregularized baseline vs the selectivity regularizer switched on
at different onsets, every condition with the same seeds; final accuracy and selectivity reached."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from csn import dist
from csn.analysis.accuracy import Accuracy
from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.core.bn import DEFAULT_BN_BATCHES
from csn.core.lr import lr_at
from csn.core.stats import band, standard_error
from csn.core.times import TimePoint, onset_epoch, parse_times
from csn.core.units import stage_of
from csn.errors import CsnError
from csn.experiments.runner import Job, run_jobs
from csn.runs.config import TrainConfig
from csn.runs.io import write_table
from csn.runs.naming import run_name
from csn.runs.run import Run
from csn.training.regularizer import default_reg_layers


@dataclass(frozen=True)
class Condition:
    """A training condition: alpha switched on from `onset` (epochs) to the end; onset None = baseline.

    label: the condition's own name (default: baseline / reg-from-<onset>); overrides: extra training-config keys
    of this condition, as (key, value) pairs (e.g. (("dataset", "fmnist-pairs"), ("reg_mode", "study"))), applied
    after the regularizer's keys and recorded by `record()` and in run.json (the config that trained)."""

    onset: float | None
    alpha: float = 0.0
    label: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return "baseline" if self.onset is None else f"reg-from-{self.onset:g}"

    def apply(self, cfg: TrainConfig, seed: int) -> TrainConfig:
        """The config of this condition trained with `seed` (named `<condition>-s<seed>`)."""
        if self.onset is None:
            reg = dict(reg_alpha=None, reg_window=None, reg_schedule=None)
        else:
            # the exact epoch (an onset resolved from steps or fractions is step / steps_per_epoch: 0.3326...)
            onset = f"{self.onset:g}" if float(f"{self.onset:g}") == self.onset else repr(float(self.onset))
            reg = dict(reg_alpha=self.alpha, reg_window=f"{onset}:end", reg_schedule=None)
        return cfg.replace(seed=seed, name=run_name(self.name, seed), **{**reg, **dict(self.overrides)})

    def record(self) -> dict[str, Any]:
        """The condition as plain data (name, onset, alpha, overrides), for an experiment's JSON record."""
        return {"name": self.name, "onset": self.onset, "alpha": self.alpha, "overrides": dict(self.overrides)}


def conditions(alpha: float, onsets: list[float]) -> list[Condition]:
    """Baseline plus one regularized condition per onset."""
    if alpha == 0:
        raise CsnError("--alpha 0 regularizes nothing; give a negative alpha to suppress selectivity (e.g. -2).")
    if len(set(onsets)) != len(onsets):
        raise CsnError(f"onsets {onsets} repeat a value; give distinct onsets such as 0,1.")
    return [Condition(None)] + [Condition(float(o), float(alpha)) for o in onsets]


def parse_onsets(text: str, steps_per_epoch: int, total: int) -> list[float]:
    """Onsets as points in training (csn.core.times: step=0, an epoch 1.5, a fraction f0.33), each resolved to the
    epoch step / steps_per_epoch of its optimizer step, which must lie inside training (0 to total - 1)."""
    items = parse_times(str(text), "--onsets")
    ranges = [item for item in items if not isinstance(item, TimePoint)]
    if ranges:
        raise CsnError(f"--onsets item {ranges[0]} is a range; give points where the regularizer switches on, e.g. "
                       "step=0,f0.33 or 0,1 (epochs).")
    return [onset_epoch(item, steps_per_epoch, total, what="onset", from_zero=True) for item in items]


def recorded_condition(run: Run) -> tuple[float | None, float]:
    """(onset in epochs, alpha) of a run as its run.json records the regularizer (Run.reg_windows): the first window's
    start step / steps per epoch, exact; (None, 0.0) for a run trained without the regularizer (a baseline)."""
    windows = [w for w in run.reg_windows if w.alpha != 0]
    if not windows:
        return None, 0.0
    return windows[0].start_step / int(run.info["steps_per_epoch"]), float(windows[0].alpha)


def job(base: TrainConfig, cond: Condition, seed: int, root: str | Path) -> Job:
    """The training job of one condition and seed: its config, and its folder ROOT/<condition>-s<seed>."""
    cfg = cond.apply(base, seed)
    return Job(cfg, Path(root) / cfg.name)


def train_conditions(base: TrainConfig, conds: list[Condition], seeds: list[int], root: str | Path, *,
                     parallel: int = 1, progress: bool = True) -> dict[tuple[str, int], Run]:
    """Train every (condition, seed) run under root (finished runs are skipped, partial ones resumed)."""
    jobs, keys = [], []
    for cond in conds:
        for seed in seeds:
            jobs.append(job(base, cond, seed, root))
            keys.append((cond.name, seed))
    runs = run_jobs(jobs, parallel=parallel, progress=progress, desc="regularization runs")
    return dict(zip(keys, runs))


def dose(run: Run) -> dict[str, float]:
    """How much regularization a run received: reg_steps = optimizer steps with alpha != 0 (Run.reg_windows),
    reg_mean_lr = the mean learning rate over those steps, reg_mean_abs_alpha = the mean |alpha| over them (0 and
    NaN for a baseline)."""
    cfg, info = run.config, run.info
    steps = [(t, w.alpha) for w in run.reg_windows for t in range(w.start_step, w.end_step) if w.alpha != 0]
    if not steps:
        return {"reg_steps": 0, "reg_mean_lr": math.nan, "reg_mean_abs_alpha": math.nan}
    total, spe = int(info["total_steps"]), int(info["steps_per_epoch"])
    lrs = [lr_at(t, total, spe, cfg.lr, cfg.lr_schedule, milestones=cfg.milestones, gamma=cfg.gamma,
                 warmup_epochs=cfg.warmup_epochs) for t, _ in steps]
    return {"reg_steps": len(steps), "reg_mean_lr": float(np.mean(lrs)),
            "reg_mean_abs_alpha": float(np.mean([abs(a) for _, a in steps]))}


FINAL_BN_BATCHES = DEFAULT_BN_BATCHES
"""Training batches BatchNorm statistics are re-estimated from before the final accuracy is measured (rule set 2 as
amended on 2026-12-05: the checkpoint's running statistics lag the weights, differently under a regularizer)."""


def final_accuracy(run: Run) -> float:
    """Test accuracy at the run's last checkpoint after BatchNorm re-estimation (its accuracy table: csn.analysis.
    accuracy with bn_recalibrated > 0), NaN when it was not measured (measure_final measures it)."""
    df = run.read("accuracy")
    if df is None or df.empty:
        return math.nan
    last = df[(df["step"] == run.checkpoints[-1].step) & (df["bn_recalibrated"] > 0)]
    return float(last["acc"].iloc[-1]) if len(last) else math.nan


def measure_final(runs: list[Run], *, data=None, progress: bool = True, log=None) -> None:
    """Test accuracy (whole test split) at every run's last checkpoint, BatchNorm statistics re-estimated from
    FINAL_BN_BATCHES training batches (csn.analysis.accuracy); resumable: runs already measured are skipped. data:
    the runs' DataSplits when the caller has loaded them (runs of one dataset)."""
    run_analysis(runs, Accuracy(), data=data, checkpoints="last", bn_recalibrate=FINAL_BN_BATCHES, progress=progress,
                 log=log)


def final_per_run(runs: dict[tuple[str, int], Run], conds: list[Condition], reg_stages: list[str] | None = None) -> pd.DataFrame:
    """One row per (condition, seed): final test accuracy after BatchNorm re-estimation (final_accuracy; the
    checkpoint's eval-mode accuracy beside it as final_test_acc_eval), the dose (dose), and mean CSI / eta^2 of the
    regularized stages at the end."""
    by_name = {c.name: c for c in conds}
    rows = []
    for (name, seed), run in runs.items():
        last = run.checkpoints[-1]
        row = {"condition": name, "onset": by_name[name].onset, "alpha": by_name[name].alpha, "seed": seed,
               "run": str(run.path), "final_epoch": last.epoch, "final_test_acc": final_accuracy(run),
               "final_test_acc_eval": last.metrics.get("test_acc"), **dose(run)}
        sel = run.read("selectivity")
        if sel is not None and not sel.empty:
            final = sel[sel["step"] == sel["step"].max()]
            stages = reg_stages or regularized_stages(run)
            part = final[final["stage"].isin(stages)]
            row.update(final_csi=float(part["csi"].mean()), final_eta2=float(part["eta2"].mean()),
                       final_csi_all=float(final["csi"].mean()), final_eta2_all=float(final["eta2"].mean()))
        rows.append(row)
    return pd.DataFrame(rows)


def regularized_stages(run: Run) -> list[str]:
    """Stages the run's regularizer acts on (its reg_layers, else every stage but the last)."""
    layers = run.config.reg_layers
    model = run.build_model()
    names = layers or default_reg_layers(model)
    return sorted({stage_of(model, n) for n in names})


def condition_curves(runs_by_cond: dict[str, list[Run]], stages: list[str]) -> dict[str, dict[str, pd.DataFrame]]:
    """Per quantity (test_acc, csi, eta2) and condition, the band over seeds vs epoch (csn.core.stats.band):
    test accuracy at the checkpoints, and the mean CSI / eta² of `stages` from the selectivity tables."""
    def acc(run: Run) -> pd.Series:
        ck = run.checkpoints
        return pd.Series([c.metrics.get("test_acc") for c in ck], index=[c.epoch for c in ck], dtype=float)

    def sel(col: str):
        def f(run: Run) -> pd.Series | None:
            table = run.read("selectivity")
            if table is None or table.empty:
                return None
            part = table[table["stage"].isin(stages)] if stages else table
            return part.groupby("epoch")[col].mean()
        return f

    out: dict[str, dict[str, pd.DataFrame]] = {}
    for what, value in (("test_acc", acc), ("csi", sel("csi")), ("eta2", sel("eta2"))):
        bands = {name: band([value(r) for r in runs]) for name, runs in runs_by_cond.items()}
        out[what] = {name: b for name, b in bands.items() if b is not None}
    return out


def condition_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per condition: mean and standard error over seeds of final accuracy and selectivity, and every seed's accuracy."""
    out = []
    for name, g in per_seed.groupby("condition", sort=False):
        row = {"condition": name, "onset": g["onset"].iloc[0], "alpha": g["alpha"].iloc[0], "seeds": len(g)}
        for col in ("final_test_acc", "final_test_acc_eval", "final_csi", "final_eta2"):
            if col in g:
                v = g[col].to_numpy(dtype=float)
                row[f"{col}_mean"] = float(np.mean(v))
                row[f"{col}_se"] = standard_error(v)
        row["final_test_acc_per_seed"] = ", ".join(f"{a:.4f}" for a in g["final_test_acc"])
        out.append(row)
    return pd.DataFrame(out)


def regularize_experiment(base: TrainConfig, alpha: float, onsets: list[float], seeds: list[int], root: str | Path, *,
                          parallel: int = 1, progress: bool = True, selectivity: bool = True,
                          selectivity_samples: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train every condition and seed, measure selectivity at every checkpoint, write the tables.

    Returns (per-seed table, per-condition table, {condition: [Run]}); `csn experiment regularize`
    draws the figures from them. Under torchrun the runs train with DDP one after the other,
    selectivity is sharded, and rank 0 writes the tables.
    """
    root = Path(root)
    conds = conditions(alpha, onsets)
    runs = train_conditions(base, conds, seeds, root, parallel=parallel, progress=progress)
    measure_final(list(runs.values()), progress=progress)
    if selectivity:
        run_analysis(list(runs.values()), Selectivity(samples=selectivity_samples), progress=progress)
    per_seed = final_per_run(runs, conds)
    table = condition_table(per_seed)
    grouped: dict[str, list[Run]] = {}
    for (name, _), run in runs.items():
        grouped.setdefault(name, []).append(run)

    def write() -> None:  # rank 0 alone under torchrun
        write_table(root / "regularize_runs.parquet", per_seed)
        write_table(root / "regularize.parquet", table)

    dist.on_main(write)
    return per_seed, table, grouped
