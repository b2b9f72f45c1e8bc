"""`csn reproduce`: the study as one resumable pipeline of steps, ending in claims (and, from the CLI, a report).

Baseline and regularized runs (from step 0 and from a later onset, same seeds) -> selectivity at
every checkpoint -> ablation sweeps of the baseline runs at an early, a peak and the last checkpoint
-> linearity -> CKA regularized vs baseline at matched checkpoints -> claims C1-C4. Each step skips
work whose outputs exist. A `Study` holds the options objects of every analysis: it is declared
before any result is seen.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from pydantic import Field

from csn import dist
from csn.analysis.ablation import Ablation, AblationOptions, summarize_ablation
from csn.analysis.base import run_analysis
from csn.analysis.cka import Cka, CkaOptions
from csn.analysis.linearity import Linearity, LinearityOptions
from csn.analysis.selectivity import Selectivity, SelectivityOptions
from csn.core.schema import Float, Int, Schema
from csn.errors import CsnError, unknown
from csn.experiments import claims as C
from csn.experiments.regularize import Condition, condition_table, final_per_run, job
from csn.experiments.runner import Job, is_complete, run_jobs
from csn.runs.config import preset as train_preset
from csn.runs.io import write_json, write_table
from csn.runs.naming import parse_run_name, run_name
from csn.runs.run import Run

MAX_SEEDS = 100
SEEDS_HINT = "each seed is one training run per condition plus its analyses: 100 seeds already means hundreds of runs"


class Study(Schema):
    """Everything `csn reproduce` does for one preset; declared before any result is seen."""

    name: str
    train_preset: str
    overrides: list[str] = []
    seeds: Int = Field(3, ge=1, le=MAX_SEEDS, description="Baseline seeds.", json_schema_extra={"range_hint": SEEDS_HINT})
    reg_seeds: Int = Field(2, ge=1, le=MAX_SEEDS, description="Seeds per regularized condition.",
                           json_schema_extra={"range_hint": SEEDS_HINT})
    alpha: Float = Field(-1.0, description="Regularizer strength (alpha < 0 suppresses).")
    late_onset: Float = Field(1.0, description="Epochs; after the early selectivity peak.")
    early_epoch: Float = Field(0.125, description="The 'early' checkpoint of C2/C3 (nearest checkpoint).")
    selectivity: SelectivityOptions = SelectivityOptions()
    ablation: AblationOptions = AblationOptions()
    ablation_checkpoints: str = "e0.03,e0.125,last"
    linearity: LinearityOptions = LinearityOptions()
    cka: CkaOptions = CkaOptions(samples=2000)
    parallel: Int = Field(2, ge=1, description="Training runs at once.")
    judge: bool = Field(True, description="False: too small to test the claims; verdicts are reported as inconclusive.")


STUDIES: dict[str, Study] = {
    "smoke": Study(
        name="smoke", train_preset="smoke", seeds=2, reg_seeds=2, alpha=-3.0, late_onset=1.0, early_epoch=0.25,
        ablation=AblationOptions(draws=2, grid="f:0,0.25,0.5,1"), ablation_checkpoints="e0.25,last",
        linearity=LinearityOptions(samples=128), cka=CkaOptions(samples=128), parallel=2, judge=False,
    ),
    "fmnist": Study(
        name="fmnist", train_preset="fmnist", seeds=3, reg_seeds=2, alpha=-1.0, late_onset=1.0, early_epoch=0.125,
        ablation=AblationOptions(draws=3, orders=("selective", "random"), grid="f:0,0.0625,0.125,0.25,0.5,1",
                                 samples=1000),
        ablation_checkpoints="e0.03,e0.125,last", linearity=LinearityOptions(samples=1000),
        cka=CkaOptions(samples=1000), parallel=2,
    ),
    "imagenet": Study(
        name="imagenet", train_preset="imagenet-resnet50", seeds=5, reg_seeds=5, alpha=-20.0, late_onset=5.0,
        early_epoch=2.0, ablation=AblationOptions(draws=3), ablation_checkpoints="0:10,last",
        # the softmax-regression fit needs in-memory data
        linearity=LinearityOptions(samples=10000, measures=("linearized", "relu")),
        cka=CkaOptions(samples=10000), parallel=1,
    ),
}


def get_study(name: str) -> Study:
    """A reproduce preset by name."""
    if name not in STUDIES:
        raise unknown("reproduce preset", name, STUDIES)
    return STUDIES[name]


@dataclass
class Step:
    """One pipeline step; `weight` is its expected share of the wall time (for the ETA)."""

    name: str
    fn: Callable[[], None]
    weight: float


class Reproduction:
    """The pipeline's state: the study, where it writes, which runs it makes."""

    def __init__(self, study: Study, out: Path, *, seeds: int | None = None, data_root: str | None = None,
                 progress: bool = True) -> None:
        if seeds is not None:
            study = study.replace(seeds=seeds, reg_seeds=min(study.reg_seeds, seeds))
        self.study, self.out, self.progress = study, Path(out), progress
        over = list(study.overrides) + ([f"data_root={json.dumps(data_root)}"] if data_root else [])
        self.base = train_preset(study.train_preset).override(over)
        self.conds = [Condition(None), Condition(0.0, study.alpha), Condition(study.late_onset, study.alpha)]

    # ------------------------------------------------------------------ runs
    def baseline_jobs(self) -> list[Job]:
        return [job(self.base, self.conds[0], s, self.out) for s in range(self.study.seeds)]

    def reg_jobs(self) -> list[Job]:
        return [job(self.base, c, s, self.out) for c in self.conds[1:] for s in range(self.study.reg_seeds)]

    def runs(self, jobs: list[Job]) -> list[Run]:
        return [Run(j.out) for j in jobs]

    # ------------------------------------------------------------------ steps
    def steps(self) -> list[Step]:
        st, progress = self.study, self.progress

        def train_all() -> None:
            # one pool for every run: 2 single-thread jobs use 2 cores better than 1 job with 2 threads
            run_jobs(self.baseline_jobs() + self.reg_jobs(), parallel=st.parallel, progress=progress,
                     desc="training runs")

        def selectivity() -> None:
            run_analysis(self.runs(self.baseline_jobs() + self.reg_jobs()), Selectivity(st.selectivity),
                         progress=progress)

        def ablation() -> None:
            run_analysis(self.runs(self.baseline_jobs()), Ablation(st.ablation), checkpoints=st.ablation_checkpoints,
                         progress=progress)

        def linearity() -> None:
            run_analysis(self.runs(self.baseline_jobs()), Linearity(st.linearity), progress=progress)

        def cka() -> None:
            for j in self.reg_jobs():
                base = self.out / run_name("baseline", j.cfg.seed)
                run_analysis(Run(j.out), Cka(st.cka.replace(mode="runs", run_b=str(base))), progress=progress)

        return [
            Step("train baseline and regularized runs", train_all, 0.50),
            Step("selectivity at every checkpoint", selectivity, 0.15),
            Step("ablation sweeps (baseline runs)", ablation, 0.14),
            Step("linearity (baseline runs)", linearity, 0.12),
            Step("CKA regularized vs baseline", cka, 0.05),
            Step("claims", lambda: dist.on_main(self.write_claims), 0.01),  # reads tables, writes files: rank 0
        ]

    # ------------------------------------------------------------------ claims
    def _early_last_steps(self, runs: list[Run]) -> tuple[dict, dict]:
        early, last = {}, {}
        for run in runs:
            ck = run.checkpoints
            early[str(run.path)] = min(ck, key=lambda c: abs(c.epoch - self.study.early_epoch)).step
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
        c1 = C.claim_c1(self._stacked(base_runs, "selectivity"), self.base.epochs)
        abl = self._stacked(base_runs, "ablation")
        gaps = summarize_ablation(abl).gaps if abl is not None else None  # per (run, step, stage)
        c2 = C.claim_c2(gaps, early, last)
        c3 = C.claim_c3(self._stacked(base_runs, "linearity"), early)
        all_runs = {}
        for j in self.baseline_jobs()[: self.study.reg_seeds] + self.reg_jobs():
            if is_complete(j.out):
                all_runs[(parse_run_name(j.cfg.name)[0], j.cfg.seed)] = Run(j.out)
        per_seed = final_per_run(all_runs, self.conds) if all_runs else None
        if per_seed is not None:
            write_table(self.out / "regularize_runs.parquet", per_seed)
            write_table(self.out / "regularize.parquet", condition_table(per_seed))
        c4 = C.claim_c4(per_seed, self.study.late_onset)
        verdicts = [c1, c2, c3, c4]
        if not self.study.judge:
            for v in verdicts:
                v.observed = (f"preset {self.study.name} is too small to test the claim (the rule alone gives "
                              f"'{v.verdict}'): {v.observed}")
                v.verdict = C.INCONCLUSIVE
        return verdicts

    def write_claims(self) -> list[C.Verdict]:
        verdicts = self.compute_claims()
        write_json(self.out / "claims.json", {
            "preset": self.study.name, "thresholds": C.THRESHOLDS, "reproduce_preset": self.study.to_dict(),
            "claims": [v.to_dict() for v in verdicts],
        })
        return verdicts


