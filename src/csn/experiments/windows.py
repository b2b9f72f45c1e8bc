"""How early is early? The critical-period map of selectivity suppression (`csn experiment windows`).

After Achille, Rovere and Soatto (ICLR 2019, "Critical learning periods in deep networks"): the deficit (the
selectivity regularizer, alpha != 0) acts only inside a window [start, end) of training, and what is left at
the end is measured. Conditions = the baseline plus one per (alpha, window, stage set); every condition trains
with the same seeds (same initialization, same batches), so each is compared with the baseline of its own
seed (window_stats: the declared statistic and verdicts).

Per condition and seed: final test accuracy (whole test split) and its paired difference to the baseline;
test accuracy at every checkpoint; CSI and eta² of the regularized stages at the end of the window and at the
end of training (the baseline at every window boundary). Tables written to the experiment directory:

    windows_runs.parquet         one row per (condition, seed)
    windows.parquet              one row per condition: paired harm (mean, paired SE, unpaired SE, 95 % t interval)
    windows_verdicts.parquet     one row per (alpha, stage set): the statistic and the verdict
    windows_accuracy.parquet     test accuracy at every checkpoint, and its paired gap to the baseline
    windows_selectivity.parquet  mean CSI / eta² per stage at the measured checkpoints
    windows.json                 the plan, the rules and the wall times
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from pydantic import BeforeValidator, Field

from csn import dist
from csn._version import __version__
from csn.analysis.base import Samples, run_analysis
from csn.analysis.selectivity import Selectivity, summarize
from csn.core.progress import bar, hms
from csn.core.schedules import AlphaWindow, AlphaWindows, checkpoint_steps, parse_window_points
from csn.core.schema import MAX_SEED, MAX_SEEDS, SEEDS_HINT, CommaList, Float, Int, Schema
from csn.core.units import resolve_layers, stage_of, stages
from csn.errors import CsnError, unknown
from csn.experiments import window_stats as ws
from csn.experiments.runner import Job, is_complete, run_jobs
from csn.runs.config import TrainConfig, build_model_for, data_info, is_preset_checkpoints, load_data
from csn.runs.config import preset as train_preset
from csn.runs.io import read_table, write_json, write_table
from csn.runs.naming import run_name
from csn.runs.run import Run
from csn.training.loop import training_length
from csn.training.regularizer import default_reg_layers

BASELINE = "baseline"


# ------------------------------------------------------------------------------------------------
# seeds, presets and options
# ------------------------------------------------------------------------------------------------

def parse_seeds(value: Any) -> list[int]:
    """'3' or 3 -> [0, 1, 2]; '0,1,5' or [0, 1, 5] -> those seeds (distinct, >= 0)."""
    text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value).strip()
    try:
        if "," not in text:
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
    """A grid of conditions: every alpha x window x stage set."""

    alphas: Annotated[list[Float], CommaList] = Field(min_length=1)
    windows: str
    stages: Annotated[list[str], CommaList] = ["default"]


class WindowsPreset(Schema):
    """A critical-period map, declared before it is run: the training preset, the grids of conditions, the seeds,
    and the cost of one run and of one checkpoint's selectivity pass (for the plan's estimate)."""

    name: str
    train_preset: str
    overrides: list[str] = []
    grids: list[WindowGrid]
    seeds: Seeds = [0, 1, 2]
    samples: Int | None = None
    parallel: Int = Field(2, ge=1)
    run_seconds: Float = Field(gt=0, description="One training run, single-threaded, 2 at a time on 2 cores.")
    checkpoint_seconds: Float = Field(gt=0, description="One checkpoint's selectivity pass (BN re-estimation included).")


WINDOW_PRESETS: dict[str, WindowsPreset] = {
    # Seconds on a CPU: tests and a first look (too few seeds for verdicts).
    "smoke": WindowsPreset(
        name="smoke", train_preset="smoke", seeds=[0, 1], samples=128, run_seconds=6.0, checkpoint_seconds=0.3,
        grids=[WindowGrid(alphas=[-3.0], windows="step=0:step=4,step=4:step=8,1:1.5"),
               WindowGrid(alphas=[3.0], windows="step=0:step=4", stages=["layer3"])],
    ),
    # Fashion-MNIST, ResNet-8, 3 epochs (the fmnist training preset, 468 steps per epoch). The early phase (SPEC: the
    # stage-1/2 CSI peak comes within ~60 steps) is covered by five 40-step windows starting every 16 steps (steps
    # 0-104), plus one late window of the same length at epoch 1.5. Strengths from a pilot (seed 0, 2,000 test images,
    # live-unit mean CSI of stages 1-2 at the window's end vs the baseline at that step): in a 20-step window even
    # alpha -10 (-73 %), -20 (-78 %) or -30 (-77 %) stay under -80 %; in a 40-step window alpha -3 gives -74 % and
    # alpha -10 -84 %. So: alpha -10 (>= 80 % inside the window) and -20 (stronger) on the default stages (1-2); each
    # stage alone in the earliest window at -20; promotion at alpha +3 (+62-83 % CSI in 20 steps) in the earliest
    # and the late window. 3 seeds: 18 conditions x 3 = 54 runs.
    "fmnist": WindowsPreset(
        name="fmnist", train_preset="fmnist", seeds=[0, 1, 2], samples=2000, run_seconds=140.0, checkpoint_seconds=1.5,
        grids=[WindowGrid(alphas=[-10.0, -20.0], windows="step=0:step=40,step=16:step=56,step=32:step=72,"
                                                       "step=48:step=88,step=64:step=104,step=702:step=742"),
               WindowGrid(alphas=[-20.0], windows="step=0:step=40", stages=["each"]),
               WindowGrid(alphas=[3.0], windows="step=0:step=40,step=702:step=742")],
    ),
}


def get_windows_preset(name: str) -> WindowsPreset:
    """A windows preset by name."""
    if name not in WINDOW_PRESETS:
        raise unknown("windows preset", name, WINDOW_PRESETS)
    return WINDOW_PRESETS[name]


class WindowsOptions(Schema):
    """What `csn experiment windows` takes (its command-line options are built from these fields)."""

    preset: str = Field("fmnist", description="Windows preset: smoke (seconds; tests and a first look) or fmnist (the "
                        "map on Fashion-MNIST, about 80 minutes on 2 CPU cores).")
    alphas: Annotated[list[Float], CommaList] | None = Field(
        None, min_length=1, description="Regularizer strengths, comma-separated (loss = ce - alpha*R: < 0 suppresses, "
        "> 0 promotes) [default: the preset's conditions]. Giving --alphas, --windows or --stages replaces the preset's "
        "grids by ONE grid (the options given, the preset's first grid for the others).",
        json_schema_extra={"metavar": "A,..."})
    windows: str | None = Field(None, description="Windows START:END, comma-separated, in epochs (0.25), steps (step=64), "
                                "fractions of training (f0.1) or end, e.g. step=0:step=20,1:2 [default: the preset's].",
                                json_schema_extra={"metavar": "S:E,..."})
    stages: Annotated[list[str], CommaList] | None = Field(
        None, description="Stage sets, comma-separated: default (every stage but the last), each (one condition per "
        "stage), all, or stages joined by + (layer1+layer3) [default: the preset's].", json_schema_extra={"metavar": "SETS"})
    seeds: Seeds | None = Field(None, description="N (seeds 0..N-1) or a comma-separated list, shared by every condition "
                                "[default: the preset's].", json_schema_extra={"metavar": "N|LIST"})
    out: str | None = Field(None, description="Experiment directory [default: runs/windows-<preset>].",
                            json_schema_extra={"metavar": "DIR"})
    parallel: Int | None = Field(None, ge=1, description="Training runs at once, each with cores/parallel threads "
                                 "[default: the preset's].", json_schema_extra={"metavar": "N"})
    selectivity: bool = Field(True, description="Measure CSI and eta² at the window ends and the end of training "
                              "(--no-selectivity: accuracy only, no verdicts).")
    samples: Samples = Field(None, description="Selectivity on a fixed subset of N test images, or all "
                             "[default: the preset's].", json_schema_extra={"metavar": "N|all"})
    dry_run: bool = Field(False, description="Print the plan (conditions, seeds, estimated time) and stop.")
    quiet: bool = Field(False, description="No progress bars.")


# ------------------------------------------------------------------------------------------------
# conditions
# ------------------------------------------------------------------------------------------------

def _slug(text: str) -> str:
    """A time point as part of a folder name: step=20 -> step20, 0.25 -> ep0.25, f0.1 and end as written."""
    t = str(text)
    return t.replace("step=", "step") if t.startswith("step=") else t if t[:1] in ("f", "e") else f"ep{t}"


@dataclass(frozen=True)
class WindowCondition:
    """The baseline (alpha 0), or the regularizer at `alpha` on `stages` inside `window` (steps [start_step, end_step))."""

    alpha: float = 0.0
    window: str = ""
    start_step: int = 0
    end_step: int = 0
    stage_set: str = ""
    stages: tuple[str, ...] = ()
    layers: tuple[str, ...] | None = None  # reg_layers; None = the training config's own (the default set)

    @property
    def name(self) -> str:
        if self.alpha == 0:
            return BASELINE
        start, end = self.window.split(":")
        return f"a{self.alpha:+g}_{_slug(start)}-{_slug(end)}" + ("" if self.stage_set == "default" else f"_{self.stage_set}")

    @property
    def kind(self) -> str:
        return "baseline" if self.alpha == 0 else "promote" if self.alpha > 0 else "suppress"

    def apply(self, base: TrainConfig, seed: int, checkpoints: str) -> TrainConfig:
        """The training config of this condition and seed (named `<condition>-s<seed>`)."""
        reg: dict[str, Any] = dict(reg_alpha=None, reg_window=None, reg_schedule=None)
        if self.alpha != 0:
            reg = dict(reg_alpha=self.alpha, reg_window=self.window, reg_schedule=None,
                       reg_layers=list(self.layers) if self.layers is not None else base.reg_layers)
        return base.replace(seed=seed, name=run_name(self.name, seed), checkpoints=checkpoints, **reg)


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
            chosen = tuple(s for s in order if s in parts)
            out.append(("+".join(chosen), chosen, tuple(n for s in chosen for n in declared[s])))
    if not out:
        raise CsnError("no stage set was given; write e.g. --stages default,each.")
    return out


def grid_conditions(grid: WindowGrid, sets: list[tuple], spe: int, total: int, epochs: float) -> list[WindowCondition]:
    """Every alpha x window x stage set of a grid, each window resolved to steps (CsnError if outside training)."""
    points = parse_window_points(grid.windows, "--windows")
    out = []
    for alpha in grid.alphas:
        if alpha == 0:
            raise CsnError("alpha 0 regularizes nothing (it is the baseline, which every experiment trains); give "
                           "alphas < 0 (suppress) or > 0 (promote).")
        for start, end in points:
            (a, b, _), = AlphaWindows([AlphaWindow(start, end, float(alpha))]).resolve(spe, total, epochs).windows
            for label, st, layers in sets:
                out.append(WindowCondition(float(alpha), f"{start}:{end}", a, b, label, st, layers))
    return out


# ------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    """Everything the experiment will do, resolved and validated before anything trains."""

    preset: WindowsPreset
    base: TrainConfig
    conditions: list[WindowCondition]  # baseline first
    seeds: list[int]
    steps_per_epoch: int
    total: int
    root: Path
    parallel: int
    samples: int | None
    selectivity: bool
    base_steps: list[int] = field(default_factory=list)  # checkpoint steps of the training preset
    base_spec: str = ""  # its schedule as written (as steps when a shortened training dropped some points)

    def checkpoints(self, cond: WindowCondition) -> str:
        """The condition's checkpoint schedule: the preset's plus its window's boundaries (the baseline: every
        condition's boundaries), as step=N segments; extra checkpoints never change training."""
        conds = self.conditions if cond.alpha == 0 else [cond]
        extra = sorted({s for c in conds if c.alpha != 0 for s in (c.start_step, c.end_step)} - set(self.base_steps))
        return ",".join([self.base_spec or self.base.checkpoints] + [f"step={s}" for s in extra])

    def jobs(self) -> list[tuple[WindowCondition, int, Job]]:
        out = []
        for cond in self.conditions:
            for seed in self.seeds:
                cfg = cond.apply(self.base, seed, self.checkpoints(cond))
                out.append((cond, seed, Job(cfg, self.root / cfg.name)))
        return out

    def selectivity_steps(self, cond: WindowCondition) -> list[int]:
        """Where selectivity is measured: the window's end and the end of training (the baseline: 0, every window
        boundary and the end; a condition equals its baseline up to its window's start, bitwise)."""
        if cond.alpha == 0:
            return sorted({0, self.total} | {s for c in self.conditions for s in (c.start_step, c.end_step)})
        return sorted({cond.end_step, self.total})

    def estimate(self) -> dict[str, float]:
        """Seconds: training (runs left x cost per run / runs at once) and selectivity (checkpoints x cost); the
        cost per run is the median measured on finished runs here, else the preset's declared one (scaled by epochs)."""
        jobs = self.jobs()
        todo = [j for _, _, j in jobs if not is_complete(j.out)]
        measured = [d for _, _, j in jobs if is_complete(j.out) and (d := run_seconds(j.out)) is not None]
        preset_epochs = train_preset(self.preset.train_preset).override(list(self.preset.overrides)).epochs
        declared = self.preset.run_seconds * self.base.epochs / preset_epochs  # scaled to a shortened training
        per_run = statistics.median(measured) if measured else declared
        n_ckpt = sum(len(self.selectivity_steps(c)) for c, _, _ in jobs) if self.selectivity else 0
        return {"runs": len(jobs), "runs_todo": len(todo), "run_seconds": per_run, "measured_runs": len(measured),
                "training_s": len(todo) * per_run / max(1, min(self.parallel, max(1, len(todo)))),
                "checkpoints": n_ckpt, "selectivity_s": n_ckpt * self.preset.checkpoint_seconds}


