"""Run many training jobs (conditions x seeds), skipping finished runs and resuming partial ones,
optionally several at once in worker processes (small models use 2 cores better as 2 single-thread jobs)."""

from __future__ import annotations

import json
import os
import signal
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
from pydantic import Field

from csn import dist
from csn.core.processes import die_with_parent
from csn.core.progress import bar
from csn.core.schema import Int, Schema
from csn.errors import CsnError
from csn.runs.config import TrainConfig
from csn.runs.run import Run, read_manifest
from csn.training.loop import train


class RunnerOptions(Schema):
    """How an experiment's training runs are executed (the --parallel of `csn experiment ...`)."""

    parallel: Int = Field(2, ge=1, description="Training runs at once, each in its own process with cores/parallel "
                          "threads (1: one after the other in this process).", json_schema_extra={"metavar": "N"})


@dataclass
class Job:
    """One training run to make: a config and its run directory."""

    cfg: TrainConfig
    out: Path


def is_complete(out: str | Path) -> bool:
    """True when the run directory holds its final checkpoint."""
    out = Path(out)
    try:
        info = json.loads((out / "run.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: JSON or UTF-8 decoding
        return False
    if not isinstance(info, dict):
        return False
    ckpts = read_manifest(out / "checkpoints")
    return bool(ckpts) and ckpts[-1].step == info.get("total_steps")


_worker = {"in_job": False, "stopping": False}  # a worker process's state (see _worker_init)
STOP_TIMEOUT_S = 60.0  # how long a stopped worker may take to leave its run resumable before it is killed
POLL_S = 2.0  # how often the parent reads the runs' manifests for the optimizer-step bar


def finished_seconds(outs: list[str | Path]) -> list[float]:
    """Wall seconds each finished run of `outs` trained for (training.parquet's last time_s); the experiments' plans
    estimate the time left from their median."""
    secs = []
    for out in outs:
        if not is_complete(out):
            continue
        try:
            t = Run(Path(out)).read("training")
        except CsnError:
            continue
        if t is not None and len(t) and "time_s" in t:
            secs.append(float(t["time_s"].iloc[-1]))
    return secs


def last_step(out: Path) -> int:
    """The step of a run's last checkpoint (the manifest the training loop rewrites at every checkpoint); 0 if none."""
    try:
        ckpts = read_manifest(out / "checkpoints")
    except (CsnError, OSError, ValueError):
        return 0
    return ckpts[-1].step if ckpts else 0


def _on_interrupt(signum, frame) -> None:
    """A worker's SIGINT: the first one stops the job under way (train saves nothing half-written and releases the
    run's lock); later ones, and one that arrives between jobs, only mark the worker as stopping."""
    first = not _worker["stopping"]
    _worker["stopping"] = True
    if first and _worker["in_job"]:
        raise KeyboardInterrupt


def _worker_init(parent_pid: int) -> None:
    """Runs first in every worker process: die with the parent (even on SIGKILL), stop cleanly on SIGINT."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, _on_interrupt)


def _run_job(cfg_dict: dict, out: str, threads: int | None, progress: bool = False) -> str:
    if _worker["stopping"]:  # interrupted: start nothing new (a job already queued to this worker)
        raise KeyboardInterrupt
    _worker["in_job"] = True
    try:
        return _train_job(cfg_dict, out, threads, progress)
    finally:
        _worker["in_job"] = False


def _train_job(cfg_dict: dict, out: str, threads: int | None, progress: bool = False) -> str:
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    resume = (Path(out) / "run.json").is_file()
    train(cfg, out, resume=resume, progress=progress)
    return out


class _Progress:
    """The bar of run_jobs: finished runs, or with `steps` (optimizer steps per run) the optimizer steps of every
    run, read from the runs' manifests (checkpoint granularity) by the parent, so training is never slowed."""

    def __init__(self, jobs: list[Job], todo: list[Job], steps: int | None, desc: str, progress: bool) -> None:
        self.jobs, self.steps, self.desc, self.finished = jobs, steps, desc, len(jobs) - len(todo)
        total, initial = (len(jobs), self.finished) if steps is None else (
            steps * len(jobs), sum(min(last_step(j.out), steps) for j in jobs))
        self.pbar = bar(total=total, initial=initial, unit="run" if steps is None else "step",
                        desc=self._desc(), progress=progress, dynamic_ncols=True)

    def _desc(self) -> str:
        return self.desc if self.steps is None else f"{self.desc} {self.finished}/{len(self.jobs)}"

    def poll(self) -> None:
        """Advance the step bar to the runs' last checkpoints."""
        if self.steps is not None:
            now = sum(min(last_step(j.out), self.steps) for j in self.jobs)
            self.pbar.update(max(0, now - self.pbar.n))

    def run_done(self) -> None:
        self.finished += 1
        if self.steps is None:
            self.pbar.update(1)
        else:
            self.pbar.set_description(self._desc(), refresh=False)
            self.poll()

    def close(self) -> None:
        self.pbar.close()


def run_jobs(jobs: list[Job], *, parallel: int = 1, progress: bool = True, desc: str = "training",
             steps: int | None = None) -> list[Run]:
    """Train every job that is not complete (resuming partial runs); return the runs in job order.

    steps: the optimizer steps of one run; given, the bar counts the steps of every run (updated at each run's
    checkpoints) instead of finished runs, and one run at a time shows the training loop's own bar. Under torchrun
    the jobs run one after the other, each on every process (DDP), whatever `parallel`.
    """
    parallel = RunnerOptions.parse({"parallel": parallel}).parallel
    todo = dist.on_main(lambda: [i for i, j in enumerate(jobs) if not is_complete(j.out)])
    todo = [jobs[i] for i in todo]
    cores = os.cpu_count() or 1
    parallel = 1 if dist.is_dist() else min(parallel, len(todo) or 1)
    threads = None if dist.is_dist() else max(1, cores // parallel)  # torchrun sets OMP_NUM_THREADS
    show = progress and dist.is_main()
    bars = _Progress(jobs, todo, steps, desc, show)
    try:
        if parallel == 1:
            for j in todo:
                _run_job(j.cfg.to_dict(), str(j.out), threads, progress=progress and steps is not None)
                bars.run_done()
        else:
            _run_in_workers(todo, parallel, threads, bars)
    finally:
        bars.close()
    for j in jobs:
        if not is_complete(j.out):
            raise CsnError(f"training {j.out} did not finish; run the same command again to resume it.")
    return [Run(j.out) for j in jobs]


def _run_in_workers(todo: list[Job], parallel: int, threads: int | None, bars: _Progress) -> None:
    """The jobs in `parallel` spawned worker processes that die with this one. On Ctrl-C or a failed job, nothing
    new starts and the jobs under way are stopped cleanly (resumable) before the error goes on."""
    pool = ProcessPoolExecutor(parallel, mp_context=get_context("spawn"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    try:
        pending = {pool.submit(_run_job, j.cfg.to_dict(), str(j.out), threads) for j in todo}
        while pending:
            done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()
                bars.run_done()
            bars.poll()
    except BaseException:
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel the jobs not started, interrupt the running ones (SIGINT: a clean stop) and wait for the workers;
    one that does not stop within STOP_TIMEOUT_S is killed (its run stays resumable, as after any kill)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())  # the executor's worker processes
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive() and p.pid:
            try:
                os.kill(p.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
    for p in procs:
        p.join(STOP_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
