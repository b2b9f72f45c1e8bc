"""`csn reproduce`: the study as one resumable pipeline of steps, ending in claims (and, from the CLI, a report).

Baseline and regularized runs (from step 0 and from a later onset, same seeds) -> selectivity at
every checkpoint -> ablation sweeps of the baseline runs at an early, a peak and the last checkpoint
-> linearity -> CKA regularized vs baseline at matched checkpoints -> claims C1-C4. Each step skips
work whose outputs exist. The study (csn.experiments.study: a shipped preset or a study file) holds the
options objects of every analysis: it is declared before any result is seen.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from csn import dist
from csn.analysis.ablation import Ablation
from csn.analysis.base import run_analysis
from csn.analysis.cka import Cka
from csn.analysis.linearity import Linearity
from csn.analysis.selectivity import Selectivity
from csn.core.progress import hms
from csn.errors import CsnError
from csn.experiments import claims as C
from csn.experiments.judge import judge
from csn.experiments.regularize import Condition, job
from csn.experiments.runner import Job, run_jobs
from csn.experiments.study import StudyConfig, load_study, onset_epoch, select_times
from csn.runs.io import write_json
from csn.runs.naming import run_name
from csn.runs.run import Run, delete_run_files
from csn.training.loop import training_length


@dataclass
class Step:
    """One pipeline step; `weight` is its expected share of the wall time (for the ETA)."""

    name: str
    fn: Callable[[], None]
    weight: float


class Reproduction:
    """The pipeline's state: the study, where it writes, which runs it makes, its times resolved on the data."""

    def __init__(self, cfg: StudyConfig, out: Path, *, name: str = "study", seeds: int | None = None,
                 progress: bool = True) -> None:
        study = cfg.study
        if seeds is not None:
            study = study.replace(seeds=seeds, reg_seeds=min(study.reg_seeds, seeds))
        self.name, self.study, self.out, self.progress = name, study, Path(out), progress
        self.base = cfg.train
        self.steps_per_epoch, self.total = training_length(self.base)
        self.late_epoch = onset_epoch(study.late_onset, self.steps_per_epoch, self.total)
        self.conds = [Condition(None), Condition(0.0, study.alpha), Condition(self.late_epoch, study.alpha)]

    @property
    def config(self) -> StudyConfig:
        return StudyConfig(train=self.base, study=self.study)

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
            for spec, runs in self._ablation_checkpoints().items():
                run_analysis(runs, Ablation(st.ablation), checkpoints=spec, progress=progress)

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

    def _ablation_checkpoints(self) -> dict[str, list[Run]]:
        """The baseline runs grouped by the checkpoint steps the study's ablation times select on them."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs(self.baseline_jobs()):
            steps = select_times(run.checkpoints, self.study.ablation_checkpoints, int(run.info["steps_per_epoch"]),
                                 int(run.info["total_steps"]))
            groups.setdefault(",".join(map(str, steps)), []).append(run)
        return groups

    # ------------------------------------------------------------------ claims
    def write_claims(self) -> list[C.Verdict]:
        """C1-C4 from the runs' tables (csn.experiments.judge), written to claims.json."""
        return judge(self.out, late_onset=self.late_epoch, judge=self.study.judge, name=self.name,
                     study=self.study.to_dict())

    def record(self) -> dict:
        """What reproduce.json holds: the study, the training config, and the study's times on this data."""
        return {"settings": {"study": self.name, "dataset": self.base.dataset, "model": self.base.model,
                             "seeds": self.study.seeds, "reg_seeds": self.study.reg_seeds},
                "reproduce_preset": self.study.to_dict(), "train_config": self.base.to_dict(),
                "resolved": {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total,
                             "late_onset_step": round(self.late_epoch * self.steps_per_epoch),
                             "late_onset_epoch": self.late_epoch}}


def reproduce(preset: str | None = None, out: str | Path | None = None, *, config: str | Path | None = None,
              dataset: str | None = None, data_root: str | None = None, model: str | None = None,
              sets: tuple[str, ...] | list[str] = (), seeds: int | None = None, resume: bool = False,
              force: bool = False, progress: bool = True,
              report: Callable[[Path], Path] | None = None) -> tuple[Path, list[C.Verdict]]:
    """Run (or resume) the whole study; return the report path and the verdicts.

    The study is a shipped preset (default fmnist) or a study file (config), with the shortcuts dataset,
    data_root, model and `train.KEY=VALUE` / `study.KEY=VALUE` overrides (csn.experiments.study.load_study).
    report(out) -> the report's index.html, run as the last step (the CLI passes csn.report's
    build_report; this layer does not draw). Under torchrun every step runs on every process
    (training with DDP, analyses sharded over the evaluation split) and rank 0 alone writes; the
    step lines and the result are rank 0's.
    """
    with dist.same_outcome():  # a bad request fails on every rank together
        name, cfg = load_study(preset, config, dataset=dataset, data_root=data_root, model=model, sets=sets)
        out = Path(out) if out else Path("runs") / f"reproduce-{name}"
        rep = Reproduction(cfg, out, name=name, seeds=seeds, progress=progress)
    dist.on_main(_prepare, rep, resume=resume, force=force)
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
        eta = f", about {hms(elapsed / done_w * (total_w - done_w))} left" if done_w > 0.05 * total_w and elapsed > 5 else ""
        if main:
            print(f"[{i}/{len(steps)}] {step.name} (elapsed {hms(elapsed)}{eta})", file=sys.stderr, flush=True)
        step.fn()
        done_w += step.weight
    if main:
        print(f"done in {hms(time.perf_counter() - t0)}", file=sys.stderr)


REPRODUCTION_LAYOUT: dict[str, tuple[str, ...]] = {"report": ("index.html", "*.png", "*.svg"),
                                                   ".": ("claims.json", "*.parquet", "reproduce.json")}
"""The files `csn reproduce` writes beside its runs (reproduce.json is deleted last: sorted by name)."""


def _delete_reproduction(out: Path) -> None:
    """--force: delete the runs' files and the reproduction's own, never through a link, never a user's files."""
    if out.is_symlink():
        raise CsnError(f"{out} is a symbolic link; csn never deletes through a link: pass the directory itself.")
    for d in sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink() and (p / "run.json").is_file()):
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
    """The parts of reproduce.json a resumed reproduction must share (not how many runs train at once, devices)."""
    study = {k: v for k, v in record.get("reproduce_preset", {}).items() if k != "parallel"}
    train = {k: v for k, v in record.get("train_config", {}).items() if k not in ("device", "threads", "workers")}
    return {"study": study, "train": train, "seeds": record.get("settings", {}).get("seeds")}


__all__ = ["Step", "Reproduction", "reproduce"]
