"""One experiment framework: a condition = (intervention, window, strength, targets), trained with every seed.

Every experiment of csn (`csn experiment regularize`, `windows`, `regime`, the study's C4 runs in `csn reproduce`)
is a list of :class:`Condition` x seeds. A condition is

- the **baseline** (no intervention);
- the **selectivity regularizer** (csn.training.interventions.selectivity) at strength `alpha` on a stage set inside a
  window of training (`window` as the config's reg_window takes it; the steps when the plan resolved them, and the
  onset in epochs that C4's tables carry);
- a **rewind** of a stage set at step `end_step` to its own weights at step `to_step`
  (csn.training.interventions.rewind);

plus `overrides`, extra training-config keys of the condition (the dataset, the regularizer's statistic, ...). The
condition is written into each run's config (run.json), and read back from there (csn.experiments.regularize.
recorded_condition), never from folder names. Seeds pair the conditions: the same seed gives the same
initialization and batches, so a condition's effect is its per-seed difference to the baseline of that seed.
`condition_rows` is the one per-condition summary (mean and SE over seeds) the experiments' condition tables use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from csn.core.stats import standard_error
from csn.errors import CsnError
from csn.experiments.launcher import LauncherOptions, train_jobs
from csn.experiments.runner import Job
from csn.runs.config import TrainConfig
from csn.runs.naming import run_name
from csn.runs.run import Run

BASELINE = "baseline"


def _slug(text: str) -> str:
    """A time point as part of a folder name: step=20 -> step20, 0.25 -> ep0.25, f0.1 and end as written."""
    t = str(text)
    return t.replace("step=", "step") if t.startswith("step=") else t if t[:1] in ("f", "e") else f"ep{t}"


@dataclass(frozen=True)
class Condition:
    """A training condition (see the module's docstring). Steps are None where the experiment did not resolve them
    (a condition given by its onset in epochs); `label` names it (default: from what it does)."""

    alpha: float = 0.0
    window: str = ""
    start_step: int | None = None
    end_step: int | None = None
    stage_set: str = ""  # the stage set's label (default, each stage, all, a+b); "" where the config's own
    stages: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = None  # reg_layers; None = the training config's own (the default set)
    to_step: int | None = None  # a rewind's source step
    onset: float | None = None  # the window's start in epochs (C4's tables)
    label: str | None = None
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def kind(self) -> str:
        """baseline, suppress (alpha < 0), promote (alpha > 0) or rewind."""
        if self.to_step is not None:
            return "rewind"
        return BASELINE if self.alpha == 0 else "promote" if self.alpha > 0 else "suppress"

    @property
    def is_baseline(self) -> bool:
        return self.kind == BASELINE

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        suffix = "" if self.stage_set in ("", "default") else f"_{self.stage_set}"
        if self.is_baseline:
            return BASELINE
        if self.kind == "rewind":
            return f"rewind_step{self.end_step}-to{self.to_step}{suffix}"
        start, end = self.window.split(":")
        return f"a{self.alpha:+g}_{_slug(start)}-{_slug(end)}{suffix}"

    def apply(self, base: TrainConfig, seed: int, checkpoints: str | None = None) -> TrainConfig:
        """The training config of this condition and seed (named `<condition>-s<seed>`; `checkpoints`: its schedule
        when the experiment adds points to the base's)."""
        keys: dict[str, Any] = dict(reg_alpha=None, reg_window=None, reg_schedule=None)
        if self.kind in ("suppress", "promote"):
            keys = dict(reg_alpha=self.alpha, reg_window=self.window, reg_schedule=None,
                        reg_layers=list(self.layers) if self.layers is not None else base.reg_layers)
        elif self.kind == "rewind":
            keys["interventions"] = [*base.interventions, {"kind": "rewind", "stages": list(self.stages),
                                                           "at": f"step={self.end_step}", "to": f"step={self.to_step}"}]
        if checkpoints is not None:
            keys["checkpoints"] = checkpoints
        return base.replace(seed=seed, name=run_name(self.name, seed), **{**keys, **dict(self.overrides)})

    def record(self) -> dict[str, Any]:
        """The condition as plain data (name, onset, alpha, overrides), for an experiment's JSON record."""
        return {"name": self.name, "onset": self.onset, "alpha": self.alpha, "overrides": dict(self.overrides)}


def onset_condition(onset: float | None, alpha: float = 0.0, label: str | None = None,
                    overrides: tuple[tuple[str, Any], ...] = ()) -> Condition:
    """The regularizer at `alpha` from `onset` (epochs) to the end of training, on the config's own stages (named
    reg-from-<onset> unless labelled); onset None: the baseline."""
    if onset is None:
        return Condition(label=label, overrides=overrides)
    # the exact epoch (an onset resolved from steps or fractions is step / steps_per_epoch: 0.3326...)
    text = f"{onset:g}" if float(f"{onset:g}") == onset else repr(float(onset))
    return Condition(float(alpha), f"{text}:end", onset=float(onset), label=label or f"reg-from-{onset:g}",
                     overrides=overrides)


def job(base: TrainConfig, cond: Condition, seed: int, root: str | Path, checkpoints: str | None = None) -> Job:
    """The training job of one condition and seed: its config, and its folder ROOT/<condition>-s<seed>."""
    cfg = cond.apply(base, seed, checkpoints)
    return Job(cfg, Path(root) / cfg.name)


def train_conditions(base: TrainConfig, conds: list[Condition], seeds: list[int], root: str | Path, *,
                     parallel: int = 1, progress: bool = True,
                     launcher: LauncherOptions | None = None) -> dict[tuple[str, int], Run]:
    """Train every (condition, seed) run under root (finished runs are skipped, partial ones resumed), here or
    where `launcher` says (csn.experiments.launcher: Slurm)."""
    keys = [(cond, seed) for cond in conds for seed in seeds]
    runs = train_jobs([job(base, c, s, root) for c, s in keys], launcher, parallel=parallel, progress=progress,
                      desc="regularization runs")
    return {(c.name, s): r for (c, s), r in zip(keys, runs)}


def check_existing(jobs: Iterable[tuple[Condition, Job]], *, steps_per_epoch: int | None = None,
                   what: str = "experiment") -> None:
    """Refuse runs already in the experiment's folder that were trained with another configuration (a finished run
    would otherwise be reused as it is): name the difference and the fix."""
    for cond, j in jobs:
        if not (j.out / "run.json").is_file():
            continue
        diff = Run(j.out).config.diff(j.cfg, steps_per_epoch=steps_per_epoch)
        if diff:
            k, (a, b) = next(iter(diff.items()))
            why = (" (the baseline needs a checkpoint at every window's start and end, so new windows need a new "
                   "baseline)" if k == "checkpoints" and cond.is_baseline else "")
            raise CsnError(f"{j.out} was trained with {k} {a!r}, this {what} needs {b!r}{why}; use another --out, or "
                           "the same settings to resume.")


def condition_rows(per_seed: pd.DataFrame, first: Sequence[str], columns: Sequence[str],
                   paired: Callable[[pd.DataFrame], dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Per condition (in order of appearance): the `first` columns' values of its first row, its number of seeds,
    `paired(rows)` (e.g. the paired harm to the baseline), the mean (NaN values left out) and standard error over
    seeds of each of `columns` present, and every seed's final_test_acc."""
    rows = []
    for _, g in per_seed.groupby("condition", sort=False):
        row = {k: g[k].iloc[0] for k in first if k in g}
        row["seeds"] = len(g)
        if paired is not None:
            row.update(paired(g))
        for col in columns:
            if col in g:
                v = g[col].to_numpy(dtype=float)
                row[f"{col}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
                row[f"{col}_se"] = standard_error(v)
        row["final_test_acc_per_seed"] = ", ".join(f"{a:.4f}" for a in g["final_test_acc"])
        rows.append(row)
    return rows


__all__ = ["BASELINE", "Condition", "onset_condition", "job", "train_conditions", "check_existing", "condition_rows"]
