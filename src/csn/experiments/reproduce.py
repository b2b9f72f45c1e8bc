"""`csn reproduce`: the study as one resumable pipeline of steps, ending in claims (and, from the CLI, a report).

Baseline and regularized runs (from step 0 and from a later onset, the same seeds) -> selectivity of the
baseline runs at every checkpoint (C1, and each run's selectivity peak) and of the regularized runs where C4
reads it (the end) -> ablation sweeps and linearity of the baseline runs at their selectivity peak and their
last checkpoint (C2, C3; the linear classifier fit once and shared) -> CKA regularized vs baseline at a few
matched checkpoints (no verdict reads it) -> claims C1-C4. Each step skips work whose outputs exist. The
study (csn.experiments.study: a shipped preset or a study file) holds the options objects of every analysis:
it is declared before any result is seen. `plan_text` says what will run, how long it should take and what the
verdicts can detect at the study's seeds (claims.planned_power) before anything starts; `--dry-run` stops there.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import StrictBool

from csn import dist
from csn.analysis.ablation import Ablation
from csn.analysis.base import run_analysis
from csn.analysis.cka import Cka
from csn.analysis.linearity import Linearity, linear_model_path
from csn.analysis.registry import analysis
from csn.analysis.selectivity import Selectivity
from csn.core.checkpoint_schedule import checkpoint_steps
from csn.core.progress import hms
from csn.core.schema import Int, Schema
from csn.core.times import onset_epoch, steps_text
from csn.errors import CsnError
from csn.experiments import claims as C
from csn.experiments.conditions import job, onset_condition
from csn.experiments.judge import judge
from csn.experiments.launcher import LauncherOptions, at_a_time, estimate_note, launch, on_slurm
from csn.experiments.regularize import measure_final
from csn.experiments.runner import (
    Job,
    Task,
    finished_seconds,
    is_complete,
    last_step,
    schedule_seconds,
    train_task,
)
from csn.experiments.study import PEAK, StudyConfig, load_study, select_steps, uses_peak
from csn.models.external import require_trust, trusting_code
from csn.runs.config import EXECUTION_KEYS, check_model, data_info, is_preset_checkpoints, load_data
from csn.runs.io import checksum_problem, sidecar, write_json
from csn.runs.naming import run_name
from csn.runs.run import Run, check_run_path, delete_run_files, foreign_files
from csn.training.loop import training_length

MIN_WEIGHT = 0.5
"""Seconds a task with nothing left to compute is still planned to take (it reads the tables to find that out)."""


@dataclass
class Work:
    """One kind of work in the plan: `total` units (runs, or analysis passes of one checkpoint), `todo` of them left
    (fractions of runs for partial trainings), `seconds` per unit (Reproduction.tasks weighs its tasks with them)."""

    what: str
    where: str
    total: float
    todo: float
    seconds: float
    source: str = "declared"


DATA_KEYS = ("dataset", "data_root", "train_samples", "test_samples", "synthetic")
"""Training-config keys that decide the data: runs equal in these read the same splits (the linear model is shared)."""


class Reproduction:
    """The pipeline's state: the study, where it writes, which runs it makes, its times resolved on the data."""

    def __init__(self, cfg: StudyConfig, out: Path, *, name: str = "study", seeds: int | None = None,
                 progress: bool = True) -> None:
        study = cfg.study if seeds is None else cfg.study.replace(seeds=seeds)
        self.name, self.study, self.out, self.progress = name, study, Path(out), progress
        self.base = cfg.train
        self.steps_per_epoch, self.total = training_length(self.base)
        self.late_epoch = onset_epoch(study.late_onset, self.steps_per_epoch, self.total)
        self.conds = [onset_condition(None), onset_condition(0.0, study.alpha), onset_condition(self.late_epoch, study.alpha)]
        clip = True if is_preset_checkpoints(self.base.checkpoints) else None
        self.ckpt_steps = checkpoint_steps(self.base.checkpoints, self.steps_per_epoch, self.base.epochs, clip=clip)

    def quiet(self) -> Reproduction:
        """This study with its analyses' own progress bars off (a task in a worker: the parent draws the bar)."""
        rep = copy.copy(self)
        rep.progress = False
        return rep

    @property
    def config(self) -> StudyConfig:
        return StudyConfig(train=self.base, study=self.study)

    # ------------------------------------------------------------------ runs
    def baseline_jobs(self) -> list[Job]:
        return [job(self.base, self.conds[0], s, self.out) for s in range(self.study.seeds)]

    def reg_jobs(self) -> list[Job]:
        return [job(self.base, c, s, self.out) for c in self.conds[1:] for s in range(self.study.seeds)]

    def runs(self, jobs: list[Job]) -> list[Run]:
        return [Run(j.out) for j in jobs]

    def peak(self, seed: int) -> int | None:
        """The selectivity peak of the baseline run of `seed` (claims.peak_step on its selectivity table), the
        checkpoint `peak` names for it and for the regularized runs of its seed; None before it is measured."""
        path = self.out / run_name("baseline", seed)
        if not is_complete(path):
            return None
        try:
            sel = Run(path).read("selectivity")
        except CsnError:
            return None
        return C.peak_step(sel, self.total) if sel is not None else None

    def steps_of(self, items: tuple[str, ...], seed: int, *, guess: bool = False) -> list[int]:
        """The checkpoint steps a study's times select on the runs of `seed` (`peak`: its baseline's selectivity
        peak). guess=True (for the plan) stands in an early checkpoint for a peak not measured yet; otherwise a
        missing peak drops `peak` with a note (C2 and C3 then say what is missing)."""
        peak = self.peak(seed) if uses_peak(items) else None
        if peak is None and uses_peak(items):
            early = [s for s in self.ckpt_steps if 0 < s <= C.THRESHOLDS["early_fraction"] * self.total]
            if guess and early:
                peak = early[len(early) // 2]
            else:
                if not guess:
                    print(f"note: {run_name('baseline', seed)} has no selectivity peak (no checkpoint in the first "
                          f"{C.THRESHOLDS['early_fraction']:.0%} of training, or no selectivity table): 'peak' selects "
                          "nothing there.", file=sys.stderr)
                items = tuple(i for i in items if PEAK not in i.split(":"))
        return select_steps(self.ckpt_steps, items, self.steps_per_epoch, self.total, peak) if items else []

    # ------------------------------------------------------------------ tasks
    def tasks(self, trusted: bool = False) -> list[Task]:
        """The study as a graph of tasks (csn.experiments.runner.run_tasks), each weighted by the plan's seconds.
        Per seed: its three runs; once the baseline is trained, its final accuracy and selectivity (which gives its
        peak), then its ablation sweeps and its linearity (after the first seed's linearity, which fits the shared
        linear classifier); once a regularized run and its baseline's selectivity are done, the run's final
        accuracy, selectivity and CKA. The runner starts the ready task heading the heaviest chain of work first, so
        analyses fill the cores the last runs leave idle and no long analysis is left to the end; two tasks on one
        run never run at once (each holds the run's writer lock). trusted: models named as code may be rebuilt
        (passed to the workers)."""
        st, costs, work = self.study, self.study.costs, {w.what: w for w in self.work()}
        fit_left = work["linear_fit"].todo if "linear" in st.linearity.measures else 0

        def cost(kind: str, plan: list[tuple[Job, tuple[str, ...]]]) -> float:
            return self._passes(kind, plan)[1] * getattr(costs, f"{kind}_seconds")

        def task(key: str, method: str, args: tuple, on: Job, after: tuple[str, ...], weight: float, kind: str,
                 label: str) -> Task:
            return Task(key, _study_task, (self, method, args, trusted), after=after, weight=MIN_WEIGHT + weight,
                        kind=kind, label=label, writes=str(on.out))

        tasks = [train_task(job(self.base, c, s, self.out), steps=self.total, weight=work["train"].seconds)
                 for s in range(st.seeds) for c in self.conds]
        for s in range(st.seeds):
            base, regs = self._seed_jobs(s)
            b, sel = str(base.out), f"baseline-analyses-s{s}"
            tasks.append(task(sel, "analyse_baseline", (s,), base, (b,), cost("accuracy", [(base, ("end",))]) +
                              cost("selectivity", [(base, st.selectivity_checkpoints)]), "baseline",
                              f"final accuracy and selectivity of {base.out.name}"))
            tasks.append(task(f"ablation-s{s}", "ablate_baseline", (s,), base, (sel,),
                              cost("ablation", [(base, st.ablation_checkpoints)]), "ablation",
                              f"ablation of {base.out.name}"))
            tasks.append(task(f"linearity-s{s}", "linearity_seed", (s,), base,
                              (sel,) if s == 0 else (sel, "linearity-s0"),
                              cost("linearity", [(base, st.linearity_checkpoints)]) +
                              (fit_left * costs.linear_fit_seconds if s == 0 else 0.0), "linearity",
                              f"linearity of {base.out.name}"))
            for i, j in enumerate(regs):
                cka = cost("cka", [(j, st.cka_checkpoints)]) if st.cka_checkpoints else 0.0
                tasks.append(task(f"reg-analyses-{j.out.name}", "analyse_regularized", (s, i), j, (str(j.out), sel),
                                  cost("accuracy", [(j, ("end",))]) +
                                  cost("selectivity", [(j, st.reg_selectivity_checkpoints)]) + cka, "regularized",
                                  f"final accuracy, selectivity{', CKA' if st.cka_checkpoints else ''} of "
                                  f"{j.out.name}"))
        return tasks

    def estimate(self) -> float:
        """Seconds the work left takes at the study's `parallel` (runner.schedule_seconds over `tasks`)."""
        tasks = self.tasks()
        return schedule_seconds(tasks, self.study.parallel, {t.key for t in tasks if t.run and is_complete(t.run)})

    def _seed_jobs(self, seed: int) -> tuple[Job, list[Job]]:
        """The baseline job of `seed` and its regularized jobs."""
        return job(self.base, self.conds[0], seed, self.out), [job(self.base, c, seed, self.out) for c in self.conds[1:]]

    def analyse_baseline(self, seed: int) -> None:
        """Final accuracy and selectivity of the baseline run of `seed` (see tasks)."""
        base = self._seed_jobs(seed)[0]
        data = Run(base.out).dataset()  # read once for the task's analyses
        measure_final(self.runs([base]), data=data, progress=self.progress)
        self._analyse([base], self.study.selectivity_checkpoints, Selectivity(self.study.selectivity), data)

    def ablate_baseline(self, seed: int) -> None:
        """The ablation sweeps of the baseline run of `seed`, at the checkpoints its selectivity peak gives."""
        self._analyse([self._seed_jobs(seed)[0]], self.study.ablation_checkpoints, Ablation(self.study.ablation))

    def linearity_seed(self, seed: int) -> None:
        """Linearity of one seed's baseline run. The linear classifier depends on the data alone: the first seed's
        task fits it, the others copy it (share_linear_model, with its sha256 sidecar) and check it when they load it."""
        st, (base, _) = self.study, self._seed_jobs(seed)
        if "linear" in st.linearity.measures and seed != 0:
            dist.on_main(share_linear_model, Run(self._seed_jobs(0)[0].out), [Run(base.out)])
        self._analyse([base], st.linearity_checkpoints, Linearity(st.linearity))

    def analyse_regularized(self, seed: int, index: int) -> None:
        """Final accuracy, selectivity and CKA against its baseline of regularized run `index` of `seed`."""
        st, (base, regs) = self.study, self._seed_jobs(seed)
        j = regs[index]
        data = Run(j.out).dataset()
        measure_final(self.runs([j]), data=data, progress=self.progress)
        self._analyse([j], st.reg_selectivity_checkpoints, Selectivity(st.selectivity), data)
        if st.cka_checkpoints:
            self._analyse([j], st.cka_checkpoints, Cka(st.cka.replace(mode="runs", run_b=str(base.out))), data)

    def _analyse(self, jobs: list[Job], items: tuple[str, ...], analysis, data=None) -> None:
        """`analysis` on the runs of `jobs` at the checkpoints the study's times select on each (runs grouped by
        their steps, so runs that share them share one call); data: the runs' DataSplits, if already read."""
        groups: dict[str, list[Run]] = {}
        for j in jobs:
            steps = self.steps_of(items, j.cfg.seed)
            if steps:
                groups.setdefault(steps_text(steps), []).append(Run(j.out))
        for spec, runs in groups.items():
            run_analysis(runs, analysis, data=data, checkpoints=spec, progress=self.progress)

    # ------------------------------------------------------------------ plan
    def work(self) -> list[Work]:
        """What is left to do, per kind, with the declared (or, for training, measured) seconds per unit."""
        st, costs = self.study, self.study.costs
        base, reg = self.baseline_jobs(), self.reg_jobs()
        done_steps = {j.out: last_step(j.out) for j in base + reg}
        measured = finished_seconds([j.out for j in base + reg])
        per_run = statistics.median(measured) if measured else costs.step_seconds * self.total
        source = (f"median of {len(measured)} finished runs here" if measured else
                  f"declared: {costs.step_seconds:g} s per step")
        todo = sum(1 - done_steps[j.out] / self.total for j in base + reg)
        sel = self._passes("selectivity", [(j, st.selectivity_checkpoints) for j in base] +
                           [(j, st.reg_selectivity_checkpoints) for j in reg])
        abl = self._passes("ablation", [(j, st.ablation_checkpoints) for j in base])
        lin = self._passes("linearity", [(j, st.linearity_checkpoints) for j in base])
        cka = self._passes("cka", [(j, st.cka_checkpoints) for j in reg]) if st.cka_checkpoints else (0, 0)
        fits = 0 if "linear" not in st.linearity.measures or lin[1] == 0 else (
            0 if any(linear_model_path(Run(j.out)).is_file() for j in base if (j.out / "run.json").is_file()) else 1)
        acc = self._passes("accuracy", [(j, ("end",)) for j in base + reg])
        return [Work("train", "runs", len(base + reg), todo, per_run, source),
                Work("accuracy", "checkpoints", *acc, costs.accuracy_seconds),
                Work("selectivity", "checkpoints", *sel, costs.selectivity_seconds),
                Work("ablation", "checkpoints", *abl, costs.ablation_seconds),
                Work("linearity", "checkpoints", *lin, costs.linearity_seconds),
                Work("linear_fit", "fits", 1 if "linear" in st.linearity.measures else 0, fits,
                     costs.linear_fit_seconds),
                Work("cka", "checkpoint pairs", *cka, costs.cka_seconds)]

    def _passes(self, table: str, plan: list[tuple[Job, tuple[str, ...]]]) -> tuple[int, int]:
        """(planned, left) checkpoint passes of one analysis over (job, its times): a run's table rows count as done."""
        total = left = 0
        for j, items in plan:
            steps = set(self.steps_of(items, j.cfg.seed, guess=True))
            done = set()
            if (j.out / "run.json").is_file():
                try:
                    t = Run(j.out).read(table)
                except CsnError:
                    t = None
                col = analysis(table).table.step  # the checkpoint column (cka: run A's, this run's)
                done = set(t[col].unique().tolist()) if t is not None and col in t else set()
            total += len(steps)
            left += len(steps - done)
        return total, left

    def power(self) -> list[dict]:
        """Per claim at the study's seeds (every condition has them): the declared effect, power, minimal detectable
        effect and seeds needed (claims.planned_power with the study's spread)."""
        return C.planned_power(self.study.seeds, self.study.spread)

    # ------------------------------------------------------------------ claims
    def write_claims(self) -> list[C.Verdict]:
        """C1-C4 from the runs' tables (csn.experiments.judge), written to claims.json."""
        return judge(self.out, late_onset=self.late_epoch, judge=self.study.judge, name=self.name,
                     study=self.study.to_dict())

    def record(self) -> dict:
        """What reproduce.json holds: the study, the training config, and the study's times on this data."""
        return {"settings": {"study": self.name, "dataset": self.base.dataset, "model": self.base.model,
                             "seeds": self.study.seeds},
                "reproduce_preset": self.study.to_dict(), "train_config": self.base.to_dict(),
                "resolved": {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
                             "late_onset_step": round(self.late_epoch * self.steps_per_epoch),
                             "late_onset_epoch": self.late_epoch}}


def share_linear_model(source: Run, runs: list[Run]) -> None:
    """Copy `source`'s cached linear classifier (tables/linear_model.safetensors and its sha256 sidecar) to the runs
    that have none, when they read the same data (DATA_KEYS of their configs): the fit depends on the data alone
    (fixed seed, LINEAR_FIT_DEFAULTS), so every baseline run of a study would fit the same one. Each copy is written
    atomically (the sidecar first, so a torn copy is refit, never trusted) and checked against its sidecar."""
    src = linear_model_path(source)
    if not src.is_file() or checksum_problem(src) is not None:
        return
    want = {k: source.config.to_dict()[k] for k in DATA_KEYS}
    for run in runs:
        dst = linear_model_path(run)
        if dst.is_file() or {k: run.config.to_dict()[k] for k in DATA_KEYS} != want:
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        for a, b in ((sidecar(src), sidecar(dst)), (src, dst)):
            tmp = b.with_name(f".{b.name}.{os.getpid()}.tmp")
            shutil.copyfile(a, tmp)
            os.replace(tmp, b)
        if checksum_problem(dst) is not None:
            raise CsnError(f"copying the linear classifier to {dst} failed its checksum; delete it and run again.")


def plan_text(rep: Reproduction, power: list[dict] | None = None, launcher: LauncherOptions | None = None) -> str:
    """The plan as printed before anything starts: runs, analyses and where, the time estimate, and per verdict the
    power, minimal detectable effect and seeds needed at the study's seeds. launcher: where the work runs (--launcher
    slurm: one job per task)."""
    st, b, work = rep.study, rep.base, {w.what: w for w in rep.work()}
    tr = work["train"]
    late = f"{st.late_onset} = step {round(rep.late_epoch * rep.steps_per_epoch)}, epoch {rep.late_epoch:.3g}"
    lines = [f"plan of study '{rep.name}' in {rep.out}: 3 conditions x {st.seeds} seeds = {tr.total:g} runs, "
             f"{math.ceil(tr.todo - 1e-9)} to train, {at_a_time(launcher, st.parallel)}",
             f"  conditions: baseline; alpha {st.alpha:g} from step 0; alpha {st.alpha:g} from {late}",
             f"  each run: {b.model} on {b.dataset}, {b.epochs:g} epochs x {rep.steps_per_epoch} steps = {rep.total} steps, "
             f"{len(rep.ckpt_steps)} checkpoints"]
    where = {"accuracy": "every run at end, BatchNorm re-estimated (C4's final accuracy)",
             "selectivity": f"baseline at {', '.join(st.selectivity_checkpoints)}; regularized at "
                            f"{', '.join(st.reg_selectivity_checkpoints)}",
             "ablation": f"baseline at {', '.join(st.ablation_checkpoints)}",
             "linearity": f"baseline at {', '.join(st.linearity_checkpoints)}",
             "linear_fit": "C3's linear classifier: fit once, shared by the baseline runs",
             "cka": f"regularized vs baseline at {', '.join(st.cka_checkpoints)}" if st.cka_checkpoints else
             "off (cka_checkpoints = [])"}
    width = max(len(t) for t in where.values())
    lines.append(f"  {'analysis':<12} {'where':<{width}} {'passes':>7} {'left':>5}")
    for k, text in where.items():
        lines.append(f"  {k:<12} {text:<{width}} {work[k].total:>7g} {work[k].todo:>5g}")
    analyses = sum(w.todo * w.seconds for k, w in work.items() if k != "train")
    lines.append(f"  estimated time: about {hms(rep.estimate())} (work: training {hms(tr.todo * tr.seconds)} = "
                 f"{tr.todo:.3g} runs x {tr.seconds:.0f} s, {tr.source}; analyses {hms(analyses)}, declared in "
                 f"study.costs; {estimate_note(launcher, st.parallel)}, analyses as soon as their runs are trained)")
    lines += power_lines(power if power is not None else rep.power(), st)
    return "\n".join(lines)


def power_lines(power: list[dict], study) -> list[str]:
    """The verdicts' planned power as lines of the plan (claims.planned_power's rows)."""
    lines = [f"  verdicts at {study.seeds} seeds (claims.EFFECTS; t intervals; spread recorded on fmnist: measure "
             "your own)" + ("" if study.judge else "; judge = false: reported as inconclusive"),
             f"    {'claim':<5} {'declared effect':<52} {'power':>6} {'MDE':>8} {'seeds needed':>13}"]
    for r in power:
        mde = "-" if not math.isfinite(r["mde"]) else f"{r['mde']:.4g}"
        need = "> 50" if r["seeds_needed"] is None else str(r["seeds_needed"])
        lines.append(f"    {r['claim']:<5} {str(r['declared']) + ' ' + r['effect']:<52} {r['power']:>6.2f} {mde:>8} "
                     f"{need:>13}")
    lines.append("    (power: P(reproduced) under the declared effect; MDE: the smallest effect with power >= 0.8 at "
                 "these seeds, '-' if none in the searched range)")
    return lines


class StudyRequest(Schema):
    """Which study `reproduce` and `reproduction` run besides the preset: a study file (config), the shortcuts dataset,
    data_root and model, `train.KEY=VALUE` / `study.KEY=VALUE` overrides (sets; csn.experiments.study.load_study),
    seeds (every condition's, replacing the study's), progress bars, and trust_code (a model a study file names as
    code may be imported and run)."""

    config: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    model: str | None = None
    sets: tuple[str, ...] = ()
    seeds: Int | None = None
    progress: StrictBool = True
    trust_code: StrictBool = False

    @property
    def model_typed(self) -> bool:
        """Whether the model was typed on the command line (model, --set train.model=...): explicit, no --trust-code."""
        return self.model is not None or any(p.replace(" ", "").startswith("train.model=") for p in self.sets)

    def source(self, preset: str | None) -> str:
        """Where the study comes from, for messages: 'study file F' or 'study preset NAME'."""
        return f"study file {self.config}" if self.config else f"study preset {preset or 'fmnist'}"


def _request(options: dict) -> StudyRequest:
    """The StudyRequest of reproduce's / reproduction's keyword options (paths given as Path objects read as text)."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    return StudyRequest.parse(data, what="reproduce option")


def reproduce(preset: str | None = None, out: str | Path | None = None, *, resume: bool = False, force: bool = False,
              report: Callable[[Path], Path] | None = None, launcher: LauncherOptions | None = None,
              **options) -> tuple[Path, list[C.Verdict]]:
    """Run (or resume) the whole study; return the report path and the verdicts.

    The study is a shipped preset (default fmnist) or a study file, with the options of a StudyRequest as keywords
    (config, dataset, data_root, model, sets, seeds, progress, trust_code; csn.experiments.study.load_study).
    report(out) -> the report's index.html, run as the last step (the CLI passes csn.report's
    build_report; this layer does not draw). Under torchrun every step runs on every process
    (training with DDP, analyses sharded over the evaluation split) and rank 0 alone writes; the
    step lines and the result are rank 0's. A model named as code ('package.module:factory') by a study file
    runs only with trust_code (typed as `model` or `--set train.model=...` it is explicit); every model is built and
    checked before any run starts. launcher (csn.experiments.launcher) --launcher slurm: every task (each training run, each
    analysis of its runs) is a Slurm job, all submitted at once with their dependencies; the claims and the report are
    made here once they have all completed (under --no-wait: Submitted once the jobs are submitted).
    """
    with dist.same_outcome():  # a bad request fails on every rank together
        req = _request(options)
        rep = reproduction(preset, out, **req.to_dict())
        trusted = req.trust_code or req.model_typed
        check_model(rep.base, data_info(load_data(rep.base)), trust_code=trusted, where=req.source(preset))
    out = rep.out
    dist.on_main(_prepare, rep, resume=resume, force=force)
    if dist.is_main():
        print(plan_text(rep, launcher=launcher), file=sys.stderr, flush=True)
    t0, tasks = time.perf_counter(), rep.tasks(trusted)
    trained = dist.on_main(lambda: {t.key for t in tasks if t.run is not None and is_complete(t.run)})
    with trusting_code(trusted):  # the analyses rebuild the runs' models from run.json
        spent = launch(tasks, launcher, parallel=rep.study.parallel, progress=req.progress, desc="study",
                       done=trained, unit=None, announce=True)
    if not on_slurm(launcher):  # on Slurm no task ran here
        _say(task_times(tasks, spent), t0)
    _say("claims", t0)
    dist.on_main(rep.write_claims)  # reads tables, writes files: rank 0
    index = out / "report" / "index.html"
    if report is not None:
        _say("report", t0)
        dist.on_main(report, out)
    _say("done", t0)
    verdicts = [C.Verdict(**d) for d in json.loads((out / "claims.json").read_text())["claims"]]
    return index, verdicts


def reproduction(preset: str | None = None, out: str | Path | None = None, **options) -> Reproduction:
    """The Reproduction of a study (as `reproduce` takes it: the options of a StudyRequest as keywords), resolved on
    its data; writes nothing (`csn reproduce --dry-run` prints its plan_text). Refuses, before anything is imported,
    a model a study file names as code without trust_code, and an --out no run folder can be made in."""
    req = _request(options)
    name, cfg = load_study(preset, req.config, dataset=req.dataset, data_root=req.data_root, model=req.model,
                           sets=req.sets)
    require_trust(cfg.train.model, req.trust_code or req.model_typed, req.source(preset))
    out = Path(out) if out else Path("runs") / f"reproduce-{name}"
    check_run_path(out, "--out")
    return Reproduction(cfg, out, name=name, seeds=req.seeds, progress=req.progress)


def _say(what: str, t0: float) -> None:
    """A line on stderr (rank 0) after the tasks: the step and the time since the study started."""
    if dist.is_main():
        print(f"{what} (elapsed {hms(time.perf_counter() - t0)})", file=sys.stderr, flush=True)


def task_times(tasks: list[Task], spent: dict[str, float]) -> str:
    """One line: the median wall seconds of the tasks run, per kind of task (training, analyses, linearity), against
    what the plan weighed them (to declare a study's costs from a run on your machine)."""
    kinds: dict[str, list[tuple[float, float]]] = {}
    for t in tasks:
        if t.key in spent:
            kinds.setdefault(t.kind, []).append((spent[t.key], t.weight))
    parts = [f"{k} {statistics.median(s for s, _ in v):.1f} s (planned {statistics.median(w for _, w in v):.1f}, "
             f"{len(v)} tasks)" for k, v in kinds.items()]
    return "median time per task: " + ("; ".join(parts) if parts else "nothing was left to do")


def _study_task(rep: Reproduction, method: str, args: tuple, trusted: bool) -> None:
    """A task of Reproduction.tasks: one of its analysis methods (in a worker: its own bars off, code trusted as the
    caller said)."""
    with trusting_code(trusted):
        getattr(rep.quiet(), method)(*args)


REPRODUCTION_LAYOUT: dict[str, tuple[str, ...]] = {"report": ("index.html", "*.png", "*.svg"),
                                                   ".": ("claims.json", "*.parquet", "reproduce.json")}
"""The files `csn reproduce` writes beside its runs (reproduce.json is deleted last: sorted by name)."""


def _delete_reproduction(out: Path) -> None:
    """--force: delete the runs' files and the reproduction's own, never through a link, never a user's files."""
    if out.is_symlink():
        raise CsnError(f"{out} is a symbolic link; csn never deletes through a link: pass the directory itself.")
    runs = sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and (p / "run.json").is_file())
    kept = [f for d in runs for f in foreign_files(d)]
    if kept:  # checked before anything is deleted: the run could not be trained again in a folder holding them
        more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        raise CsnError(f"--force would keep your file {kept[0]}{more} inside a run folder, where the run cannot be "
                       "trained again (csn never deletes files it did not write); move it out of the run folder and "
                       "repeat --force. Nothing was deleted.")
    for d in runs:
        delete_run_files(d)
        if not any(d.iterdir()):
            d.rmdir()
    kept = delete_run_files(out, REPRODUCTION_LAYOUT)  # every file left below out: the user's
    if kept:
        print(f"note: --force kept {len(kept)} file(s) csn did not write in {out} (e.g. {kept[0]}).", file=sys.stderr)


