"""`csn reproduce`: the study as one resumable pipeline of steps, ending in a report with verdicts.

Baseline runs (N seeds, dense checkpoints) -> selectivity at every checkpoint -> ablation sweeps at
an early, a peak and the last checkpoint -> linearity -> regularized runs (from step 0 and from a
later onset, same seeds) and their selectivity -> CKA regularized vs baseline at matched
checkpoints -> claims C1-C4 -> report. Each step skips work whose outputs exist.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from csn import distributed
from csn.errors import CsnError, unknown
from csn.experiments import claims as C
from csn.experiments.regularize import Condition, condition_table, summarize_runs
from csn.experiments.runner import Job, is_complete, run_jobs
from csn.runs import Run, write_json, write_table
from csn.training.config import preset as train_preset


@dataclass
class ReproducePreset:
    """Everything `csn reproduce` does for one preset; declared before any result is seen."""

    name: str
    train_preset: str
    overrides: list[str] = field(default_factory=list)
    seeds: int = 3                    # baseline seeds
    reg_seeds: int = 2                # seeds per regularized condition
    alpha: float = -1.0               # regularizer strength (alpha < 0 suppresses)
    late_onset: float = 1.0           # epochs; after the early selectivity peak
    early_epoch: float = 0.125        # the 'early' checkpoint of C2/C3 (nearest checkpoint)
    ablation_checkpoints: str = "e0.03,e0.125,last"
    ablation_draws: int = 3
    ablation_grid: str | None = None
    ablation_stages: list[str] | None = None
    ablation_orders: tuple[str, ...] = ("selective", "random", "least")
    ablation_samples: int | None = None   # score ablations on a fixed seeded test subset (None = whole split)
    selectivity_samples: int | None = None
    linearity_samples: int | None = 2000
    linearity_measures: tuple[str, ...] = ("linear", "linearized", "relu")
    cka_samples: int | None = 2000
    parallel: int = 2                 # training runs at once
    judge: bool = True                # False: too small to test the claims; verdicts are reported as inconclusive


REPRODUCE_PRESETS: dict[str, ReproducePreset] = {
    "smoke": ReproducePreset(
        name="smoke", train_preset="smoke", seeds=2, reg_seeds=2, alpha=-3.0, late_onset=1.0, early_epoch=0.25,
        ablation_checkpoints="e0.25,last", ablation_draws=2, ablation_grid="f:0,0.25,0.5,1",
        linearity_samples=128, cka_samples=128, parallel=2, judge=False,
    ),
    "fmnist": ReproducePreset(
        name="fmnist", train_preset="fmnist", seeds=3, reg_seeds=2, alpha=-1.0, late_onset=1.0, early_epoch=0.125,
        ablation_checkpoints="e0.03,e0.125,last", ablation_draws=3, ablation_orders=("selective", "random"),
        ablation_grid="f:0,0.0625,0.125,0.25,0.5,1", ablation_samples=1000, linearity_samples=1000,
        cka_samples=1000, parallel=2,
    ),
    "imagenet": ReproducePreset(
        name="imagenet", train_preset="imagenet-resnet50", seeds=5, reg_seeds=5, alpha=-20.0, late_onset=5.0,
        early_epoch=2.0, ablation_checkpoints="0:10,last", ablation_draws=3, linearity_samples=10000,
        linearity_measures=("linearized", "relu"),  # the softmax-regression fit needs in-memory data
        cka_samples=10000, parallel=1,
    ),
}


def get_preset(name: str) -> ReproducePreset:
    """A copy of a reproduce preset (callers may change it, e.g. --seeds)."""
    if name not in REPRODUCE_PRESETS:
        raise unknown("reproduce preset", name, REPRODUCE_PRESETS)
    return copy.deepcopy(REPRODUCE_PRESETS[name])


@dataclass
class Step:
    """One pipeline step; `weight` is its expected share of the wall time (for the ETA)."""

    name: str
    fn: Callable[[], None]
    weight: float


class Reproduction:
    """The pipeline's state: where it writes, which runs it made."""

    def __init__(self, rp: ReproducePreset, out: Path, *, seeds: int | None = None, data_root: str | None = None,
                 progress: bool = True) -> None:
        self.rp, self.out, self.progress = rp, Path(out), progress
        if seeds is not None:
            if seeds < 1:
                raise CsnError(f"--seeds must be at least 1, got {seeds}.")
            rp.seeds = seeds
            rp.reg_seeds = min(rp.reg_seeds, seeds)
        over = list(rp.overrides) + ([f"data_root={json.dumps(data_root)}"] if data_root else [])
        self.base = train_preset(rp.train_preset).override(over)
        self.conds = [Condition(None), Condition(0.0, rp.alpha), Condition(rp.late_onset, rp.alpha)]

    # ------------------------------------------------------------------ runs
    def _job(self, cond: Condition, seed: int) -> Job:
        cfg = cond.apply(self.base)
        cfg.seed, cfg.name = seed, f"{cond.name}-s{seed}"
        return Job(cfg, self.out / cfg.name)

    def baseline_jobs(self) -> list[Job]:
        return [self._job(self.conds[0], s) for s in range(self.rp.seeds)]

    def reg_jobs(self) -> list[Job]:
        return [self._job(c, s) for c in self.conds[1:] for s in range(self.rp.reg_seeds)]

    def runs(self, jobs: list[Job]) -> list[Run]:
        return [Run(j.out) for j in jobs]

    # ------------------------------------------------------------------ steps
    def steps(self) -> list[Step]:
        rp = self.rp
        from csn.analysis.ablation import ablate_run
        from csn.analysis.cka_run import cka_for_runs
        from csn.analysis.linearity_run import linearity_for_run
        from csn.analysis.selectivity_run import selectivity_for_run

        def train_all():
            # one pool for every run: 2 single-thread jobs use 2 cores better than 1 job with 2 threads
            run_jobs(self.baseline_jobs() + self.reg_jobs(), parallel=rp.parallel, progress=self.progress,
                     desc="training runs")

        def selectivity():
            for run in self.runs(self.baseline_jobs() + self.reg_jobs()):
                selectivity_for_run(run, progress=self.progress)

        def ablation():
            for run in self.runs(self.baseline_jobs()):
                ablate_run(run, checkpoints=rp.ablation_checkpoints, draws=rp.ablation_draws, grid=rp.ablation_grid,
                           stages=rp.ablation_stages, orders=rp.ablation_orders, score_samples=rp.ablation_samples,
                           progress=self.progress)

        def linearity():
            for run in self.runs(self.baseline_jobs()):
                linearity_for_run(run, samples=rp.linearity_samples, measures=rp.linearity_measures,
                                  progress=self.progress)

        def cka():
            for job in self.reg_jobs():
                base = Run(self.out / f"baseline-s{job.cfg.seed}")
                cka_for_runs(Run(job.out), base, mode="runs", samples=rp.cka_samples, progress=self.progress)

        def verdicts():  # reads tables, writes files: rank 0 alone under torchrun
            distributed.on_main(self.write_claims)

        def report():
            from csn.report.html import build_report

            distributed.on_main(build_report, [self.out], out=self.out / "report", progress=self.progress)

        return [
            Step("train baseline and regularized runs", train_all, 0.50),
            Step("selectivity at every checkpoint", selectivity, 0.15),
            Step("ablation sweeps (baseline runs)", ablation, 0.14),
            Step("linearity (baseline runs)", linearity, 0.12),
            Step("CKA regularized vs baseline", cka, 0.05),
            Step("claims", verdicts, 0.01),
            Step("report", report, 0.03),
        ]

    # ------------------------------------------------------------------ claims
    def _early_last_steps(self, runs: list[Run]) -> tuple[dict, dict]:
        early, last = {}, {}
        for run in runs:
            ck = run.checkpoints
            early[str(run.path)] = min(ck, key=lambda c: abs(c.epoch - self.rp.early_epoch)).step
            last[str(run.path)] = ck[-1].step
        return early, last

    def _stacked(self, runs: list[Run], table: str) -> pd.DataFrame | None:
        frames = []
        for run in runs:
            df = run.read(table)
            if df is not None and not df.empty:
                frames.append(df.assign(run=str(run.path)))
        return pd.concat(frames, ignore_index=True) if frames else None

    def compute_claims(self) -> list[C.Verdict]:
        base_runs = self.runs(self.baseline_jobs())
        early, last = self._early_last_steps(base_runs)
        sel = self._stacked(base_runs, "selectivity")
        c1 = C.claim_c1(sel, self.base.epochs)
        abl = self._stacked(base_runs, "ablation")
        gaps = None
        if abl is not None:
            from csn.analysis.ablation import summarize_ablation

            gaps = summarize_ablation(abl).gaps  # per (run, step, stage): selective - random area
        c2 = C.claim_c2(gaps, early, last)
        lin = self._stacked(base_runs, "linearity")
        c3 = C.claim_c3(lin, early)
        all_runs = {}
        for job in self.baseline_jobs()[: self.rp.reg_seeds] + self.reg_jobs():
            name = job.cfg.name.rsplit("-s", 1)[0]
            if is_complete(job.out):
                all_runs[(name, job.cfg.seed)] = Run(job.out)
        per_seed = summarize_runs(all_runs, self.conds) if all_runs else None
        if per_seed is not None:
            write_table(self.out / "regularize_runs.parquet", per_seed)
            write_table(self.out / "regularize.parquet", condition_table(per_seed))
        c4 = C.claim_c4(per_seed, self.rp.late_onset)
        verdicts = [c1, c2, c3, c4]
        if not self.rp.judge:
            for v in verdicts:
                v.observed = (f"preset {self.rp.name} is too small to test the claim (the rule alone gives "
                              f"'{v.verdict}'): {v.observed}")
                v.verdict = C.INCONCLUSIVE
        return verdicts

    def write_claims(self) -> list[C.Verdict]:
        verdicts = self.compute_claims()
        write_json(self.out / "claims.json", {
            "preset": self.rp.name, "thresholds": C.THRESHOLDS, "reproduce_preset": asdict(self.rp),
            "claims": [v.to_dict() for v in verdicts],
        })
        return verdicts


