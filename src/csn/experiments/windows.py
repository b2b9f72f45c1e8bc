"""How early is early? The critical-period map of selectivity suppression (`csn experiment windows`).

After Achille, Rovere and Soatto (ICLR 2019, "Critical learning periods in deep networks"): the deficit (the
selectivity regularizer, alpha != 0) acts only inside a window [start, end) of training, and what is left at
the end is measured. Conditions = the baseline plus one per (alpha, window, stage set); every condition trains
with the same seeds (same initialization, same batches), so each is compared with the baseline of its own
seed (window_stats: the declared statistic and verdicts).

Every regularized condition gives alpha to each regularized stage in full (reg_reduce=sum: "alpha per stage"), so
"stage 2 alone at -20" and "stages 1+2 at -20" dose stage 2 alike. Windows can tile training (`tile:N`: N windows of
equal length, one after the other, so early and late windows get the same number of steps; under a constant learning
rate, the fmnist map's, the same learning rate too).

Per condition and seed: test accuracy at the window's end and at the end of training (whole test split, BatchNorm
statistics re-estimated from END_BN_BATCHES training batches, condition and baseline alike; the checkpoints' eval-mode
values beside them: a regularized window leaves BatchNorm's running statistics off for tens of steps, which costs the
eval-mode network up to several points at a window's end, 3.9 of them after 234 steps at alpha -1 in the pilot) and
the paired difference of the final one to the baseline (harm); test accuracy at every checkpoint; the dose
(regularized steps, mean learning rate and mean |alpha| over them; CSI and eta² reduction at the window's end); CSI
and eta² of the regularized stages at the end of the window and at the end of training (the baseline at every window
boundary). Tables written to the experiment directory:

    windows_runs.parquet         one row per (condition, seed)
    windows.parquet              one row per condition: paired harm (mean, paired SE, unpaired SE, 95 % t interval), dose
    windows_verdicts.parquet     one row per (alpha, stage set): the statistic and the verdict
    windows_accuracy.parquet     test accuracy at every checkpoint, and its paired gap to the baseline
    windows_selectivity.parquet  mean CSI / eta² per stage at the measured checkpoints
    windows.json                 the plan, the rules and the wall times
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BeforeValidator, Field, model_validator

from csn import dist
from csn._version import __version__
from csn.analysis.accuracy import Accuracy
from csn.analysis.base import Samples, run_analysis
from csn.analysis.registry import analysis
from csn.analysis.selectivity import Selectivity, live_unit_means, summarize
from csn.core import inference as I
from csn.core import presets
from csn.core.alpha import AlphaWindow, AlphaWindows, parse_window_points
from csn.core.bn import DEFAULT_BN_BATCHES
from csn.core.checkpoint_schedule import checkpoint_steps
from csn.core.lr import lr_at
from csn.core.progress import bar, hms
from csn.core.schema import MAX_SEED, MAX_SEEDS, SEEDS_HINT, CommaList, Float, Int, Schema
from csn.core.times import TimePoint, number, parse_time, parse_times, resolve, steps_text
from csn.core.units import resolve_layers, stage_of, stages
from csn.errors import CsnError, unknown
from csn.experiments import conditions
from csn.experiments import mechanism_stats as ms
from csn.experiments import window_stats as ws
from csn.experiments.claims import Spread
from csn.experiments.conditions import BASELINE, Condition, condition_rows
from csn.experiments.launcher import LauncherOptions, at_a_time, estimate_note, train_jobs
from csn.experiments.mechanism import mechanism_tables
from csn.experiments.regularize import dose
from csn.experiments.runner import Job, PresetRunnerOptions, finished_seconds, is_complete
from csn.runs.config import TrainConfig, build_model_for, data_info, is_preset_checkpoints, load_data
from csn.runs.config import preset as train_preset
from csn.runs.io import read_table, write_json, write_table
from csn.runs.run import Run, check_run_path
from csn.training.loop import training_length
from csn.training.regularizer import default_reg_layers

MAX_RUNS = 1000
"""The most runs one map plans (conditions x seeds): about 2 days on 2 CPU cores at fmnist's 175 s per run."""
END_BN_BATCHES = DEFAULT_BN_BATCHES
"""Training batches BatchNorm statistics are re-estimated from before accuracy is measured at a window's end and at the
end of training (condition and baseline alike, whatever the epoch: csn.core.bn.recalibrate_bn on a copy, the batches
every analysis uses)."""


# ------------------------------------------------------------------------------------------------
# seeds, presets and options
# ------------------------------------------------------------------------------------------------

def parse_seeds(value: Any) -> list[int]:
    """'3' or 3 -> [0, 1, 2]; '0,1,5' or [0, 1, 5] -> those seeds (distinct, >= 0)."""
    is_list = isinstance(value, (list, tuple))
    text = ",".join(map(str, value)) if is_list else str(value).strip()
    try:
        if "," not in text and not is_list:
            n = int(text)
            if n < 1:
                raise ValueError
            if n > MAX_SEEDS:
                raise CsnError(f"seeds {n} are more than {MAX_SEEDS} ({SEEDS_HINT}); give fewer.")
            return list(range(n))
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CsnError(f"seeds {text!r} are not a count or a comma-separated list of integers; write e.g. 3 or 0,1,2.") from None
    if not vals or len(set(vals)) != len(vals) or min(vals) < 0 or max(vals) > MAX_SEED:
        raise CsnError(f"seeds {text!r} repeat a seed, are out of [0, 2**63) or are empty; give distinct integers >= 0.")
    if len(vals) > MAX_SEEDS:
        raise CsnError(f"seeds {len(vals)} are more than {MAX_SEEDS} ({SEEDS_HINT}); give fewer.")
    return vals