def reproduce(preset: str = "fmnist", out: str | Path | None = None, *, seeds: int | None = None, resume: bool = False,
              force: bool = False, data_root: str | None = None, progress: bool = True,
              report: Callable[[Path], Path] | None = None) -> tuple[Path, list[C.Verdict]]:
    """Run (or resume) the whole study; return the report path and the verdicts.

    report(out) -> the report's index.html, run as the last step (the CLI passes csn.report's
    build_report; this layer does not draw). Under torchrun every step runs on every process
    (training with DDP, analyses sharded over the evaluation split) and rank 0 alone writes; the
    step lines and the result are rank 0's.
    """
    with dist.same_outcome():  # a bad request fails on every rank together
        study = get_study(preset)
        out = Path(out) if out else Path("runs") / f"reproduce-{preset}"
        rep = Reproduction(study, out, seeds=seeds, data_root=data_root, progress=progress)
    dist.on_main(_prepare, rep, preset, resume=resume, force=force, data_root=data_root)
    steps = rep.steps()
    index = out / "report" / "index.html"
    if report is not None:
        steps.append(Step("report", lambda: dist.on_main(report, out), 0.03))
    _run_steps(steps)
    verdicts = [C.Verdict(**d) for d in json.loads((out / "claims.json").read_text())["claims"]]
    return index, verdicts