def run_seconds(out: Path) -> float | None:
    """Wall seconds a finished run trained for (training.parquet's last time_s), or None."""
    try:
        t = Run(out).read("training")
    except CsnError:
        return None
    return float(t["time_s"].iloc[-1]) if t is not None and len(t) and "time_s" in t else None


def make_plan(opts: WindowsOptions, overrides: Sequence[str] = ()) -> Plan:
    """Resolve the options against the preset, the dataset and the model; every mistake is one CsnError."""
    pre = get_windows_preset(opts.preset)
    given = opts.model_fields_set
    base = train_preset(pre.train_preset).override(list(pre.overrides) + list(overrides))
    if base.reg_alpha is not None or base.reg_window is not None or base.reg_schedule:
        raise CsnError("the training config already has a regularizer (reg_alpha/reg_window/reg_schedule); the windows "
                       "experiment sets it per condition, so drop those overrides.")
    data = load_data(base)
    spe, total = training_length(base, data)
    model = build_model_for(base, data_info(data))
    grids = list(pre.grids)
    if given & {"alphas", "windows", "stages"}:
        first = grids[0]
        grids = [WindowGrid(alphas=opts.alphas if opts.alphas is not None else first.alphas,
                            windows=opts.windows if opts.windows is not None else first.windows,
                            stages=opts.stages if opts.stages is not None else first.stages)]
    conds = [WindowCondition()]
    for grid in grids:
        conds += grid_conditions(grid, stage_sets(grid.stages, model, base.reg_layers), spe, total, base.epochs)
    _refuse_duplicates(conds)
    seeds = opts.seeds if opts.seeds is not None else list(pre.seeds)
    root = Path(opts.out) if opts.out else Path("runs") / f"windows-{pre.name}"
    base_steps, base_spec = _base_schedule(base, spe)
    return Plan(pre, base, conds, seeds, spe, total, root, opts.parallel or pre.parallel,
                opts.samples if "samples" in given else pre.samples, opts.selectivity, base_steps, base_spec)


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