def _seeds_field(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    try:
        return parse_seeds(value)
    except CsnError as e:
        raise ValueError(str(e).rstrip(".")) from None


Seeds = Annotated[list[Int], BeforeValidator(_seeds_field)]


class WindowGrid(Schema):
    """A grid of conditions, by kind of intervention. selectivity (the regularizer): every alpha x window x stage set
    (windows as --windows takes them, tile:N included). rewind (csn.training.interventions.rewind): every point `at`
    x source `to` x stage set: at `at` the stages are set back to their own weights at `to` (a point in training, or
    at*X: the fraction X of `at`, e.g. at*0.5)."""

    kind: Literal["selectivity", "rewind"] = "selectivity"
    alphas: Annotated[list[Float], CommaList] = []
    windows: str = ""
    at: str = ""
    to: Annotated[list[str], CommaList] = ["step=0"]
    stages: Annotated[list[str], CommaList] = ["default"]

    @model_validator(mode="after")
    def _keys_of_kind(self) -> WindowGrid:
        if self.kind == "selectivity" and (not self.alphas or not self.windows or self.at):
            raise ValueError("a selectivity grid takes alphas and windows (not at/to)")
        if self.kind == "rewind" and (self.alphas or self.windows or not self.at):
            raise ValueError("a rewind grid takes at (and to), not alphas or windows")
        return self


class WindowsPreset(Schema):
    """A critical-period map, declared before it is run: the training preset (and overrides, e.g. a constant learning
    rate), the grids of conditions, the seeds, the per-run spread its power is planned with, and the cost of one run and
    of one checkpoint's selectivity and accuracy passes (for the plan's estimate)."""

    name: str
    train_preset: str
    overrides: list[str] = []
    lr_schedule: Literal["constant", "cosine", "anneal"] | None = None  # None: the training preset's
    grids: list[WindowGrid]
    seeds: Seeds = [0, 1, 2]
    samples: Int | None = None
    parallel: Int = Field(2, ge=1)
    run_seconds: Float = Field(gt=0, description="One training run, single-threaded, 2 at a time on 2 cores.")
    checkpoint_seconds: Float = Field(gt=0, description="One checkpoint's selectivity pass (BN re-estimation included).")
    accuracy_seconds: Float = Field(1.0, gt=0, description="One checkpoint's accuracy pass at a window's end (BN "
                                    "re-estimation included).")
    analysis_seconds: Float = Field(0.0, ge=0, description="One checkpoint's further analyses (`analyses`) together.")
    run_sd: Float = Field(Spread().c4_run_sd, gt=0, description="Per-run SD of final test accuracy the dry run plans "
                          "power with (default: recorded on the fmnist study, claims.Spread().c4_run_sd).")
    run_sd_source: str = Field("recorded on the fmnist study under the cosine schedule, claims.Spread",
                               description="Where run_sd was measured, printed by the dry run.")
    reg_reduce: Literal["sum", "mean"] = Field("sum", description="How alpha meets the regularized stages: sum (every "
                                               "stage gets alpha in full, so stage sets of different sizes compare) or "
                                               "mean (alpha split over them, as `csn train`'s default).")
    analyses: dict[str, dict[str, Any]] = Field({}, description="Registered analyses (e.g. probe, fisher) measured "
                                                "beside selectivity at the same checkpoints of every run: name -> its "
                                                "options (those not given: the analysis's defaults).")
    mechanism: bool = Field(False, description="Answer the mechanism study's three questions "
                            "(csn.experiments.mechanism_stats): windows_mechanism*.parquet.")
    measure_checkpoints: str | None = Field(None, description="Checkpoints where selectivity is measured besides the "
                                            "window ends and the end (a selector, e.g. 0:f0.5): every run's from its "
                                            "condition's start on (before it, a run equals its baseline bitwise).")


def get_windows_preset(name: str) -> WindowsPreset:
    """A windows preset by name (csn/presets/windows/NAME.toml)."""
    return WindowsPreset.model_validate(presets.data("windows", name))


class WindowsOptions(PresetRunnerOptions):
    """What `csn experiment windows` takes (its command-line options are built from these fields)."""

    preset: str = Field("fmnist", description="Windows preset (`csn presets windows` lists them, each with its "
                        "plan): smoke (seconds), fmnist (the critical-period map, about 1 h 33 min on 2 CPU cores), "
                        "mechanism (suppression beside stage rewinds, README \"By which mechanism\", about 3 h), "
                        "mechanism-pairs, mechanism-smoke.")
    alphas: Annotated[list[Float], CommaList] | None = Field(
        None, min_length=1, description="Regularizer strengths, comma-separated (loss = ce - alpha*R: < 0 suppresses, "
        "> 0 promotes) [default: the preset's conditions]. Giving --alphas, --windows or --stages replaces the preset's "
        "grids by ONE grid (the options given, the preset's first grid for the others).",
        json_schema_extra={"metavar": "A,..."})
    windows: str | None = Field(None, description="Windows START:END, comma-separated, in epochs (0.25), steps (step=64), "
                                "fractions of training (f0.1) or end, e.g. step=0:step=20,1:2; tile:N = N windows of equal "
                                "length tiling training, tile:N:I the I-th of them (from 0) [default: the preset's].",
                                json_schema_extra={"metavar": "S:E,..."})
    stages: Annotated[list[str], CommaList] | None = Field(
        None, description="Stage sets, comma-separated: default (every stage but the last), each (one condition per "
        "stage), all, or stages joined by + (layer1+layer3) [default: the preset's].", json_schema_extra={"metavar": "SETS"})
    seeds: Seeds | None = Field(None, description="N (seeds 0..N-1) or a comma-separated list, shared by every condition "
                                "[default: the preset's].", json_schema_extra={"metavar": "N|LIST"})
    lr_schedule: Literal["constant", "cosine", "anneal"] | None = Field(
        None, description="Learning-rate schedule of every run: constant (every window gets the same learning rate), "
        "anneal (constant, then a tenth of it over the last sixth of training: windows before it get the same rate, "
        "final accuracy is read after an anneal) or cosine (a late window gets less) [default: the preset's].")
    out: str | None = Field(None, description="Experiment directory [default: runs/windows-<preset>].",
                            json_schema_extra={"metavar": "DIR"})
    selectivity: bool = Field(True, description="Measure CSI and eta² at the window ends and the end of training "
                              "(--no-selectivity: accuracy only, no verdicts).")
    samples: Samples = Field(None, description="Selectivity on a fixed subset of N test images, or all "
                             "[default: the preset's].", json_schema_extra={"metavar": "N|all"})
    dry_run: bool = Field(False, description="Print the plan (conditions, seeds, estimated time) and, per verdict, the "
                          "power at the seeds asked, the minimal detectable effect there and the seeds the declared effect "
                          "needs; write nothing.")
    run_sd: Float | None = Field(None, gt=0, description="Per-run SD of final test accuracy the dry run plans power with "
                                 "[default: the preset's, which the dry run names].", json_schema_extra={"metavar": "SD"})


# ------------------------------------------------------------------------------------------------
# conditions
# ------------------------------------------------------------------------------------------------

def stage_sets(tokens: Sequence[str], model: torch.nn.Module, reg_layers: Sequence[str] | None) -> list[tuple]:
    """[(label, stages, layers | None)] from `default`, `each`, `all` and `stageA+stageB` tokens (model order)."""
    declared = stages(model)
    order = list(declared)
    out = []
    for tok in tokens:
        t = str(tok).strip()
        if t == "default":
            layers = resolve_layers(model, reg_layers) if reg_layers else default_reg_layers(model)
            out.append(("default", tuple(dict.fromkeys(stage_of(model, n) for n in layers)), None))
        elif t == "each":
            out += [(s, (s,), tuple(declared[s])) for s in order]
        elif t == "all":
            out.append(("all", tuple(order), tuple(n for s in order for n in declared[s])))
        else:
            parts = [p.strip() for p in t.split("+")]
            for p in parts:
                if p not in declared:
                    raise unknown("stage", p, order + ["default", "each", "all"])
            if len(set(parts)) != len(parts):
                raise CsnError(f"stage set {t!r} names a stage twice; name each stage once (e.g. layer1+layer2).")
            chosen = tuple(s for s in order if s in parts)
            out.append(("+".join(chosen), chosen, tuple(n for s in chosen for n in declared[s])))
    if not out:
        raise CsnError("no stage set was given; write e.g. --stages default,each.")
    return out


TILE_FORMS = ("tile:N (N windows of equal length tiling training), tile:N:I (the I-th of them, from 0) or tile:N:I-J "
              "(the I-th to the J-th)")


def tile_steps(n: int, total: int) -> list[tuple[int, int]]:
    """The N windows of equal length (to a step) tiling a training of `total` steps: [floor(k * total / N),
    floor((k + 1) * total / N)) for k = 0..N-1."""
    return [(k * total // n, (k + 1) * total // n) for k in range(n)]


def _picks(text: str) -> list[int]:
    """'2' -> [2]; '0-4' -> [0, 1, 2, 3, 4] (ValueError if neither, or a range that runs backwards)."""
    a, sep, b = text.partition("-")
    if not sep or not a:  # a plain index ('-1' is an index, refused later as out of range)
        return [int(text)]
    lo, hi = int(a), int(b)
    if hi < lo:
        raise ValueError(text)
    return list(range(lo, hi + 1))


def expand_tiles(text: str, total: int, what: str = "--windows") -> str:
    """The windows with every tile:N / tile:N:I token written as its step=A:step=B windows (other tokens as given)."""
    out = []
    for tok in str(text).split(","):
        fields = [f.strip() for f in tok.strip().split(":")]
        if fields[0].lower() != "tile":
            out.append(tok)
            continue
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            n, picks = int(fields[1]), None if len(fields) == 2 else _picks(fields[2])
        except ValueError:
            raise CsnError(f"{what} {tok.strip()!r} is not a tile; write {TILE_FORMS}, e.g. tile:6 or tile:6:0.") from None
        if not 1 <= n <= total:
            raise CsnError(f"{what} {tok.strip()!r} asks for {n} tiles of a training of {total} steps; give 1 to {total}.")
        tiles = tile_steps(n, total)
        for i in picks if picks is not None else range(n):
            if not 0 <= i < n:
                raise CsnError(f"{what} {tok.strip()!r} picks tile {i} of {n}; tiles count from 0 to {n - 1}.")
            out.append(f"step={tiles[i][0]}:step={tiles[i][1]}")
    return ",".join(out)


def _rewind_steps(grid: WindowGrid, spe: int, total: int) -> list[tuple[int, int]]:
    """A rewind grid's (at, to) steps: every point `at` x source `to` (at*X: round(X * at)), each checked."""
    out = []
    for item in parse_times(grid.at, "a rewind grid's at"):
        if not isinstance(item, TimePoint):
            raise CsnError(f"a rewind grid's at {item} is a range; give points, e.g. at = \"step=64,step=234\".")
        at = item.step(spe, total)
        if not 1 <= at < total:
            raise CsnError(f"a rewind at {item} (step {at}) is not inside training (steps 1 to {total - 1}); choose "
                           "points after the first step and before the end.")
        for text in grid.to:
            t = str(text).strip()
            if t.startswith("at*"):
                x = number(t[3:], f"a rewind grid's to {t!r}", "write at*X with 0 <= X < 1, e.g. at*0.5")
                if not 0 <= x < 1:
                    raise CsnError(f"a rewind grid's to {t!r} is not before at; write at*X with 0 <= X < 1, e.g. at*0.5.")
                to = int(round(x * at))
            else:
                to = parse_time(t, "a rewind grid's to").step(spe, total)
            if to >= at:
                raise CsnError(f"a rewind at step {at} to {t} (step {to}) does not go back in time; choose 'to' "
                               "earlier than 'at'.")
            out.append((at, to))
    return out


def grid_conditions(grid: WindowGrid, sets: list[tuple], spe: int, total: int, epochs: float) -> list[Condition]:
    """Every condition of a grid (alpha x window x stage set; or rewind point x source x stage set), resolved to
    steps (CsnError if outside training)."""
    if grid.kind == "rewind":
        return [Condition(0.0, f"step={at}", at, at, label, st, layers, to_step=to)
                for at, to in _rewind_steps(grid, spe, total) for label, st, layers in sets]
    points = parse_window_points(expand_tiles(grid.windows, total), "--windows")
    out = []
    for alpha in grid.alphas:
        if alpha == 0:
            raise CsnError("alpha 0 regularizes nothing (it is the baseline, which every experiment trains); give "
                           "alphas < 0 (suppress) or > 0 (promote).")
        for start, end in points:
            (a, b, _), = AlphaWindows([AlphaWindow(start, end, float(alpha))]).resolve(spe, total, epochs).windows
            for label, st, layers in sets:
                out.append(Condition(float(alpha), f"{start}:{end}", a, b, label, st, layers, onset=a / spe))
    return out


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything the experiment will do, resolved and validated before anything trains."""

    preset: WindowsPreset
    base: TrainConfig
    conditions: list[Condition]  # baseline first
    seeds: list[int]
    steps_per_epoch: int
    total: int
    root: Path
    parallel: int
    samples: int | None
    selectivity: bool
    base_steps: list[int] = field(default_factory=list)  # checkpoint steps of the training preset
    base_spec: str = ""  # its schedule as written (as steps when a shortened training dropped some points)
    run_sd: float = Spread().c4_run_sd  # per-run SD of final accuracy the power is planned with

    def checkpoints(self, cond: Condition) -> str:
        """The condition's checkpoint schedule: the preset's plus its window's boundaries (the baseline: every
        condition's boundaries), as step=N segments; extra checkpoints never change training."""
        extra = sorted(self._boundaries(cond) - set(self.base_steps))
        return ",".join([self.base_spec or self.base.checkpoints] + [f"step={s}" for s in extra])

    def _boundaries(self, cond: Condition) -> set[int]:
        """The condition's window boundaries (a rewind's: its step); the baseline's: every condition's."""
        conds = self.conditions if cond.is_baseline else [cond]
        return {s for c in conds if not c.is_baseline for s in (c.start_step, c.end_step)}

    def jobs(self) -> list[tuple[Condition, int, Job]]:
        out = []
        for cond in self.conditions:
            for seed in self.seeds:
                out.append((cond, seed, conditions.job(self.base, cond, seed, self.root, self.checkpoints(cond))))
        return out

    def selectivity_steps(self, cond: Condition) -> list[int]:
        """Where selectivity is measured: the window's end and the end of training (the baseline: 0, every window
        boundary and the end; a condition equals its baseline up to its window's start, bitwise)."""
        extra = self.measured_steps(cond)
        if cond.is_baseline:
            return sorted({0, self.total} | self._boundaries(cond) | set(extra))
        return sorted({cond.end_step, self.total} | {s for s in extra if s >= cond.start_step})

    def measured_steps(self, cond: Condition) -> list[int]:
        """The condition's checkpoints the preset's measure_checkpoints selects (none when it names none)."""
        if not self.preset.measure_checkpoints:
            return []
        steps = sorted(set(self.base_steps) | self._boundaries(cond) | {self.total})
        return resolve(parse_times(self.preset.measure_checkpoints, "measure_checkpoints"), steps,
                       self.steps_per_epoch, self.total, what="measure_checkpoints")

    def accuracy_steps(self, cond: Condition) -> list[int]:
        """Where accuracy is measured after BatchNorm re-estimation: the window's end and the end of training (the
        baseline: every window's end and the end)."""
        if cond.is_baseline:
            return sorted({c.end_step for c in self.conditions if not c.is_baseline} | {self.total})
        return sorted({cond.end_step, self.total})

    def estimate(self) -> dict[str, float]:
        """Seconds: training (runs left x cost per run / runs at once), selectivity and accuracy (checkpoints x cost);
        the cost per run is the median measured on finished runs here, else the preset's declared one (scaled by
        epochs)."""
        jobs = self.jobs()
        todo = [j for _, _, j in jobs if not is_complete(j.out)]
        measured = finished_seconds([j.out for _, _, j in jobs])
        preset_epochs = train_preset(self.preset.train_preset).override(list(self.preset.overrides)).epochs
        declared = self.preset.run_seconds * self.base.epochs / preset_epochs  # scaled to a shortened training
        per_run = statistics.median(measured) if measured else declared
        n_ckpt = sum(len(self.selectivity_steps(c)) for c, _, _ in jobs) if self.selectivity else 0
        n_acc = sum(len(self.accuracy_steps(c)) for c, _, _ in jobs)
        return {"runs": len(jobs), "runs_todo": len(todo), "run_seconds": per_run, "measured_runs": len(measured),
                "training_s": len(todo) * per_run / max(1, min(self.parallel, max(1, len(todo)))),
                "checkpoints": n_ckpt, "selectivity_s": n_ckpt * self.preset.checkpoint_seconds,
                "analyses_s": n_ckpt * self.preset.analysis_seconds,
                "accuracy_checkpoints": n_acc, "accuracy_s": n_acc * self.preset.accuracy_seconds}


ANNEAL_FROM = 5 / 6
"""lr_schedule 'anneal': the constant learning rate until this fraction of training, a tenth of it after."""


def lr_overrides(schedule: str | None, epochs: float) -> list[str]:
    """The training-config overrides of a map's learning-rate schedule (None: none, the training preset's own)."""
    if schedule is None:
        return []
    if schedule == "anneal":
        return ["lr_schedule=step", f"milestones=[{epochs * ANNEAL_FROM!r}]", "gamma=0.1", "warmup_epochs=0"]
    return [f"lr_schedule={schedule}", "milestones=[]", "warmup_epochs=0"]


def make_plan(opts: WindowsOptions, overrides: Sequence[str] = ()) -> Plan:
    """Resolve the options against the preset, the dataset and the model; every mistake is one CsnError."""
    pre = get_windows_preset(opts.preset)
    given = opts.model_fields_set
    epochs = train_preset(pre.train_preset).override(list(pre.overrides) + list(overrides)).epochs
    lr = lr_overrides(opts.lr_schedule or pre.lr_schedule, epochs)
    base = train_preset(pre.train_preset).override(list(pre.overrides) + lr + list(overrides))
    if base.reg_alpha is not None or base.reg_window is not None or base.reg_schedule:
        raise CsnError("the training config already has a regularizer (reg_alpha/reg_window/reg_schedule); the windows "
                       "experiment sets it per condition, so drop those overrides.")
    if any(str(o).split("=", 1)[0].strip() == "reg_reduce" for o in overrides) and base.reg_reduce != pre.reg_reduce:
        raise CsnError(f"reg_reduce={base.reg_reduce} is not the map's: preset {pre.name} gives alpha to the regularized "
                       f"stages with reg_reduce={pre.reg_reduce} (the same for every condition, so they compare), so drop "
                       "that override.")
    base = base.replace(reg_reduce=pre.reg_reduce)
    for name, options in pre.analyses.items():  # an unknown analysis or option: one error before anything trains
        analysis(name).cls(**options)
    data = load_data(base)
    spe, total = training_length(base, data)
    model = build_model_for(base, data_info(data))
    grids = list(pre.grids)
    if given & {"alphas", "windows", "stages"}:
        first = next((g for g in grids if g.kind == "selectivity"), WindowGrid(alphas=[-3.0], windows="tile:4"))
        grids = [WindowGrid(alphas=opts.alphas if opts.alphas is not None else first.alphas,
                            windows=opts.windows if opts.windows is not None else first.windows,
                            stages=opts.stages if opts.stages is not None else first.stages)]
    conds = [Condition(start_step=0, end_step=0)]
    for grid in grids:
        conds += grid_conditions(grid, stage_sets(grid.stages, model, base.reg_layers), spe, total, base.epochs)
    _refuse_duplicates(conds)
    seeds = opts.seeds if opts.seeds is not None else list(pre.seeds)
    if len(conds) * len(seeds) > MAX_RUNS:
        raise CsnError(f"the map has {len(conds)} conditions x {len(seeds)} seeds = {len(conds) * len(seeds):,} runs, more "
                       f"than {MAX_RUNS:,}; give fewer --alphas, --windows, --stages or --seeds.")
    root = Path(opts.out) if opts.out else Path("runs") / f"windows-{pre.name}"
    check_run_path(root, "--out")
    base_steps, base_spec = _base_schedule(base, spe)
    return Plan(pre, base, conds, seeds, spe, total, root, opts.parallel or pre.parallel,
                opts.samples if "samples" in given else pre.samples, opts.selectivity, base_steps, base_spec,
                opts.run_sd or pre.run_sd)


def _base_schedule(base: TrainConfig, spe: int) -> tuple[list[int], str]:
    """The training preset's checkpoint steps and schedule; a preset's points past the end of a shortened training
    are dropped with a note (as `csn train` does), the schedule then written as its remaining steps."""
    try:
        return checkpoint_steps(base.checkpoints, spe, base.epochs), base.checkpoints
    except CsnError:
        if not is_preset_checkpoints(base.checkpoints):
            raise
    steps = checkpoint_steps(base.checkpoints, spe, base.epochs, clip=True, note=lambda m: print(m, file=sys.stderr))
    return steps, ",".join(f"step={s}" for s in steps)


def _refuse_duplicates(conds: list[Condition]) -> None:
    seen: dict[tuple, str] = {}
    for c in conds:
        key = (c.alpha, c.start_step, c.end_step, c.stages, c.to_step)
        if key in seen or c.name in seen.values():
            raise CsnError(f"conditions {seen.get(key, c.name)} and {c.name} are the same (alpha, steps and stages); "
                           "give each window and stage set once.")
        seen[key] = c.name


def plan_text(plan: Plan, launcher: LauncherOptions | None = None) -> str:
    """The plan as printed before anything starts: conditions x seeds, what each condition does, the estimate.
    launcher: where the runs train (--launcher slurm: one job per run)."""
    e, b = plan.estimate(), plan.base
    lr = f"lr {b.lr:g} {b.lr_schedule}" + (f" (warm-up {b.warmup_epochs:g} epochs)" if b.warmup_epochs else "")
    lines = [f"critical-period map '{plan.preset.name}' in {plan.root}: {len(plan.conditions)} conditions x "
             f"{len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}) = {e['runs']} runs, {e['runs_todo']} to train, "
             f"{at_a_time(launcher, plan.parallel)}",
             f"  each run: {b.model} on {b.dataset}, {b.epochs:g} epochs x {plan.steps_per_epoch} steps = {plan.total} "
             f"steps, {lr}",
             ("  alpha per stage (reg_reduce=sum): every regularized stage gets alpha in full, whatever the stage set"
              if b.reg_reduce == "sum" else "  alpha split over the regularized stages (reg_reduce=mean)"),
             f"  accuracy at each window's end and the end of training: whole test split, BatchNorm re-estimated from "
             f"{END_BN_BATCHES} training batches (condition and baseline)",
             f"  {'condition':<34} {'alpha':>6}  {'window (steps)':<16} {'epochs':<13} {'lr':<8} stages"]
    for c in plan.conditions:
        reg = c.kind in ("suppress", "promote")
        win = f"[{c.start_step}, {c.end_step})" if reg else f"at {c.end_step} to {c.to_step}" if c.kind == "rewind" else "–"
        ep = f"{c.start_step / plan.steps_per_epoch:.3g}-{c.end_step / plan.steps_per_epoch:.3g}" if reg else \
            f"{c.end_step / plan.steps_per_epoch:.3g}" if c.kind == "rewind" else "–"
        mean_lr = f"{_mean_lr(plan, c):.3g}" if reg else "–"
        st = "+".join(c.stages) + (" (default)" if c.stage_set == "default" else "") if not c.is_baseline else "–"
        lines.append(f"  {c.name:<34} {c.alpha:>6g}  {win:<16} {ep:<13} {mean_lr:<8} {st}")
    src = (f"median of {e['measured_runs']} finished runs here" if e["measured_runs"]
           else f"declared for preset {plan.preset.name}")
    sel = (f" + selectivity at {e['checkpoints']} checkpoints x {plan.preset.checkpoint_seconds:g} s"
           if plan.selectivity else "")
    acc = f" + accuracy at {e['accuracy_checkpoints']} checkpoints x {plan.preset.accuracy_seconds:g} s"
    if plan.selectivity and plan.preset.analyses:
        sel += f" + {', '.join(plan.preset.analyses)} there x {plan.preset.analysis_seconds:g} s"
    total = e["training_s"] + e["selectivity_s"] + e["accuracy_s"] + (e["analyses_s"] if plan.selectivity else 0.0)
    lines.append(f"  estimated time: about {hms(total)} ({e['runs_todo']} "
                 f"runs x {e['run_seconds']:.0f} s per run, {src}{sel}{acc}; {estimate_note(launcher, plan.parallel)})")
    return "\n".join(lines)


def _mean_lr(plan: Plan, cond: Condition) -> float:
    """The mean learning rate over a condition's regularized steps (the dose's reg_mean_lr, from the plan)."""
    b = plan.base
    return float(np.mean([lr_at(t, plan.total, plan.steps_per_epoch, b.lr, b.lr_schedule, milestones=b.milestones,
                                gamma=b.gamma, warmup_epochs=b.warmup_epochs) for t in range(cond.start_step, cond.end_step)]))


# ------------------------------------------------------------------------------------------------
# power of the verdicts at the seeds asked (the dry run)
# ------------------------------------------------------------------------------------------------

MDE_UPPER = 0.05
"""The largest effect (accuracy, 5 points) the minimal detectable effect is searched up to; beyond: 'over 5 points'."""


def _shapes(plan: Plan) -> list[dict]:
    """The plan's families grouped by what their verdicts' power depends on: kind, windows and late windows."""
    fams: dict[tuple, list[Condition]] = {}
    for c in plan.conditions:
        if c.kind in ("suppress", "promote"):
            fams.setdefault((c.alpha, c.stage_set), []).append(c)
    shapes: dict[tuple, dict] = {}
    for (alpha, stage_set), conds in fams.items():
        starts = sorted(c.start_step / plan.total for c in conds)
        late = [f >= ws.WINDOW_RULES["late_from"] for f in starts]
        key = ("promote",) if alpha > 0 else ("suppress", len(starts), sum(late) if not late[0] else 0)
        shapes.setdefault(key, {"key": key, "families": []})["families"].append((alpha, stage_set))
    return list(shapes.values())


def _power_row(question: str, sim: I.Simulate, effect: float, seeds: int, studies: int, upper: float = MDE_UPPER,
               margin: bool = False) -> dict:
    return {"question": question, "effect": effect, "power": I.power(sim, effect, seeds, studies),
            "mde": I.minimal_detectable_effect(sim, seeds, upper, studies=studies),
            "seeds_needed": I.seeds_needed(sim, effect, studies=studies), "margin": margin}


def planned_power(plan: Plan, studies: int = I.SIM_STUDIES) -> list[dict]:
    """Per family shape and verdict: the power at the plan's seeds under the declared effect (window_stats.EFFECTS),
    the minimal detectable effect there (for 'late costs little': the margin below `little` the late windows' true
    cost needs) and the seeds the declared effect needs (power >= inference.POWER), by simulating the verdict's own
    rule with per-run noise plan.run_sd."""
    n, sd, out = len(plan.seeds), plan.run_sd, []
    for shape in _shapes(plan):
        key, rows = shape["key"], []
        if key[0] == "promote":
            for q in (ws.Q_PROMOTE_FINAL, ws.Q_PROMOTE_END):
                rows.append(_power_row(q, ws.simulate_promotion(q, sd), ws.EFFECTS["promotion"], n, studies))
        else:
            _, w, late = key
            for q in (ws.Q_EARLIEST, ws.Q_MORE):
                if q == ws.Q_EARLIEST or late:
                    sim = ws.simulate_suppression(q, sd, windows=w, late_windows=late)
                    rows.append(_power_row(q, sim, ws.EFFECTS["suppression"], n, studies))
            if late:
                little = ws.WINDOW_RULES["little"]
                rows.append(_power_row(ws.Q_LITTLE, ws.simulate_little_margin(sd, w, late), little, n, studies, little, True))
        out.append({**shape, "rows": rows})
    return out


def _shape_label(shape: dict) -> str:
    by_set: dict[str, list[str]] = {}
    for alpha, stage_set in shape["families"]:
        by_set.setdefault(stage_set, []).append(f"{alpha:+g}")
    key, fams = shape["key"], "; ".join(f"{', '.join(a)} on stages {st}" for st, a in by_set.items())
    if key[0] == "promote":
        return f"promotion, alpha {fams}: the earliest window"
    late = f"{key[2]} late (start >= {ws.WINDOW_RULES['late_from']:.0%} of training)" if key[2] else \
        "none late: 'early harms more' and 'late costs little' are not judged"
    return f"suppression, alpha {fams}: {key[1]} window{'s' if key[1] > 1 else ''}, {late}"


def mechanism_power_text(seeds: int, run_sd: float) -> str:
    """The mechanism questions' power at `seeds` (their own rules on simulated studies at the declared spreads, the
    accuracy's per-run SD `run_sd`)."""
    spread = {**ms.MECHANISM_SPREAD, "acc_sd": run_sd}
    lines = [f"the mechanism questions at {seeds} seeds (csn.experiments.mechanism_stats, rule set {ms.RULES_VERSION}, "
             f"spreads {spread}, effects {ms.EFFECTS}):"]
    lines += [f"  {r['question']:<84} holds {r[I.HOLDS]:.2f}, does not hold {r[I.DOES_NOT_HOLD]:.2f}"
              for r in ms.planned_power(seeds, acc_sd=run_sd)]
    return "\n".join(lines)


def power_text(plan: Plan, shapes: list[dict]) -> str:
    """The dry run's power section: per family shape and verdict, power, MDE and seeds needed (and the mechanism
    questions' power for a mechanism preset)."""
    if plan.preset.mechanism:
        return _map_power_text(plan, shapes) + "\n" + mechanism_power_text(len(plan.seeds), plan.run_sd)
    return _map_power_text(plan, shapes)


def _map_power_text(plan: Plan, shapes: list[dict]) -> str:
    if not shapes:
        return "no regularized condition: no verdict to plan."
    pts = ws.EFFECTS
    src = "as asked" if plan.run_sd != plan.preset.run_sd else f"the preset's: {plan.preset.run_sd_source}"
    lines = [f"power of the verdicts at {len(plan.seeds)} seeds: each verdict's own rule on {I.SIM_STUDIES:,} simulated "
             f"maps, per-run SD of final test accuracy {plan.run_sd:g} ({src}); "
             f"declared effects: the earliest window costs {100 * pts['suppression']:.2f} points and late windows nothing, "
             f"promotion changes accuracy by {100 * pts['promotion']:.2f} points; MDE and seeds needed at power "
             f"{I.POWER:g}"]
    for shape in shapes:
        lines += [f"  {_shape_label(shape)}",
                  f"    {'verdict':<48} {'power':>5}  {'MDE, points':<34} seeds needed"]
        for r in shape["rows"]:
            if r["margin"]:
                little = ws.WINDOW_RULES["little"]
                m = (f"late cost <= {100 * (little - r['mde']):.2f} (margin {100 * r['mde']:.2f})"
                     if math.isfinite(r["mde"]) else "not even when late costs 0")
            else:
                m = f"{100 * r['mde']:.2f}" if math.isfinite(r["mde"]) else f"over {100 * MDE_UPPER:g}"
            need = "over 50" if r["seeds_needed"] is None else str(r["seeds_needed"])
            lines.append(f"    {r['question']:<48} {r['power']:>5.2f}  {m:<34} {need}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# training and measuring
# ------------------------------------------------------------------------------------------------

def check_existing(plan: Plan) -> None:
    """Refuse runs already in the experiment directory that were trained with another configuration."""
    conditions.check_existing(((c, j) for c, _, j in plan.jobs()), steps_per_epoch=plan.steps_per_epoch)


def _once() -> Any:
    """A log that prints each note once (the BatchNorm note once, not once per run), rank 0 alone."""
    notes: list[str] = []

    def log(msg: str) -> None:
        if msg not in notes:
            notes.append(msg)
            if dist.is_main():
                print(msg, file=sys.stderr, flush=True)
    return log


def measure_selectivity(plan: Plan, jobs: list[tuple[Condition, int, Job]], *, progress: bool = True,
                        data: Any = None) -> None:
    """CSI and eta² at each run's selectivity steps (regularized stages only; the baseline every stage), resumable."""
    log = _once()
    data = data if data is not None else load_data(plan.base)  # every run reads the same data: load it once
    pbar = bar(jobs, desc="selectivity", unit="run", progress=progress and dist.is_main())
    for cond, _seed, job in pbar:
        run = Run(job.out)
        layers = None if cond.is_baseline else _layers_of(run, cond)
        run_analysis(run, Selectivity(layers=layers, samples=plan.samples), data=data,
                     checkpoints=steps_text(plan.selectivity_steps(cond)), progress=False, log=log)


def measure_accuracy(plan: Plan, jobs: list[tuple[Condition, int, Job]], *, progress: bool = True,
                     data: Any = None) -> None:
    """Test accuracy (whole split) at each run's window ends, BatchNorm statistics re-estimated from END_BN_BATCHES
    training batches (csn.analysis.accuracy; tables/accuracy.parquet of each run), resumable."""
    once = _once()

    def log(msg: str) -> None:  # the analyses' note names --bn-recalibrate, which this experiment does not take
        once(msg.replace(" (--bn-recalibrate 0 to turn off)", " to measure accuracy at window ends"))

    data = data if data is not None else load_data(plan.base)
    pbar = bar(jobs, desc="accuracy", unit="run", progress=progress and dist.is_main())
    for cond, _seed, job in pbar:
        steps = plan.accuracy_steps(cond)
        if steps:
            run_analysis(Run(job.out), Accuracy(), data=data, checkpoints=steps_text(steps),
                         bn_recalibrate=END_BN_BATCHES, progress=False, log=log)


def measure_analyses(plan: Plan, jobs: list[tuple[Condition, int, Job]], *, progress: bool = True,
                     data: Any = None) -> None:
    """The preset's further analyses (probe, fisher, ...) at each run's selectivity steps, resumable."""
    log = _once()
    data = data if data is not None else load_data(plan.base)
    for name, options in plan.preset.analyses.items():
        entry = analysis(name)
        for cond, _seed, job in bar(jobs, desc=name, unit="run", progress=progress and dist.is_main()):
            run_analysis(Run(job.out), entry.cls(**options), data=data,
                         checkpoints=steps_text(plan.selectivity_steps(cond)), progress=False, log=log)


def _layers_of(run: Run, cond: Condition) -> list[str]:
    """The read points of a condition's regularized stages."""
    if cond.layers is not None:
        return list(cond.layers)
    model = run.build_model()
    names = run.config.reg_layers
    return resolve_layers(model, names) if names else default_reg_layers(model)


def run_windows(plan: Plan, *, progress: bool = True, launcher: LauncherOptions | None = None) -> dict[str, pd.DataFrame]:
    """Train every (condition, seed) (finished runs skipped, partial ones resumed; here, or where `launcher` says:
    Slurm), measure selectivity, write
    the tables; returns them by name. Under torchrun the runs train with DDP one after the other and rank 0 writes."""
    dist.on_main(check_existing, plan)  # an error on rank 0 is raised on every rank
    jobs = plan.jobs()
    t0 = time.perf_counter()
    train_jobs([j for _, _, j in jobs], launcher, parallel=plan.parallel, progress=progress, desc="windows runs")
    t_train = time.perf_counter() - t0
    data = load_data(plan.base)  # every run of the experiment reads the same data: load it once
    if plan.selectivity:
        measure_selectivity(plan, jobs, progress=progress, data=data)
    t_sel = time.perf_counter() - t0 - t_train
    measure_accuracy(plan, jobs, progress=progress, data=data)
    t_acc = time.perf_counter() - t0 - t_train - t_sel
    if plan.selectivity:
        measure_analyses(plan, jobs, progress=progress, data=data)
    t_more = time.perf_counter() - t0 - t_train - t_sel - t_acc
    tables = build_tables(plan, jobs)

    def write() -> None:
        for name, df in tables.items():
            write_table(plan.root / f"{name}.parquet", df)
        write_json(plan.root / "windows.json", _record(plan, {"training": t_train, "selectivity": t_sel,
                                                              "accuracy": t_acc, "analyses": t_more}))

    dist.on_main(write)
    return tables


DESIGN_NOTES = {
    "alpha_per_stage": "every map condition trains with reg_reduce=sum: R is the sum over the regularized stages of "
                       "their mean unit CSI, so alpha applies in full to every stage whatever the stage set (maps run "
                       "before 2026-12-05 split alpha over the stages: reg_reduce=mean)",
    "end_accuracy": f"accuracy at a window's end and at the end of training (end_test_acc, early_gap, final_test_acc, "
                    f"harm) is measured on the whole test split after BatchNorm re-estimation from {END_BN_BATCHES} "
                    "training batches, condition and baseline alike; end_test_acc_eval, early_gap_eval, "
                    "final_test_acc_eval and harm_eval are the checkpoints' own eval-mode values (running statistics; "
                    "intermediate checkpoints on the training's test subset)",
}
"""What windows.json says about the design (beside the resolved config)."""
MEAN_NOTE = ("this map's conditions train with reg_reduce=mean (its preset's): R is the mean over the regularized stages "
             "of their mean unit CSI, so alpha is split over the stages of a set")


def _record(plan: Plan, wall: dict[str, float]) -> dict:
    """windows.json: what was asked, how it resolved, the rules, and how long this invocation took."""
    b = plan.base
    return {"preset": plan.preset.to_dict(), "train_config": b.to_dict(), "seeds": plan.seeds,
            "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total, "samples": plan.samples,
            "lr_schedule": b.lr_schedule, "reg_reduce": b.reg_reduce, "end_bn_batches": END_BN_BATCHES,
            "design": DESIGN_NOTES if b.reg_reduce == "sum" else {**DESIGN_NOTES, "alpha_per_stage": MEAN_NOTE},
            "run_sd": plan.run_sd,
            "conditions": [{"name": c.name, "kind": c.kind, "alpha": c.alpha, "window": c.window,
                            "start_step": c.start_step, "end_step": c.end_step, "start_fraction": c.start_step / plan.total,
                            "stage_set": c.stage_set, "stages": list(c.stages),
                            **({"to_step": c.to_step} if c.kind == "rewind" else {})} for c in plan.conditions],
            "rules": ws.WINDOW_RULES, "rules_version": ws.RULES_VERSION, "rules_declared": ws.RULES_DECLARED,
            "suppression_rule": ws.suppression_rule(), "promotion_rule": ws.promotion_rule(),
            "wall_seconds": {k: round(v, 1) for k, v in wall.items()}, "parallel": plan.parallel,
            "estimate": plan.estimate(), "csn_version": __version__, "torch_version": torch.__version__}


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------

def _set_value(summary: pd.DataFrame | None, step: int, stages_: Sequence[str], col: str) -> float:
    """Mean over the live units of `stages_` at `step` (summary: csn.analysis.selectivity.summarize)."""
    if summary is None:
        return float("nan")
    d = summary[(summary["step"] == step) & summary["stage"].isin(stages_)]
    live = (d["n_units"] - d["n_dead"]).to_numpy(dtype=float)
    vals = d[f"{col}_mean"].to_numpy(dtype=float)
    ok = live > 0
    return float((vals[ok] * live[ok]).sum() / live[ok].sum()) if ok.any() else float("nan")


def _accuracy(run: Run) -> dict[int, dict]:
    return {c.step: {"epoch": c.epoch, "test_acc": c.metrics.get("test_acc", float("nan")),
                     "test_samples": c.metrics.get("test_samples")} for c in run.checkpoints}


def _bn_accuracy(run: Run) -> dict[int, dict]:
    """{step: {acc, bn, n}} of the run's accuracy table (BatchNorm re-estimated), {} when it has none."""
    t = run.read("accuracy")
    if t is None:
        return {}
    return {int(r.step): {"acc": float(r.acc), "bn": int(r.bn_recalibrated), "n": int(r.n_images)} for r in t.itertuples()}


def build_tables(plan: Plan, jobs: list[tuple[Condition, int, Job]]) -> dict[str, pd.DataFrame]:
    """windows_runs, windows, windows_verdicts, windows_accuracy and windows_selectivity from the runs' files."""
    runs = {(c.name, s): Run(j.out) for c, s, j in jobs}
    summaries = {}
    for key, run in runs.items():
        sel = run.read("selectivity")
        summaries[key] = summarize(sel) if sel is not None and len(sel) else None
    per_seed, acc_rows, sel_rows = [], [], []
    for cond, seed, _ in jobs:
        run, base_run = runs[(cond.name, seed)], runs[(BASELINE, seed)]
        acc, base_acc = _accuracy(run), _accuracy(base_run)
        per_seed.append(_seed_row(plan, cond, seed, run, (acc, _bn_accuracy(run)), (base_acc, _bn_accuracy(base_run)),
                                  summaries[(cond.name, seed)], summaries[(BASELINE, seed)]))
        for step, a in acc.items():
            b = base_acc.get(step, {}).get("test_acc", float("nan"))
            acc_rows.append({"condition": cond.name, "seed": seed, "step": step, **a, "base_test_acc": b,
                             "gap": a["test_acc"] - b})
        if summaries[(cond.name, seed)] is not None:
            s = summaries[(cond.name, seed)]
            sel_rows.append(s[["step", "epoch", "stage", "csi_mean", "eta2_mean", "n_units", "n_dead"]]
                            .assign(condition=cond.name, seed=seed))
    runs_df = pd.DataFrame(per_seed)
    sel_df = pd.concat(sel_rows, ignore_index=True) if sel_rows else pd.DataFrame(
        columns=["step", "epoch", "stage", "csi_mean", "eta2_mean", "n_units", "n_dead", "condition", "seed"])
    tables = {"windows_runs": runs_df, "windows": condition_table(runs_df), "windows_verdicts": ws.verdicts(runs_df),
              "windows_accuracy": pd.DataFrame(acc_rows), "windows_selectivity": sel_df}
    if plan.preset.mechanism:
        tables.update(mechanism_tables(runs_df, runs, summaries, plan.total, plan.steps_per_epoch))
    return tables


def _seed_row(plan: Plan, cond: Condition, seed: int, run: Run, acc: tuple[dict, dict], base_acc: tuple[dict, dict],
              summary: pd.DataFrame | None, base_summary: pd.DataFrame | None) -> dict:
    """One (condition, seed) of windows_runs: acc and base_acc are (checkpoint metrics, BN re-estimated accuracy)."""
    (ck, bn), (base_ck, base_bn) = acc, base_acc
    nan = float("nan")
    final, base_final = bn.get(plan.total, {}).get("acc", nan), base_bn.get(plan.total, {}).get("acc", nan)
    final_eval, base_final_eval = ck[plan.total]["test_acc"], base_ck[plan.total]["test_acc"]
    end = plan.total if cond.is_baseline else cond.end_step
    row = {"condition": cond.name, "kind": cond.kind, "alpha": cond.alpha, "window": cond.window,
           "start_step": cond.start_step, "end_step": cond.end_step, "start_fraction": cond.start_step / plan.total,
           "end_fraction": cond.end_step / plan.total, "start_epoch": cond.start_step / plan.steps_per_epoch,
           "end_epoch": cond.end_step / plan.steps_per_epoch, "stage_set": cond.stage_set, "stages": "+".join(cond.stages),
           **({"rewind_to_step": cond.to_step} if cond.kind == "rewind" else {}),
           "seed": seed, "run": str(run.path), "final_test_acc": final, "base_final_test_acc": base_final,
           "harm": base_final - final, "final_test_acc_eval": final_eval, "base_final_test_acc_eval": base_final_eval,
           "harm_eval": base_final_eval - final_eval, "end_test_acc": bn.get(end, {}).get("acc", nan),
           "base_end_test_acc": base_bn.get(end, {}).get("acc", nan),
           "end_bn_batches": bn.get(end, {}).get("bn", -1), "end_test_images": bn.get(end, {}).get("n", -1),
           "end_test_acc_eval": ck.get(end, {}).get("test_acc", nan),
           "base_end_test_acc_eval": base_ck.get(end, {}).get("test_acc", nan), **dose(run)}
    row["early_gap"] = row["end_test_acc"] - row["base_end_test_acc"]
    row["early_gap_eval"] = row["end_test_acc_eval"] - row["base_end_test_acc_eval"]
    for col in ("csi", "eta2"):
        for where, step in (("end", end), ("final", plan.total)):
            row[f"{col}_{where}"] = _set_value(summary, step, cond.stages, col)
            row[f"base_{col}_{where}"] = _set_value(base_summary, step, cond.stages, col)
        row[f"{col}_reduction_end"] = 1 - row[f"{col}_end"] / row[f"base_{col}_end"] if row[f"base_{col}_end"] else float("nan")
    return row


AGGREGATE = ("final_test_acc", "final_test_acc_eval", "harm_eval", "end_test_acc", "base_end_test_acc", "early_gap", "early_gap_eval", "csi_end",
             "base_csi_end", "csi_reduction_end", "eta2_end", "base_eta2_end", "eta2_reduction_end", "csi_final",
             "base_csi_final", "eta2_final", "base_eta2_final", "reg_steps", "reg_mean_lr", "reg_mean_abs_alpha")
"""Columns of windows_runs averaged per condition (mean and SE over seeds) in windows.parquet."""


def condition_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per condition: paired harm (mean, paired SE, unpaired SE, t interval), and mean/SE over seeds of accuracy,
    the early accuracy gap (BN re-estimated, and the checkpoints' eval-mode one), CSI/eta² of the regularized stages at
    the window's end and the end of training, and the dose (regularized steps, mean lr and |alpha| over them; CSI and
    eta² reduction at the window's end)."""
    def harm(g: pd.DataFrame) -> dict[str, float]:
        return {k: v for k, v in ws.paired(g["final_test_acc"], g["base_final_test_acc"]).items() if k != "n"}

    first = ("condition", "kind", "alpha", "window", "start_step", "end_step", "start_fraction", "end_fraction",
             "start_epoch", "end_epoch", "stage_set", "stages", "end_bn_batches", "rewind_to_step")
    out = pd.DataFrame(condition_rows(per_seed, first, AGGREGATE, harm))
    if out.empty:
        return out
    return out.merge(ws.condition_intervals(per_seed), on="condition", how="left")


def trajectories(sel: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per regularized condition, its CSI/eta² curve and the baseline's on the same stages (mean, SE, n over seeds
    at each measured step). The condition's curve starts at the baseline's value at its window start (the weights
    are bitwise the same up to there). Columns: condition, curve (condition|baseline), step, epoch, metric, mean, se, n."""
    cols = ["condition", "curve", "step", "epoch", "metric", "mean", "se", "n"]
    if sel is None or sel.empty or table is None or table.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for c in table[table["kind"] != "baseline"].itertuples():
        st = str(c.stages).split("+")
        by = ("seed", "step", "epoch")
        base = live_unit_means(sel[sel["condition"] == BASELINE], st, by)
        own = live_unit_means(sel[sel["condition"] == c.condition], st, by)
        if c.kind != "rewind":  # a rewind changes the weights at its own step: its curve starts there
            own = pd.concat([base[base["step"] == c.start_step], own], ignore_index=True)
        for curve, d in (("condition", own), ("baseline", base)):
            for metric in ("csi", "eta2"):
                g = d.groupby(["step", "epoch"])[metric]
                agg = g.agg(["mean", "count"]).reset_index().rename(columns={"count": "n"})
                agg["se"] = g.agg(ws.standard_error).to_numpy()
                out.append(agg.assign(condition=c.condition, curve=curve, metric=metric))
    return pd.concat(out, ignore_index=True)[cols] if out else pd.DataFrame(columns=cols)


def gap_curves(acc: pd.DataFrame) -> pd.DataFrame:
    """Per regularized condition and checkpoint: the paired test-accuracy gap to the baseline (condition - baseline,
    same seed; mean, SE, n over seeds). Columns: condition, step, epoch, mean, se, n."""
    cols = ["condition", "step", "epoch", "mean", "se", "n"]
    if acc is None or acc.empty:
        return pd.DataFrame(columns=cols)
    d = acc[(acc["condition"] != BASELINE) & acc["gap"].notna()]
    g = d.groupby(["condition", "step", "epoch"], sort=False)["gap"]
    out = g.agg(["mean", "count"]).reset_index().rename(columns={"count": "n"})
    out["se"] = g.agg(ws.standard_error).to_numpy()
    return out[cols]


MAP_TABLES: dict[str, tuple[str, ...]] = {
    "windows": ("condition", "kind", "alpha", "window", "start_step", "end_step", "stage_set", "stages", "seeds",
                "harm_mean", "harm_se_paired", "harm_se_unpaired", "harm_lo", "harm_hi", "final_test_acc_mean",
                "final_test_acc_se", "early_gap_mean", "early_gap_se", "csi_end_mean", "base_csi_end_mean",
                "eta2_end_mean", "base_eta2_end_mean", "csi_final_mean", "base_csi_final_mean", "final_test_acc_per_seed"),
    "windows_verdicts": ws.VERDICT_COLUMNS,
    "windows_accuracy": ("condition", "seed", "step", "epoch", "test_acc", "base_test_acc", "gap"),
    "windows_selectivity": ("condition", "seed", "step", "epoch", "stage", "csi_mean", "eta2_mean", "n_units", "n_dead"),
}
"""The experiment-level tables of a map and the columns the report reads from each."""


def read_map(root: str | Path) -> dict[str, Any]:
    """A map's tables (by name) and windows.json ('info'), checked: a missing, unreadable or incomplete file is one
    CsnError naming it and the fix."""
    root = Path(root)
    fix = "run the same `csn experiment windows` command again to rewrite it"
    out: dict[str, Any] = {}
    for name, cols in MAP_TABLES.items():
        path = root / f"{name}.parquet"
        if not path.is_file():
            raise CsnError(f"{path} is missing; {fix}.")
        df = read_table(path)
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise CsnError(f"{path} lacks columns {missing}; {fix}.")
        out[name] = df
    try:
        info = json.loads((root / "windows.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CsnError(f"{root / 'windows.json'} is missing or corrupt; {fix}.") from None
    out["info"] = info if isinstance(info, dict) else {}
    return out


# ------------------------------------------------------------------------------------------------
# text for the terminal (and the closing note)
# ------------------------------------------------------------------------------------------------

def verdict_text(verdicts: pd.DataFrame) -> str:
    """The verdicts per (alpha, stage set), with the rules in words below them."""
    if verdicts is None or verdicts.empty:
        return "no regularized condition to judge."
    lines = [f"{'alpha':>6} {'stages':<14} {'verdict':<14} what was seen"]
    for r in verdicts.itertuples():
        lines.append(f"{r.alpha:>6g} {r.stage_set:<14} {r.verdict:<14} {r.question}: {r.observed}")
    for kind, rule in (("suppress", ws.suppression_rule()), ("promote", ws.promotion_rule())):
        if (verdicts["kind"] == kind).any():
            lines.append(f"rule ({'alpha < 0' if kind == 'suppress' else 'alpha > 0'}): {rule}")
    return "\n".join(lines)


def heatmap_text(table: pd.DataFrame) -> str:
    """Paired harm (accuracy points: baseline - condition, mean ± paired SE) per window x alpha, per stage set."""
    reg = table[table["kind"].isin(["suppress", "promote"])]
    blocks = []
    for stage_set, g in reg.groupby("stage_set", sort=False):
        windows = g.drop_duplicates("window").sort_values(["start_step", "end_step"])["window"].tolist()
        head = f"paired harm in points, stages {stage_set} ({g['stages'].iloc[0]}); rows alpha, columns window"
        lines = [head, f"{'alpha':>6} " + " ".join(f"{w:>19}" for w in windows)]
        for alpha, ga in g.groupby("alpha", sort=True):
            cells = []
            for w in windows:
                c = ga[ga["window"] == w]
                cells.append(f"{100 * c['harm_mean'].iloc[0]:+.2f} ± {100 * c['harm_se_paired'].iloc[0]:.2f}"
                             if len(c) else "–")
            lines.append(f"{alpha:>6g} " + " ".join(f"{x:>19}" for x in cells))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


__all__ = ["BASELINE", "END_BN_BATCHES", "ANNEAL_FROM", "DESIGN_NOTES", "WindowGrid", "WindowsPreset",
           "WindowsOptions", "Condition", "Plan", "get_windows_preset", "parse_seeds", "stage_sets", "tile_steps",
           "expand_tiles", "grid_conditions", "lr_overrides", "make_plan", "plan_text", "planned_power", "power_text",
           "check_existing", "measure_selectivity", "measure_accuracy", "run_windows", "build_tables", "condition_table",
           "verdict_text", "heatmap_text", "trajectories", "gap_curves", "MAP_TABLES", "read_map"]
