"""Run many training jobs (conditions x seeds), skipping finished runs and resuming partial ones,
optionally several at once in worker processes (small models use 2 cores better as 2 single-thread jobs)."""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from csn import dist
from csn.core.progress import bar
from csn.errors import CsnError
from csn.runs.config import TrainConfig
from csn.runs.run import Run, read_manifest
from csn.training.loop import train


@dataclass
class Job:
    """One training run to make: a config and its run directory."""

    cfg: TrainConfig
    out: Path


def is_complete(out: str | Path) -> bool:
    """True when the run directory holds its final checkpoint."""
    out = Path(out)
    try:
        info = json.loads((out / "run.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    ckpts = read_manifest(out / "checkpoints")
    return bool(ckpts) and ckpts[-1].step == info.get("total_steps")


def _run_job(cfg_dict: dict, out: str, threads: int | None) -> str:
    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig.from_dict(cfg_dict)
    resume = (Path(out) / "run.json").is_file()
    train(cfg, out, resume=resume, progress=False)
    return out


def run_jobs(jobs: list[Job], *, parallel: int = 1, progress: bool = True, desc: str = "training") -> list[Run]:
    """Train every job that is not complete (resuming partial runs); return the runs in job order.

    Under torchrun the jobs run one after the other, each on every process (DDP), whatever `parallel`.
    """
    todo = dist.on_main(lambda: [i for i, j in enumerate(jobs) if not is_complete(j.out)])
    todo = [jobs[i] for i in todo]
    cores = os.cpu_count() or 1
    parallel = 1 if dist.is_dist() else max(1, min(parallel, len(todo) or 1))
    threads = None if dist.is_dist() else max(1, cores // parallel)  # torchrun sets OMP_NUM_THREADS
    pbar = bar(total=len(jobs), initial=len(jobs) - len(todo), desc=desc, unit="run",
               progress=progress and dist.is_main())
    try:
        if parallel == 1:
            for j in todo:
                _run_job(j.cfg.to_dict(), str(j.out), threads)
                pbar.update(1)
        else:
            with ProcessPoolExecutor(parallel, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_run_job, j.cfg.to_dict(), str(j.out), threads) for j in todo]
                for f in as_completed(futures):
                    f.result()
                    pbar.update(1)
    finally:
        pbar.close()
    for j in jobs:
        if not is_complete(j.out):
            raise CsnError(f"training {j.out} did not finish; run the same command again to resume it.")
    return [Run(j.out) for j in jobs]
