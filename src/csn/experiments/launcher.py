"""Where an experiment's training runs train: here (`--launcher local`, csn.experiments.runner's worker processes) or
on a Slurm cluster (`--launcher slurm`, one job per run through submitit; `pip install 'csn[slurm]'`).

On Slurm each run is one job that calls `train(cfg, out, resume=True)`: a job that is preempted or reaches its time
limit is requeued by submitit (SIGUSR2, `scontrol requeue`) and the run continues from its last checkpoint. A run of
several GPUs or nodes is one job whose tasks (one per GPU) form the torch process group: each task exports Slurm's
ranks and the first node's address as RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
(submitit.helpers.TorchDistributedEnvironment) before csn joins the group (csn.dist.init_from_env), as under torchrun.
The submitted job ids are kept in OUT/.slurm/jobs.json (logs: OUT/.slurm/<job id>/), so the same command run again
skips finished runs, waits for the jobs still pending or running instead of submitting them twice, and resubmits
only runs whose job ended without finishing them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from csn import dist
from csn.core.progress import bar
from csn.core.schema import Int, Schema
from csn.errors import CsnError
from csn.experiments.runner import Job, is_complete, last_step, run_jobs
from csn.runs.config import TrainConfig
from csn.runs.io import write_json
from csn.runs.run import Run
from csn.training.loop import train

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
                                                "(--parallel); slurm: one Slurm job per training run, submitted "
                                                f"through submitit ({INSTALL}).")
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
    """Raised by train_jobs under --no-wait when runs are left training on Slurm: what follows the training cannot
    run yet. text() says which jobs and how to collect them; the command prints it and exits 0."""

    def __init__(self, job_ids: list[str], new: int, folder: Path) -> None:
        super().__init__(job_ids, new, folder)
        self.job_ids, self.new, self.folder = job_ids, new, folder

    def text(self, again: str = "run the same command again") -> str:
        return (f"{len(self.job_ids)} training run(s) on Slurm ({self.new} submitted now: jobs "
                f"{', '.join(self.job_ids)}; logs in {self.folder}); {again} to wait for them and go on.")

    def __str__(self) -> str:
        return self.text()


class TrainRun(Checkpointable):
    """One Slurm job: train (or resume) a run. Checkpointable: at preemption or time-out submitit pickles this object
    again and requeues the job, which then resumes the run from its last checkpoint (train(..., resume=True))."""

    def __init__(self, cfg: dict, out: str, distributed: bool = False) -> None:
        self.cfg, self.out, self.distributed = cfg, out, distributed

    def __call__(self) -> str:
        if self.distributed:  # one task per GPU: Slurm's ranks become torch's (RANK, WORLD_SIZE, MASTER_ADDR, ...)
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
            dist.init_from_env()
        train(TrainConfig.from_dict(self.cfg), self.out, resume=True, progress=False)
        return self.out


def need_submitit() -> None:
    """Refuse --launcher slurm without submitit, and under torchrun (the jobs bring their own processes)."""
    if submitit is None:
        raise CsnError(f"--launcher slurm needs submitit, which is not installed; run `{INSTALL}`.")
    if dist.is_dist() or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # under torchrun, joined or not yet
        raise CsnError("--launcher slurm submits jobs that start their own processes; run the command without "
                       "torchrun.")


def train_jobs(jobs: list[Job], launcher: LauncherOptions | None = None, *, parallel: int = 1, progress: bool = True,
               desc: str = "training", steps: int | None = None) -> list[Run]:
    """Train every job that is not complete, here (runner.run_jobs, `parallel` at a time) or on Slurm (one job per
    run, in the folder `.slurm` beside the runs); return the runs in job order. Under --no-wait, with runs left on
    Slurm: Submitted."""
    if launcher is None or launcher.launcher == "local":
        return run_jobs(jobs, parallel=parallel, progress=progress, desc=desc, steps=steps)
    need_submitit()
    slurm = _Slurm(launcher, slurm_folder(jobs))
    todo = [j for j in jobs if not is_complete(j.out)]
    if todo:
        slurm.run(todo, _SlurmBar(todo, steps, desc, progress))
    for j in jobs:
        if not is_complete(j.out):
            raise CsnError(f"training {j.out} did not finish; run the same command again to resume it.")
    return [Run(j.out) for j in jobs]


def slurm_folder(jobs: list[Job]) -> Path:
    """OUT/.slurm: beside the runs (in the folder that holds them all)."""
    return Path(os.path.commonpath([str(j.out.parent.absolute()) for j in jobs])) / ".slurm"


class _SlurmBar:
    """The waiting command's bar: the runs' checkpointed steps (or finished runs), and the jobs' states."""

    def __init__(self, jobs: list[Job], steps: int | None, desc: str, progress: bool) -> None:
        self.jobs, self.steps, self.desc = jobs, steps, desc
        total = len(jobs) * steps if steps else len(jobs)
        self.pbar = bar(total=total, desc=desc, unit="step" if steps else "run", progress=progress,
                        dynamic_ncols=True)

    def update(self, states: dict[str, str]) -> None:
        if self.steps:
            n = sum(min(self.steps, self.steps if is_complete(j.out) else last_step(j.out)) for j in self.jobs)
        else:
            n = sum(is_complete(j.out) for j in self.jobs)
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s.lower()] = counts.get(s.lower(), 0) + 1
        shown = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self.pbar.set_description(f"{self.desc} (slurm: {shown})" if shown else self.desc, refresh=False)
        self.pbar.update(max(0, n - self.pbar.n))

    def close(self) -> None:
        self.pbar.close()


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

    def key(self, j: Job) -> str:
        return os.path.relpath(j.out.absolute(), self.folder.parent)

    def states(self, jobs: dict[str, Any]) -> dict[str, str]:
        """Slurm's state of each job (one sacct call for them all), e.g. RUNNING, COMPLETED, CANCELLED."""
        watcher = submitit.SlurmJob.watcher
        for job in jobs.values():
            watcher.register_job(job.job_id)
        watcher.update()
        return {k: (watcher.get_state(job.job_id, mode="cache") or "UNKNOWN").split()[0].upper()
                for k, job in jobs.items()}

    def attach_or_submit(self, jobs: list[Job], submitted: list[Any]) -> dict[str, Any]:
        """Per run: the recorded job while it will still train, else a new job (appended to `submitted` and
        recorded at once, so a Ctrl-C between two submissions loses none)."""
        submitit.SlurmJob.watcher.clear()  # states cached by an earlier command of this process are stale
        record, found = self.read_record(), {}
        old = {k: submitit.SlurmJob(folder=self.folder / "%j", job_id=v) for k, v in record.items()
               if k in {self.key(j) for j in jobs}}
        active = {k for k, s in self.states(old).items() if s in ACTIVE} if old else set()
        executor = None
        for j in jobs:
            k = self.key(j)
            if k in active:
                found[k] = old[k]
                continue
            if executor is None:
                executor = submitit.AutoExecutor(folder=self.folder / "%j", cluster="slurm",
                                                 slurm_max_num_timeout=REQUEUES)
            executor.update_parameters(**self.launcher.parameters(f"csn-{j.out.name}"))
            found[k] = executor.submit(TrainRun(j.cfg.to_dict(), str(j.out.absolute()), self.launcher.distributed))
            submitted.append(found[k])
            record[k] = found[k].job_id
            write_json(self.record, record)
        return found

    def run(self, jobs: list[Job], pbar: _SlurmBar) -> None:
        """Submit (or find) a job per run and, unless --no-wait, wait for them all; Ctrl-C (or any error here)
        cancels the jobs this call submitted. A job that ended without finishing its run: one CsnError, after the
        others have ended."""
        submitted: list[Any] = []
        try:
            with _cancel_on_error(submitted):
                found = self.attach_or_submit(jobs, submitted)
                if self.launcher.no_wait:
                    raise Submitted([j.job_id for j in found.values()], len(submitted), self.folder)
                self.wait(jobs, found, pbar)
        finally:
            pbar.close()

    def wait(self, jobs: list[Job], found: dict[str, Any], pbar: _SlurmBar) -> None:
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
                out = self.folder.parent / k
                if not is_complete(out):
                    failed.append(f"job {job.job_id} ({states[k].lower()}) ended without finishing {out}; its log: "
                                  f"{job.paths.stderr}")
            pbar.update({k: s for k, s in states.items() if k in left})
            if left:
                time.sleep(POLL_S)
        if failed:
            raise CsnError(f"{len(failed)} Slurm job(s) failed, first {failed[0]}; fix the cause and run the same "
                           "command again to resume.")


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


__all__ = ["LauncherOptions", "Submitted", "TrainRun", "train_jobs", "need_submitit", "slurm_folder", "INSTALL"]