def _run_steps(steps: list[Step]) -> None:
    """Each step in turn, with a line per step saying which of how many is running and the time left."""
    main = dist.is_main()
    total_w = sum(s.weight for s in steps)
    t0, done_w = time.perf_counter(), 0.0
    for i, step in enumerate(steps, 1):
        elapsed = time.perf_counter() - t0
        eta = f", about {_hms(elapsed / done_w * (total_w - done_w))} left" if done_w > 0.05 * total_w and elapsed > 5 else ""
        if main:
            print(f"[{i}/{len(steps)}] {step.name} (elapsed {_hms(elapsed)}{eta})", file=sys.stderr, flush=True)
        step.fn()
        done_w += step.weight
    if main:
        print(f"done in {_hms(time.perf_counter() - t0)}", file=sys.stderr)


def _prepare(rep: Reproduction, preset: str, *, resume: bool, force: bool, data_root: str | None) -> None:
    """Check (and with force empty) the output folder; record the settings in reproduce.json."""
    st, out = rep.study, rep.out
    if out.exists() and any(out.iterdir()):
        if force:
            if not (out / "reproduce.json").is_file():
                raise CsnError(f"{out} exists and is not a csn reproduction; refusing to delete it, choose another --out.")
            shutil.rmtree(out)
        elif not resume:
            raise CsnError(f"{out} already holds a reproduction; pass --resume to continue it or --force to start over.")
        elif not (out / "reproduce.json").is_file():
            raise CsnError(f"{out} is not a csn reproduction (no reproduce.json); choose another --out.")
    out.mkdir(parents=True, exist_ok=True)
    settings = {"preset": preset, "seeds": st.seeds, "reg_seeds": st.reg_seeds, "data_root": data_root}
    old = out / "reproduce.json"
    if old.is_file():
        prev = json.loads(old.read_text())
        if prev.get("settings") != settings:
            raise CsnError(f"{out} was started with {prev.get('settings')}, now {settings}; resume with the same settings "
                           "or use another --out.")
    write_json(old, {"settings": settings, "reproduce_preset": st.to_dict(), "train_config": rep.base.to_dict()})


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["Study", "STUDIES", "get_study", "Step", "Reproduction", "reproduce"]
