"""The causal experiment (claim C4): unregularized baseline vs the selectivity regularizer switched on
at different onsets, every condition with the same seeds; final accuracy and selectivity reached."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from csn import dist
from csn.analysis.accuracy import Accuracy
from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.core.bn import DEFAULT_BN_BATCHES
from csn.core.lr import lr_at
from csn.core.stats import band
from csn.core.times import TimePoint, onset_epoch, parse_times
from csn.core.units import stage_of
from csn.errors import CsnError
from csn.experiments.conditions import Condition, check_existing, condition_rows, job, onset_condition, train_conditions
from csn.experiments.launcher import LauncherOptions
from csn.runs.config import TrainConfig
from csn.runs.io import write_table
from csn.runs.run import Run
from csn.training.regularizer import default_reg_layers


def conditions(alpha: float, onsets: list[float]) -> list[Condition]:
    """Baseline plus one regularized condition per onset (epochs)."""
    if alpha == 0:
        raise CsnError("--alpha 0 regularizes nothing; give a negative alpha to suppress selectivity (e.g. -2).")
    if len(set(onsets)) != len(onsets):
        raise CsnError(f"onsets {onsets} repeat a value; give distinct onsets such as 0,1.")
    return [onset_condition(None)] + [onset_condition(float(o), float(alpha)) for o in onsets]


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
    return pd.DataFrame(condition_rows(per_seed, ("condition", "onset", "alpha"),
                                       ("final_test_acc", "final_test_acc_eval", "final_csi", "final_eta2")))


@dataclass(frozen=True)
class OnsetGrid:
    """`csn experiment regularize` as a grid of conditions (csn.experiments.conditions): the baseline and the
    regularizer at `alpha` from each onset (epochs) to the end, every condition with every seed, under `root`."""

    alpha: float
    onsets: list[float]
    seeds: list[int]
    root: Path
    parallel: int = 1
    selectivity: bool = True
    selectivity_samples: int | None = None
    launcher: LauncherOptions | None = None  # where the runs train (None: here, `parallel` at a time)

    @property
    def conditions(self) -> list[Condition]:
        return conditions(self.alpha, self.onsets)


def regularize_experiment(base: TrainConfig, grid: OnsetGrid, *,
                          progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train every condition and seed (runs trained with another configuration refused first), measure the final
    accuracy and selectivity at every checkpoint, write the tables.

    Returns (per-seed table, per-condition table, {condition: [Run]}); `csn experiment regularize`
    draws the figures from them. Under torchrun the runs train with DDP one after the other,
    selectivity is sharded, and rank 0 writes the tables.
    """
    root, conds = Path(grid.root), grid.conditions
    dist.on_main(check_existing, ((c, job(base, c, s, root)) for c in conds for s in grid.seeds))
    runs = train_conditions(base, conds, grid.seeds, root, parallel=grid.parallel, progress=progress,
                            launcher=grid.launcher)
    measure_final(list(runs.values()), progress=progress)
    if grid.selectivity:
        run_analysis(list(runs.values()), Selectivity(samples=grid.selectivity_samples), progress=progress)
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
