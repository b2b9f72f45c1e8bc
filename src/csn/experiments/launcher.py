"""Where an experiment's work runs: here (`--launcher local`, csn.experiments.runner's worker processes) or on a
Slurm cluster (`--launcher slurm`, one job per training run and, for `csn reproduce`, one per analysis task, through
submitit; `pip install 'csn[slurm]'`).

On Slurm every task of the experiment's graph (runner.Task) is one job, all submitted at once: a job starts when
the jobs of the tasks it waits on have completed (Slurm's afterok dependency; a job whose dependency failed is
cancelled), so `--no-wait` can leave a whole study to the cluster. A job that is preempted or reaches its time limit
is requeued by submitit (SIGUSR2, `scontrol requeue`): a training run continues from its last checkpoint
(`train(..., resume=True)`), an analysis from the last table it wrote. A run of several GPUs or nodes is one job
whose tasks (one per GPU) form the torch process group: each task exports Slurm's ranks and the first node's address
as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (submitit.helpers.TorchDistributedEnvironment) before
csn joins the group (csn.dist.init_from_env), as under torchrun. The submitted job ids are kept in
OUT/.slurm/jobs.json (logs: OUT/.slurm/<job id>/), so the same command run again skips finished runs, waits for the
jobs still pending or running instead of submitting them twice, and submits again the runs whose job ended without
finishing them and the analyses not running (an analysis resumes: the tables it wrote are kept).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from csn import dist
from csn.core.schema import Int, Schema
from csn.errors import CsnError
from csn.experiments.runner import Job, Progress, Task, in_order, is_complete, run_jobs, run_tasks, train_task
from csn.runs.io import write_json
from csn.runs.run import Run

try:  # optional: `pip install 'csn[slurm]'`
    import submitit
    from submitit.helpers import Checkpointable, TorchDistributedEnvironment
except ImportError:  # --launcher slurm then says how to install it (need_submitit)
    submitit = None
    Checkpointable = object  # type: ignore[misc,assignment]
    TorchDistributedEnvironment = None  # type: ignore[misc,assignment]

INSTALL = "pip install 'csn[slurm]'"
SLURM_ONLY = ("slurm_partition", "slurm_time", "gpus_per_run", "nodes_per_run", "slurm_account", "slurm_extra",
              "no_wait")
REQUEUES = 20
"""How many times a job that reaches --slurm-time is requeued (each time resuming from the last checkpoint) before
it fails; preemptions do not count."""
POLL_S = 5.0
"""How often the waiting command reads the runs' checkpoints and asks Slurm (sacct) about its jobs."""
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED", "READY"}
"""Slurm job states of a job that will still train (a recorded job in one of them is waited for, not resubmitted)."""
UNKNOWN_S = 120.0
"""How long a job sacct does not know (yet: just submitted) is still waited for."""