def _prepare(rep: Reproduction, *, resume: bool, force: bool) -> None:
    """Check (and with force empty) the output folder; record the study in reproduce.json."""
    out = rep.out
    if out.exists() and any(out.iterdir()):
        if force:
            if not (out / "reproduce.json").is_file():
                raise CsnError(f"{out} exists and is not a csn reproduction; refusing to delete it, choose another --out.")
            _delete_reproduction(out)
        elif not resume:
            raise CsnError(f"{out} already holds a reproduction; pass --resume to continue it or --force to start over.")
        elif not (out / "reproduce.json").is_file():
            raise CsnError(f"{out} is not a csn reproduction (no reproduce.json); choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    record, old = rep.record(), out / "reproduce.json"
    if old.is_file():
        try:
            prev = json.loads(old.read_bytes().decode("utf-8"))
        except (OSError, ValueError, RecursionError):
            prev = None
        if not isinstance(prev, dict):
            raise CsnError(f"{old} is unreadable or corrupt; start over with --force, or restore the file.")
        was, now = _comparable(prev), _comparable(record)
        if was != now:
            diff = [k for k in now if was.get(k) != now[k]] or ["the study"]
            raise CsnError(f"{out} was started with a different study ({', '.join(diff)} differ); resume with the same "
                           "settings or use another --out.")
    write_json(old, record)


def _comparable(record: dict) -> dict:
    """The parts of reproduce.json a resumed reproduction must share (not how many runs train at once, how they
    execute and are watched: EXECUTION_KEYS, e.g. devices and the tracker, nor what the plan assumes: declared costs
    and spread)."""
    study = {k: v for k, v in record.get("reproduce_preset", {}).items() if k not in ("parallel", "costs", "spread")}
    train = {k: v for k, v in record.get("train_config", {}).items() if k not in EXECUTION_KEYS}
    return {"study": study, "train": train, "seeds": record.get("settings", {}).get("seeds")}


__all__ = ["Work", "Reproduction", "StudyRequest", "reproduce", "reproduction", "plan_text", "power_lines", "share_linear_model"]
