"""Run many tasks, several at once in worker processes (small models use 2 cores better as 2 single-thread jobs):
training runs (conditions x seeds; finished runs skipped, partial ones resumed) and, for `csn reproduce`, the
analyses that wait on them (run_tasks, a graph of Tasks)."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from csn import dist
from csn.core.processes import die_with_parent
from csn.core.progress import bar, hms
from csn.core.schema import Int, Schema
from csn.errors import CsnError
from csn.runs.config import TrainConfig
from csn.runs.run import Run, read_manifest
from csn.training.loop import train

PARALLEL_HELP = "Training runs at once, each in its own process with cores/parallel threads (1: one after the other in this process)"


class RunnerOptions(Schema):
    """How an experiment's training runs are executed (the --parallel of `csn experiment ...`)."""

    parallel: Int = Field(2, ge=1, description=f"{PARALLEL_HELP}.", json_schema_extra={"metavar": "N"})


class PresetRunnerOptions(Schema):
    """How an experiment declared by a preset runs: --parallel (the preset's unless given) and --quiet; the options
    schemas of `csn experiment windows` and `regime` extend it."""

    parallel: Int | None = Field(None, ge=1, description=f"{PARALLEL_HELP} [default: the preset's].",
                                 json_schema_extra={"metavar": "N"})
    quiet: bool = Field(False, description="No progress bars.")


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


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (what a Slurm allocation, taskset or a container's
    cpuset grants), not every core of the machine (os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (indices or UUIDs), without starting CUDA
    here (a spawned worker starts its own)."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g.strip() for g in named.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def gpu_placement(parallel: int, gpus: list[str]) -> list[tuple[str, float]]:
    """Where each of `parallel` workers runs on a machine showing `gpus`: worker k on GPU gpus[k % len(gpus)], with
    the share of that GPU's memory it may hold (1 / the workers on that GPU, so that one run cannot starve the
    others of memory). No GPUs: an empty list (nothing to place)."""
    if not gpus:
        return []
    per_gpu = [len(range(g, parallel, len(gpus))) for g in range(len(gpus))]
    return [(gpus[k % len(gpus)], 1.0 / per_gpu[k % len(gpus)]) for k in range(parallel)]


def _worker_init(parent_pid: int, slots: Any = None, placement: list[tuple[str, float]] | None = None) -> None:
    """Runs first in every worker process: die with the parent (even on SIGKILL), stop cleanly on SIGINT; on a
    machine with GPUs, take the next place of `placement` (slots: a shared counter): that GPU alone is visible to
    the worker (its cuda:0) and dist.resolve_device caps its memory at the place's share."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, _on_interrupt)
    if placement:
        with slots.get_lock():
            k, slots.value = slots.value, slots.value + 1
        gpu, share = placement[k % len(placement)]
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        os.environ[dist.GPU_SHARE_ENV] = repr(share)


def _run_task(fn: Callable[..., Any], args: tuple, threads: int | None) -> tuple[Any, float]:
    """A task in a worker (or in this process) with `threads` torch threads: (its result, its wall seconds). An
    interrupted worker starts nothing."""
    if _worker["stopping"]:  # interrupted: start nothing new (a task already queued to this worker)
        raise KeyboardInterrupt
    _worker["in_job"] = True
    t0 = time.perf_counter()
    try:
        if threads:
            torch.set_num_threads(threads)
        return fn(*args), time.perf_counter() - t0
    finally:
        _worker["in_job"] = False


def _train_job(cfg_dict: dict, out: str, progress: bool = False) -> str:
    """Train (or resume) one run: the task of a training Job."""
    cfg = TrainConfig.from_dict(cfg_dict)
    resume = (Path(out) / "run.json").is_file()
    train(cfg, out, resume=resume, progress=progress)
    return out


@dataclass
class Task:
    """One unit of work for run_tasks: fn(*args), in a worker process when several run at once (fn a module-level
    function, args picklable). It starts once every task named in `after` has finished (which ready task starts
    first: _Queue). `weight` is its share of the whole (the plan's seconds, or a run's steps);
    a training task names its run folder (`run`, with `steps` per run) so its share advances with its checkpoints.
    `kind` groups tasks in the progress line ('training 3/15'). `writes`: the run folder the task writes in; two
    tasks that write in one folder never run at once (each holds the run's writer lock)."""

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()
    weight: float = 1.0
    kind: str = "tasks"
    label: str = ""
    run: Path | None = None
    steps: int | None = None
    writes: str | None = None

    def fraction(self) -> float:
        """How much of a training task is done (its run's last checkpoint); 0 for other tasks."""
        if self.run is None or not self.steps:
            return 0.0
        return min(last_step(self.run), self.steps) / self.steps


def train_task(j: Job, *, steps: int | None = None, weight: float | None = None, progress: bool = False) -> Task:
    """The task that trains (or resumes) the run of `j`."""
    return Task(str(j.out), _train_job, (j.cfg.to_dict(), str(j.out), progress), weight=weight or steps or 1.0,
                kind="training", label=f"train {j.out.name}", run=j.out, steps=steps, writes=str(j.out))


PERCENT_BAR = "{desc}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
"""The bar of tasks weighted by planned seconds (unit None): how much is done, not how many units."""


class Progress:
    """The bar of run_tasks: the tasks' weights done, a running training task's share read from its run's manifest
    (checkpoint granularity) by the parent, so training is never slowed; the description counts finished tasks per
    kind ('training runs 3/15')."""

    def __init__(self, tasks: list[Task], done: set[str], desc: str, progress: bool, unit: str | None = "task") -> None:
        self.tasks, self.done, self.desc, self.t0 = tasks, set(done), desc, time.perf_counter()
        self.note = ""  # appended to the description (--launcher slurm: the jobs' states)
        self.n0 = self._n()  # done before this command (a resumed study): not part of the rate
        shown = {"unit": unit} if unit else {"bar_format": PERCENT_BAR}  # weights in planned seconds: a share
        self.pbar = bar(total=sum(t.weight for t in tasks), initial=self.n0, desc=self._desc(), progress=progress,
                        dynamic_ncols=True, **shown)

    def _n(self) -> float:
        return sum(t.weight * (1.0 if t.key in self.done else t.fraction()) for t in self.tasks)

    def _desc(self) -> str:
        kinds: dict[str, list[int]] = {}
        for t in self.tasks:
            k = kinds.setdefault(t.kind, [0, 0])
            k[0] += t.key in self.done
            k[1] += 1
        counts = ", ".join(f"{k} {d}/{n}" for k, (d, n) in kinds.items())
        return " ".join([self.desc] * bool(self.desc) + [counts] + [f"({self.note})"] * bool(self.note))

    def set_note(self, note: str) -> None:
        """Show `note` after the counts (e.g. the Slurm jobs' states)."""
        if note != self.note:
            self.note = note
            self.pbar.set_description(self._desc(), refresh=False)

    def poll(self) -> None:
        """Advance the bar to the running training tasks' last checkpoints."""
        self.pbar.update(max(0.0, self._n() - self.pbar.n))

    def task_done(self, key: str) -> None:
        self.done.add(key)
        self.pbar.set_description(self._desc(), refresh=False)
        self.poll()

    def elapsed_and_left(self) -> tuple[float, float | None]:
        """Seconds since the bar started and, once a twentieth is done here, the time left at the rate so far."""
        elapsed, n, total = time.perf_counter() - self.t0, self._n(), sum(t.weight for t in self.tasks)
        here = n - self.n0
        return elapsed, (elapsed / here * (total - n) if here > 0.05 * total and elapsed > 5 else None)

    def close(self) -> None:
        self.pbar.close()


class _Queue:
    """The tasks not started yet and the rule that picks the next: among the ready tasks (every task it comes
    `after` done, and no running task writing where it writes), the one heading the heaviest chain of work still to come (its weight plus the heaviest path of
    tasks that wait on it: critical-path list scheduling, so a long analysis is not left to the end), the earlier
    in the list on a tie. Unknown names and cycles in `after` are refused when the queue is made."""

    def __init__(self, tasks: list[Task], done: set[str]) -> None:
        keys = {t.key for t in tasks}
        for t in tasks:
            missing = [a for a in t.after if a not in keys]
            if missing:
                raise ValueError(f"task {t.key!r} comes after unknown task(s) {missing}")
        self.order = {t.key: i for i, t in enumerate(tasks)}
        self.chain = _chains(tasks)
        self.todo = [t for t in tasks if t.key not in done]

    def pop(self, done: set[str], running: Iterable[Task] = ()) -> Task | None:
        """The next task to start beside `running` (removed from the queue), or None when none is ready."""
        busy = {t.writes for t in running if t.writes is not None}
        ready = [t for t in self.todo if all(a in done for a in t.after) and (t.writes is None or t.writes not in busy)]
        if not ready:
            return None
        best = max(ready, key=lambda t: (self.chain[t.key], -self.order[t.key]))
        self.todo.remove(best)
        return best


def in_order(tasks: list[Task], done: set[str] | frozenset = frozenset()) -> list[Task]:
    """The tasks not in `done`, each after every task it comes `after` (in the order run_tasks would start them one
    at a time): how a Slurm launcher submits a graph of tasks with their dependencies."""
    queue, finished, order = _Queue(tasks, set(done)), set(done), []
    while (t := queue.pop(finished)) is not None:
        order.append(t)
        finished.add(t.key)
    return order


def _chains(tasks: list[Task]) -> dict[str, float]:
    """Per task: its weight plus the heaviest chain of tasks that come after it (directly or not)."""
    waiting: dict[str, list[str]] = {t.key: [] for t in tasks}
    for t in tasks:
        for a in t.after:
            waiting[a].append(t.key)
    weight = {t.key: t.weight for t in tasks}
    chain: dict[str, float] = {}
    state: dict[str, int] = {}  # 1: being resolved, 2: resolved

    def resolve(key: str) -> float:
        if state.get(key) == 1:
            raise ValueError(f"tasks wait on each other through {key!r}: their `after` form a cycle")
        if state.get(key) != 2:
            state[key] = 1
            chain[key] = weight[key] + max((resolve(k) for k in waiting[key]), default=0.0)
            state[key] = 2
        return chain[key]

    for t in tasks:
        resolve(t.key)
    return chain


def run_tasks(tasks: list[Task], *, parallel: int = 1, progress: bool = True, desc: str = "",
              done: set[str] | None = None, unit: str | None = "task", announce: bool = False) -> dict[str, float]:
    """Run `tasks` (those not in `done`), each once every task it comes `after` has finished, by _Queue's rule,
    `parallel` at a time in spawned worker processes that die with this one (cores / parallel torch threads each),
    or one after the other in this process (parallel 1, and under torchrun, where every process runs every task
    alike). announce: a line on stderr as each task starts ('[3/27] train baseline-s1 (elapsed 4m10s, about 21m
    left)'). On Ctrl-C or a failed task nothing new starts and the tasks under way are stopped cleanly (resumable)
    before the error goes on. unit: what the weights count ('run', 'step'), or None for planned seconds (the bar
    shows a percentage). Returns the wall seconds of each task run here, by key."""
    parallel = RunnerOptions.parse({"parallel": parallel}).parallel
    done = set(done or ()) & {t.key for t in tasks}
    queue = _Queue(tasks, done)
    parallel = 1 if dist.is_dist() else min(parallel, len(queue.todo) or 1)
    threads = None if dist.is_dist() else max(1, available_cores() // parallel)  # torchrun sets OMP_NUM_THREADS
    bars = Progress(tasks, done, desc, progress and dist.is_main(), unit)

    def started(t: Task) -> None:
        if announce and dist.is_main():
            elapsed, left = bars.elapsed_and_left()
            eta = f", about {hms(left)} left" if left is not None else ""
            bars.pbar.write(f"[{len(tasks) - len(queue.todo)}/{len(tasks)}] {t.label or t.key} (elapsed "
                            f"{hms(elapsed)}{eta})", file=sys.stderr)

    seconds: dict[str, float] = {}
    try:
        if parallel == 1:
            while (t := queue.pop(bars.done)) is not None:
                started(t)
                seconds[t.key] = _run_task(t.fn, t.args, threads)[1]
                bars.task_done(t.key)
        else:
            _run_in_workers(queue, parallel, threads, bars, started, seconds)
    finally:
        bars.close()
    return seconds


def schedule_seconds(tasks: list[Task], parallel: int, done: set[str] | frozenset = frozenset()) -> float:
    """How long `tasks` take `parallel` at a time by run_tasks' rule (_Queue), each taking its weight in seconds (a
    training task: the part of its run not yet trained): the plans' estimate when work runs beside other work."""
    finished, clock, running = set(done), 0.0, []
    queue = _Queue(tasks, finished)
    while queue.todo or running:
        while len(running) < max(1, parallel) and (t := queue.pop(finished, [r for _, _, r in running])) is not None:
            running.append((clock + t.weight * (1.0 - t.fraction()), queue.order[t.key], t))
        running.sort(key=lambda r: r[:2])
        clock, _, t = running.pop(0)
        finished.add(t.key)
    return clock


def run_jobs(jobs: list[Job], *, parallel: int = 1, progress: bool = True, desc: str = "training",
             steps: int | None = None) -> list[Run]:
    """Train every job that is not complete (resuming partial runs); return the runs in job order.

    steps: the optimizer steps of one run; given, the bar counts the steps of every run (updated at each run's
    checkpoints) instead of finished runs, and one run at a time shows the training loop's own bar. Under torchrun
    the jobs run one after the other, each on every process (DDP), whatever `parallel`.
    """
    RunnerOptions.parse({"parallel": parallel})
    complete = dist.on_main(lambda: [str(j.out) for j in jobs if is_complete(j.out)])
    alone = progress and steps is not None and (parallel == 1 or len(jobs) - len(complete) <= 1)
    tasks = [train_task(j, steps=steps, progress=alone) for j in jobs]
    for t in tasks:
        t.kind = desc
    run_tasks(tasks, parallel=parallel, progress=progress, desc="", done=set(complete),
              unit="run" if steps is None else "step")
    for j in jobs:
        if not is_complete(j.out):
            raise CsnError(f"training {j.out} did not finish; run the same command again to resume it.")
    return [Run(j.out) for j in jobs]


def _run_in_workers(queue: _Queue, parallel: int, threads: int | None, bars: Progress,
                    started: Callable[[Task], None], seconds: dict[str, float]) -> None:
    """The queue's tasks in `parallel` spawned worker processes, each started when a worker is free and the queue
    gives a ready task; their wall seconds into `seconds`."""
    ctx = get_context("spawn")
    pool = ProcessPoolExecutor(parallel, mp_context=ctx, initializer=_worker_init,
                               initargs=(os.getpid(), ctx.Value("i", 0), gpu_placement(parallel, visible_gpus())))
    try:
        running: dict[Any, Task] = {}
        while queue.todo or running:
            while len(running) < parallel and (t := queue.pop(bars.done, running.values())) is not None:
                started(t)
                running[pool.submit(_run_task, t.fn, t.args, threads)] = t
            finished, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            for f in finished:
                spent = f.result()[1]
                t = running.pop(f)
                seconds[t.key] = spent
                bars.task_done(t.key)
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