class LauncherOptions(Schema):
    """Where an experiment's training runs train: the --launcher group of every command that trains several runs
    (`csn experiment windows|regularize|regime`, `csn reproduce`), declared here once."""

    launcher: Literal["local", "slurm"] = Field("local", description="local: worker processes on this machine "
                                                "(--parallel); slurm: one Slurm job per training run (csn reproduce: "
                                                "and per analysis task), submitted through submitit "
                                                f"({INSTALL}).")
    slurm_partition: str | None = Field(None, description="Slurm partition of the jobs [default: the cluster's].",
                                        json_schema_extra={"metavar": "NAME"})
    slurm_time: Int = Field(1440, ge=1, description="Time limit of each job in minutes; a run that needs longer is "
                            "requeued and resumes from its last checkpoint.", json_schema_extra={"metavar": "MINUTES"})
    gpus_per_run: Int = Field(0, ge=0, description="GPUs of each run, spread evenly over --nodes-per-run; one Slurm "
                              "task per GPU, together one DDP process group (0: a CPU job of one task).",
                              json_schema_extra={"metavar": "N"})
    nodes_per_run: Int = Field(1, ge=1, description="Nodes of each run.", json_schema_extra={"metavar": "N"})
    slurm_account: str | None = Field(None, description="Slurm account the jobs are charged to.",
                                      json_schema_extra={"metavar": "NAME"})
    slurm_extra: tuple[str, ...] = Field((), description="Any other sbatch option, KEY=VALUE, e.g. --slurm-extra "
                                         "qos=high --slurm-extra cpus-per-task=10 (repeatable).",
                                         json_schema_extra={"metavar": "KEY=VALUE", "multiple": True})
    no_wait: bool = Field(False, description="Submit the jobs and return; the same command run again later waits "
                          "for them (never submitting a run twice) and goes on with what follows the training.")

    @field_validator("slurm_extra")
    @classmethod
    def _pairs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for pair in v:
            key, eq, _ = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError("each value is KEY=VALUE (an sbatch option without its dashes, e.g. qos=high)")
        return v

    @model_validator(mode="after")
    def _slurm_options(self) -> LauncherOptions:
        given = [f for f in SLURM_ONLY if f in self.model_fields_set and getattr(self, f) != type(self).model_fields[f].default]
        if self.launcher == "local" and given:
            raise ValueError(f"--{given[0].replace('_', '-')} is an option of --launcher slurm; add --launcher "
                             "slurm or leave it out")
        if self.gpus_per_run % self.nodes_per_run:
            raise ValueError(f"--gpus-per-run {self.gpus_per_run} does not divide evenly over --nodes-per-run "
                             f"{self.nodes_per_run}; give a multiple of the nodes")
        return self

    @property
    def tasks_per_node(self) -> int:
        """Slurm tasks (processes) per node: one per GPU, or one on a CPU job."""
        return max(1, self.gpus_per_run // self.nodes_per_run)

    @property
    def distributed(self) -> bool:
        return self.tasks_per_node * self.nodes_per_run > 1

    def parameters(self, name: str) -> dict[str, Any]:
        """The submitit AutoExecutor parameters of one job."""
        p: dict[str, Any] = {"name": name, "timeout_min": self.slurm_time, "nodes": self.nodes_per_run,
                             "tasks_per_node": self.tasks_per_node}
        if self.gpus_per_run:
            p["gpus_per_node"] = self.gpus_per_run // self.nodes_per_run
        if self.slurm_partition:
            p["slurm_partition"] = self.slurm_partition
        if self.slurm_account:
            p["slurm_account"] = self.slurm_account
        if self.slurm_extra:
            p["slurm_additional_parameters"] = dict(pair.split("=", 1) for pair in self.slurm_extra)
        return p


class Submitted(Exception):  # noqa: N818 (not an error: the command's outcome under --no-wait)
    """Raised under --no-wait once every job is submitted: what follows the jobs (tables, claims, the report) cannot
    run yet. text() says which jobs and how to collect them; the command prints it and exits 0."""

    def __init__(self, job_ids: list[str], new: int, folder: Path, analyses: int = 0) -> None:
        super().__init__(job_ids, new, folder, analyses)
        self.job_ids, self.new, self.folder, self.analyses = job_ids, new, folder, analyses

    def text(self, again: str = "run the same command again") -> str:
        runs = len(self.job_ids) - self.analyses
        what = f"{runs} training run(s)" + (f" and {self.analyses} analysis job(s)" if self.analyses else "")
        return (f"{what} on Slurm ({self.new} submitted now: jobs {', '.join(self.job_ids)}; logs in {self.folder}); "
                f"{again} to wait for them and go on.")

    def __str__(self) -> str:
        return self.text()


class SlurmTask(Checkpointable):
    """One Slurm job: one task of csn.experiments.runner (fn(*args): train or resume a run, or one of a study's
    analyses of its runs). Checkpointable: at preemption or time-out submitit pickles this object again and requeues
    the job, which then starts the task again: a training run resumes from its last checkpoint, an analysis from
    the last table it wrote. A job of several tasks (one per GPU) joins them in one torch process group first."""

    def __init__(self, fn: Callable[..., Any], args: tuple = (), distributed: bool = False) -> None:
        self.fn, self.args, self.distributed = fn, args, distributed

    def __call__(self) -> Any:
        if self.distributed:  # one task per GPU: Slurm's ranks become torch's (RANK, WORLD_SIZE, MASTER_ADDR, ...)
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            dist.init_from_env()
        return self.fn(*self.args)


def on_slurm(launcher: LauncherOptions | None) -> bool:
    """Whether work goes to Slurm (None: the local runner)."""
    return launcher is not None and launcher.launcher == "slurm"


def at_a_time(launcher: LauncherOptions | None, parallel: int) -> str:
    """How a plan says where its work runs: 'N at a time' (here), or one Slurm job per task."""
    if not on_slurm(launcher):
        return f"{parallel} at a time"
    return "one Slurm job each"


def estimate_note(launcher: LauncherOptions | None, parallel: int) -> str:
    """What a plan's time estimate assumes: `parallel` at a time here; under Slurm the wall time is the queue's."""
    if not on_slurm(launcher):
        return f"{parallel} at a time"
    return f"if run here {parallel} at a time; on Slurm the wall time is as the cluster schedules the jobs"


def need_submitit() -> None:
    """Refuse --launcher slurm without submitit, and under torchrun (the jobs bring their own processes)."""
    if submitit is None:
        raise CsnError(f"--launcher slurm needs submitit, which is not installed; run `{INSTALL}`.")
    if dist.is_dist() or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # under torchrun, joined or not yet
        raise CsnError("--launcher slurm submits jobs that start their own processes; run the command without "
                       "torchrun.")


def launch(tasks: list[Task], launcher: LauncherOptions | None = None, *, parallel: int = 1, progress: bool = True,
           desc: str = "", done: set[str] | None = None, unit: str | None = "task",
           announce: bool = False) -> dict[str, float]:
    """Run a graph of tasks (those not in `done`; csn.experiments.runner.Task) where the launcher says: here
    (runner.run_tasks, `parallel` at a time; returns each task's wall seconds) or on Slurm, one job per task, all
    submitted at once, each with a Slurm dependency (afterok) on the jobs of the tasks it comes `after` and of the
    task before it that writes in the same run folder (so two never write there at once); a job whose dependency
    failed is cancelled (kill-on-invalid-dep). The command then waits for every job, its bar advancing with the
    runs' checkpoints, unless --no-wait (Submitted). Returns {} on Slurm (no task ran here)."""
    if not on_slurm(launcher):
        return run_tasks(tasks, parallel=parallel, progress=progress, desc=desc, done=done, unit=unit,
                         announce=announce)
    need_submitit()
    done = set(done or ()) & {t.key for t in tasks}
    slurm = _Slurm(launcher, slurm_folder([Path(f) for t in tasks if (f := t.writes or t.run) is not None]))
    todo = in_order(tasks, done)
    if todo:
        slurm.run(todo, Progress(tasks, done, desc, progress and dist.is_main(), unit))
    return {}


def train_jobs(jobs: list[Job], launcher: LauncherOptions | None = None, *, parallel: int = 1, progress: bool = True,
               desc: str = "training", steps: int | None = None) -> list[Run]:
    """Train every job that is not complete, here (runner.run_jobs, `parallel` at a time) or on Slurm (one job per
    run, in the folder `.slurm` beside the runs: launch); return the runs in job order. Under --no-wait, with runs
    left on Slurm: Submitted."""
    if not on_slurm(launcher):
        return run_jobs(jobs, parallel=parallel, progress=progress, desc=desc, steps=steps)
    tasks = [train_task(j, steps=steps) for j in jobs]
    for t in tasks:
        t.kind = desc
    launch(tasks, launcher, progress=progress, done={t.key for t, j in zip(tasks, jobs) if is_complete(j.out)},
           unit="run" if steps is None else "step")
    for j in jobs:
        if not is_complete(j.out):
            raise CsnError(f"training {j.out} did not finish; run the same command again to resume it.")
    return [Run(j.out) for j in jobs]


def slurm_folder(folders: list[Path]) -> Path:
    """OUT/.slurm: beside the run folders the tasks write in (in the folder that holds them all)."""
    if not folders:
        raise ValueError("a task graph for Slurm needs at least one task that names the run folder it writes in")
    return Path(os.path.commonpath([str(Path(f).parent.absolute()) for f in folders])) / ".slurm"


@dataclass
class _Slurm:
    """Submission, the record of submitted jobs (jobs.json) and the wait, for one experiment's folder."""

    launcher: LauncherOptions
    folder: Path

    @property
    def record(self) -> Path:
        return self.folder / "jobs.json"

    def read_record(self) -> dict[str, str]:
        try:
            data = json.loads(self.record.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def key(self, t: Task) -> str:
        """A task's name in jobs.json: its run folder (relative to the experiment's) for a training run, else
        'task:' and its key."""
        return os.path.relpath(t.run.absolute(), self.folder.parent) if t.run is not None else f"task:{t.key}"

    def states(self, jobs: dict[str, Any]) -> dict[str, str]:
        """Slurm's state of each job (one sacct call for them all), e.g. RUNNING, COMPLETED, CANCELLED."""
        watcher = submitit.SlurmJob.watcher
        for job in jobs.values():
            watcher.register_job(job.job_id)
        watcher.update()
        return {k: (watcher.get_state(job.job_id, mode="cache") or "UNKNOWN").split()[0].upper()
                for k, job in jobs.items()}

    def parameters(self, t: Task, after: list[Any]) -> dict[str, Any]:
        """The job's submitit parameters: the launcher's, named after the run or task, and its dependencies."""
        p = self.launcher.parameters(f"csn-{t.run.name if t.run is not None else t.key}")
        extra = dict(p.get("slurm_additional_parameters", {}))
        if after:
            extra.update({"dependency": "afterok:" + ":".join(j.job_id for j in after), "kill-on-invalid-dep": "yes"})
        p["slurm_additional_parameters"] = extra  # always given: the executor keeps the previous job's otherwise
        return p

    def attach_or_submit(self, tasks: list[Task], submitted: list[Any]) -> dict[str, Any]:
        """Per task (in dependency order): the recorded job while it will still run, else a new job (appended to
        `submitted` and recorded at once, so a Ctrl-C between two submissions loses none)."""
        submitit.SlurmJob.watcher.clear()  # states cached by an earlier command of this process are stale
        record, found, writer = self.read_record(), {}, {}
        old = {k: submitit.SlurmJob(folder=self.folder / "%j", job_id=v) for k, v in record.items()
               if k in {self.key(t) for t in tasks}}
        active = {k for k, s in self.states(old).items() if s in ACTIVE} if old else set()
        executor = None
        for t in tasks:
            k = self.key(t)
            after = [found[a] for a in t.after if a in found]
            if t.writes in writer and all(writer[t.writes] is not j for j in after):
                after.append(writer[t.writes])
            if k in active:
                found[t.key] = old[k]
            else:
                if executor is None:
                    executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm",
                                                      slurm_max_num_timeout=REQUEUES)
                executor.update_parameters(**self.parameters(t, after))
                found[t.key] = executor.submit(SlurmTask(t.fn, t.args, self.launcher.distributed))
                submitted.append(found[t.key])
                record[k] = found[t.key].job_id
                write_json(self.record, record)
            if t.writes is not None:
                writer[t.writes] = found[t.key]
        return found

    def run(self, tasks: list[Task], bars: Progress) -> None:
        """Submit (or find) a job per task and, unless --no-wait, wait for them all; Ctrl-C (or any error here)
        cancels the jobs this call submitted. A job that ended without finishing its task: one CsnError, after the
        others have ended."""
        submitted: list[Any] = []
        try:
            with _cancel_on_error(submitted):
                found = self.attach_or_submit(tasks, submitted)
                if self.launcher.no_wait:
                    raise Submitted([j.job_id for j in found.values()], len(submitted), self.folder,
                                    analyses=sum(t.run is None for t in tasks))
                failed = self.wait(tasks, found, bars)
        finally:
            bars.close()
        if failed:  # every job has ended: nothing to cancel
            raise CsnError(f"{len(failed)} Slurm job(s) failed, first {failed[0]}; fix the cause and run the same "
                           "command again to resume.")

    def wait(self, tasks: list[Task], found: dict[str, Any], bars: Progress) -> list[str]:
        """Wait until every job has ended; return what each job that did not finish its task left (a job that
        failed before the jobs cancelled because they waited on it)."""
        by_key = {t.key: t for t in tasks}
        left, failed, seen = dict(found), [], {k: time.monotonic() for k in found}
        while left:
            states = self.states(left)
            for k, job in list(left.items()):
                if states[k] != "UNKNOWN":
                    seen[k] = time.monotonic()
                waiting = states[k] in ACTIVE or (states[k] == "UNKNOWN" and time.monotonic() - seen[k] < UNKNOWN_S)
                if waiting and not job.paths.result_pickle.exists():
                    continue
                del left[k]
                t = by_key[k]
                if _finished(t, job):
                    bars.task_done(k)
                else:
                    what = str(t.run) if t.run is not None else (t.label or t.key)
                    state = "failed" if job.paths.result_pickle.exists() else states[k].lower()  # it raised
                    failed.append((state == "cancelled", f"job {job.job_id} ({state}) ended without finishing "
                                   f"{what}; its log: {job.paths.stderr}"))
            counts: dict[str, int] = {}
            for s in (states[k] for k in left):
                counts[s.lower()] = counts.get(s.lower(), 0) + 1
            bars.set_note(("slurm: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))) if counts else "")
            bars.poll()
            if left:
                time.sleep(POLL_S)
        return [text for _, text in sorted(failed, key=lambda f: f[0])]


def _finished(t: Task, job: Any) -> bool:
    """Whether a task's job finished it: a training run holds its final checkpoint; any other task's job returned
    (submitit's result file holds a result, not an error)."""
    if t.run is not None:
        return is_complete(t.run)
    try:
        job.result()
    except Exception:  # submitit's FailedJobError / UncompletedJobError: the task raised, or the job was killed
        return False
    return True


@contextmanager
def _cancel_on_error(submitted: list[Any]) -> Iterator[None]:
    """Cancel the jobs in `submitted` (those this command submitted) when the block is left by Ctrl-C or an error;
    --no-wait's Submitted leaves them running."""
    try:
        yield
    except Submitted:
        raise
    except BaseException:
        for job in submitted:
            job.cancel(check=False)
        raise


__all__ = ["LauncherOptions", "Submitted", "SlurmTask", "launch", "on_slurm", "at_a_time", "estimate_note", "train_jobs", "need_submitit", "slurm_folder", "INSTALL"]