def _refuse_duplicates(conds: list[WindowCondition]) -> None:
    seen: dict[tuple, str] = {}
    for c in conds:
        key = (c.alpha, c.start_step, c.end_step, c.stages)
        if key in seen or c.name in seen.values():
            raise CsnError(f"conditions {seen.get(key, c.name)} and {c.name} are the same (alpha, steps and stages); "
                           "give each window and stage set once.")
        seen[key] = c.name


def plan_text(plan: Plan) -> str:
    """The plan as printed before anything starts: conditions x seeds, what each condition does, the estimate."""
    e, b = plan.estimate(), plan.base
    lines = [f"critical-period map '{plan.preset.name}' in {plan.root}: {len(plan.conditions)} conditions x "
             f"{len(plan.seeds)} seeds ({', '.join(map(str, plan.seeds))}) = {e['runs']} runs, {e['runs_todo']} to train, "
             f"{plan.parallel} at a time",
             f"  each run: {b.model} on {b.dataset}, {b.epochs:g} epochs x {plan.steps_per_epoch} steps = {plan.total} steps",
             f"  {'condition':<34} {'alpha':>6}  {'window (steps)':<16} stages"]
    for c in plan.conditions:
        win = "–" if c.alpha == 0 else f"[{c.start_step}, {c.end_step})"
        st = "–" if c.alpha == 0 else "+".join(c.stages) + (" (default)" if c.stage_set == "default" else "")
        lines.append(f"  {c.name:<34} {c.alpha:>6g}  {win:<16} {st}")
    src = (f"median of {e['measured_runs']} finished runs here" if e["measured_runs"]
           else f"declared for preset {plan.preset.name}")
    sel = (f" + selectivity at {e['checkpoints']} checkpoints x {plan.preset.checkpoint_seconds:g} s"
           if plan.selectivity else "")
    lines.append(f"  estimated time: about {hms(e['training_s'] + e['selectivity_s'])} ({e['runs_todo']} runs x "
                 f"{e['run_seconds']:.0f} s per run, {src}, {plan.parallel} at a time{sel})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# training and measuring
# ------------------------------------------------------------------------------------------------

def check_existing(plan: Plan) -> None:
    """Refuse runs already in the experiment directory that were trained with another configuration (a finished
    run would otherwise be reused as it is): name the difference and the fix."""
    for cond, _seed, job in plan.jobs():
        if not (job.out / "run.json").is_file():
            continue
        diff = Run(job.out).config.diff(job.cfg, steps_per_epoch=plan.steps_per_epoch)
        if diff:
            k, (a, b) = next(iter(diff.items()))
            why = (" (the baseline needs a checkpoint at every window's start and end, so new windows need a new "
                   "baseline)" if k == "checkpoints" and cond.alpha == 0 else "")
            raise CsnError(f"{job.out} was trained with {k} {a!r}, this experiment needs {b!r}{why}; use another --out, "
                           "or the same settings to resume.")


def measure_selectivity(plan: Plan, jobs: list[tuple[WindowCondition, int, Job]], *, progress: bool = True) -> None:
    """CSI and eta² at each run's selectivity steps (regularized stages only; the baseline every stage), resumable."""
    notes: list[str] = []

    def log(msg: str) -> None:  # the BatchNorm note once, not once per run
        if msg not in notes:
            notes.append(msg)
            if dist.is_main():
                print(msg, file=sys.stderr, flush=True)

    data = load_data(plan.base)  # every run of the experiment reads the same data: load it once
    pbar = bar(jobs, desc="selectivity", unit="run", progress=progress and dist.is_main())
    for cond, _seed, job in pbar:
        run = Run(job.out)
        layers = None if cond.alpha == 0 else _layers_of(run, cond)
        run_analysis(run, Selectivity(layers=layers, samples=plan.samples), data=data,
                     checkpoints=",".join(map(str, plan.selectivity_steps(cond))), progress=False, log=log)


def _layers_of(run: Run, cond: WindowCondition) -> list[str]:
    """The read points of a condition's regularized stages."""
    if cond.layers is not None:
        return list(cond.layers)
    model = run.build_model()
    names = run.config.reg_layers
    return resolve_layers(model, names) if names else default_reg_layers(model)


def run_windows(plan: Plan, *, progress: bool = True) -> dict[str, pd.DataFrame]:
    """Train every (condition, seed) (finished runs skipped, partial ones resumed), measure selectivity, write
    the tables; returns them by name. Under torchrun the runs train with DDP one after the other and rank 0 writes."""
    dist.on_main(check_existing, plan)  # an error on rank 0 is raised on every rank
    jobs = plan.jobs()
    t0 = time.perf_counter()
    run_jobs([j for _, _, j in jobs], parallel=plan.parallel, progress=progress, desc="windows runs")
    t_train = time.perf_counter() - t0
    if plan.selectivity:
        measure_selectivity(plan, jobs, progress=progress)
    t_sel = time.perf_counter() - t0 - t_train
    tables = build_tables(plan, jobs)

    def write() -> None:
        for name, df in tables.items():
            write_table(plan.root / f"{name}.parquet", df)
        write_json(plan.root / "windows.json", _record(plan, t_train, t_sel))

    dist.on_main(write)
    return tables


def _record(plan: Plan, t_train: float, t_sel: float) -> dict:
    """windows.json: what was asked, how it resolved, the rules, and how long this invocation took."""
    return {"preset": plan.preset.to_dict(), "train_config": plan.base.to_dict(), "seeds": plan.seeds,
            "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total, "samples": plan.samples,
            "conditions": [{"name": c.name, "kind": c.kind, "alpha": c.alpha, "window": c.window,
                            "start_step": c.start_step, "end_step": c.end_step, "stage_set": c.stage_set,
                            "stages": list(c.stages)} for c in plan.conditions],
            "rules": ws.WINDOW_RULES, "rules_version": ws.RULES_VERSION, "rules_declared": ws.RULES_DECLARED,
            "suppression_rule": ws.suppression_rule(), "promotion_rule": ws.promotion_rule(),
            "wall_seconds": {"training": round(t_train, 1), "selectivity": round(t_sel, 1)}, "parallel": plan.parallel,
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


def build_tables(plan: Plan, jobs: list[tuple[WindowCondition, int, Job]]) -> dict[str, pd.DataFrame]:
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
        per_seed.append(_seed_row(plan, cond, seed, run, acc, base_acc, summaries[(cond.name, seed)],
                                  summaries[(BASELINE, seed)]))
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
    return {"windows_runs": runs_df, "windows": condition_table(runs_df), "windows_verdicts": ws.verdicts(runs_df),
            "windows_accuracy": pd.DataFrame(acc_rows), "windows_selectivity": sel_df}


def _seed_row(plan: Plan, cond: WindowCondition, seed: int, run: Run, acc: dict, base_acc: dict,
              summary: pd.DataFrame | None, base_summary: pd.DataFrame | None) -> dict:
    final, base_final = acc[plan.total]["test_acc"], base_acc[plan.total]["test_acc"]
    end = cond.end_step if cond.alpha != 0 else plan.total
    row = {"condition": cond.name, "kind": cond.kind, "alpha": cond.alpha, "window": cond.window,
           "start_step": cond.start_step, "end_step": cond.end_step, "start_fraction": cond.start_step / plan.total,
           "start_epoch": cond.start_step / plan.steps_per_epoch,
           "end_epoch": cond.end_step / plan.steps_per_epoch, "stage_set": cond.stage_set, "stages": "+".join(cond.stages),
           "seed": seed, "run": str(run.path), "final_test_acc": final, "base_final_test_acc": base_final,
           "harm": base_final - final, "end_test_acc": acc.get(end, {}).get("test_acc", float("nan")),
           "base_end_test_acc": base_acc.get(end, {}).get("test_acc", float("nan"))}
    row["early_gap"] = row["end_test_acc"] - row["base_end_test_acc"]
    for col in ("csi", "eta2"):
        for where, step in (("end", end), ("final", plan.total)):
            row[f"{col}_{where}"] = _set_value(summary, step, cond.stages, col)
            row[f"base_{col}_{where}"] = _set_value(base_summary, step, cond.stages, col)
        row[f"{col}_reduction_end"] = 1 - row[f"{col}_end"] / row[f"base_{col}_end"] if row[f"base_{col}_end"] else float("nan")
    return row


AGGREGATE = ("final_test_acc", "early_gap", "csi_end", "base_csi_end", "csi_reduction_end", "eta2_end", "base_eta2_end",
             "eta2_reduction_end", "csi_final", "base_csi_final", "eta2_final", "base_eta2_final")
"""Columns of windows_runs averaged per condition (mean and SE over seeds) in windows.parquet."""


def condition_table(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Per condition: paired harm (mean, paired SE, unpaired SE, t interval), and mean/SE over seeds of accuracy,
    the early accuracy gap, and CSI/eta² of the regularized stages at the window's end and the end of training."""
    rows = []
    for _, g in per_seed.groupby("condition", sort=False):
        first = g.iloc[0]
        row = {k: first[k] for k in ("condition", "kind", "alpha", "window", "start_step", "end_step", "start_epoch",
                                     "end_epoch", "stage_set", "stages")}
        row["seeds"] = len(g)
        row.update({k: v for k, v in ws.paired(g["final_test_acc"], g["base_final_test_acc"]).items() if k != "n"})
        for col in AGGREGATE:
            v = g[col].to_numpy(dtype=float)
            row[f"{col}_mean"] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            row[f"{col}_se"] = ws.standard_error(v)
        row["final_test_acc_per_seed"] = ", ".join(f"{a:.4f}" for a in g["final_test_acc"])
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    return out.merge(ws.condition_intervals(per_seed), on="condition", how="left")


def _set_means(sel: pd.DataFrame, stages_: Sequence[str]) -> pd.DataFrame:
    """Per (seed, step, epoch): the live-unit mean CSI and eta² over `stages_` (from per-stage summary rows)."""
    d = sel[sel["stage"].isin(stages_)].assign(live=lambda x: (x["n_units"] - x["n_dead"]).clip(lower=0))
    d = d[d["live"] > 0].assign(csi_w=lambda x: x["csi_mean"] * x["live"], eta2_w=lambda x: x["eta2_mean"] * x["live"])
    g = d.groupby(["seed", "step", "epoch"], as_index=False)[["csi_w", "eta2_w", "live"]].sum()
    return g.assign(csi=g["csi_w"] / g["live"], eta2=g["eta2_w"] / g["live"])[["seed", "step", "epoch", "csi", "eta2"]]


def trajectories(sel: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per regularized condition, its CSI/eta² curve and the baseline's on the same stages (mean, SE, n over seeds
    at each measured step). The condition's curve starts at the baseline's value at its window start (the weights
    are bitwise the same up to there). Columns: condition, curve (condition|baseline), step, epoch, metric, mean, se, n."""
    cols = ["condition", "curve", "step", "epoch", "metric", "mean", "se", "n"]
    if sel is None or sel.empty or table is None or table.empty:
        return pd.DataFrame(columns=cols)
    out = []
    for c in table[table["alpha"] != 0].itertuples():
        st = str(c.stages).split("+")
        base = _set_means(sel[sel["condition"] == BASELINE], st)
        own = _set_means(sel[sel["condition"] == c.condition], st)
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
    reg = table[table["alpha"] != 0]
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


__all__ = ["BASELINE", "WINDOW_PRESETS", "WindowGrid", "WindowsPreset", "WindowsOptions", "WindowCondition", "Plan",
           "get_windows_preset", "parse_seeds", "stage_sets", "grid_conditions", "make_plan", "plan_text",
           "check_existing", "measure_selectivity", "run_windows", "build_tables", "condition_table", "verdict_text",
           "heatmap_text", "run_seconds", "trajectories", "gap_curves", "MAP_TABLES", "read_map"]