def reproduce(preset: str = "fmnist", out: str | Path | None = None, *, seeds: int | None = None, resume: bool = False,
              force: bool = False, data_root: str | None = None, progress: bool = True) -> tuple[Path, list[C.Verdict]]:
    """Run (or resume) the whole study; return the report path and the verdicts.

    Under torchrun every step runs on every process (training with DDP, analyses sharded over the
    evaluation split) and rank 0 alone writes; the step lines and the result are rank 0's.
    """
    with distributed.same_outcome():  # a bad request fails on every rank together
        rp = get_preset(preset)
        out = Path(out) if out else Path("runs") / f"reproduce-{preset}"
        rep = Reproduction(rp, out, seeds=seeds, data_root=data_root, progress=progress)
    distributed.on_main(_prepare, rep, preset, resume=resume, force=force, data_root=data_root)
    main = distributed.is_main()
    steps = rep.steps()
    total_w = sum(s.weight for s in steps)
    t0, done_w = time.perf_counter(), 0.0
    for i, step in enumerate(steps, 1):
        elapsed = time.perf_counter() - t0
        eta = f", about {_hms(elapsed / done_w * (total_w - done_w))} left" if done_w > 0.05 * total_w and elapsed > 5 else ""
        if main:
            print(f"[{i}/{len(steps)}] {step.name} (elapsed {_hms(elapsed)}{eta})", file=sys.stderr, flush=True)
        step.fn()
        done_w += step.weight
    verdicts = [C.Verdict(**d) for d in json.loads((out / "claims.json").read_text())["claims"]]
    if main:
        print(f"done in {_hms(time.perf_counter() - t0)}", file=sys.stderr)
    return out / "report" / "index.html", verdicts


def _prepare(rep: Reproduction, preset: str, *, resume: bool, force: bool, data_root: str | None) -> None:
    """Check (and with force empty) the output folder; record the settings in reproduce.json."""
    rp, out = rep.rp, rep.out
    if out.exists() and any(out.iterdir()):
        if force:
            import shutil

            if not (out / "reproduce.json").is_file():
                raise CsnError(f"{out} exists and is not a csn reproduction; refusing to delete it, choose another --out.")
            shutil.rmtree(out)
        elif not resume:
            raise CsnError(f"{out} already holds a reproduction; pass --resume to continue it or --force to start over.")
        elif not (out / "reproduce.json").is_file():
            raise CsnError(f"{out} is not a csn reproduction (no reproduce.json); choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"preset": preset, "seeds": rp.seeds, "reg_seeds": rp.reg_seeds, "data_root": data_root}
    old = out / "reproduce.json"
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("settings") != settings:
            raise CsnError(f"{out} was started with {prev.get('settings')}, now {settings}; resume with the same settings or use another --out.")
    write_json(old, {"settings": settings, "reproduce_preset": asdict(rp), "train_config": rep.base.to_dict()})


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
