"""Benchmark: what each analysis step of `csn reproduce` costs against the training it follows, before and after
the cuts of issue 22 item 5 (analyses only where a verdict or the report reads them).

    python benchmarks/bench_reproduce_analyses.py [--root DIR] [--study fmnist] [--protocol before,after] \\
        [--set study.selectivity.samples=2000]

One seed of the study: baseline-s0 and -s1 are trained once as reproduce trains them (2 worker processes, one thread
each; reused when complete under ROOT/runs), and baseline-s0 is copied as the two regularized runs of its seed (the analyses' cost
does not depend on the weights; the regularizer's own training overhead, <= 10 % in bench_regularizer, is left out,
so the ratios below are slightly high). For each protocol the runs are copied (checkpoints only) into a fresh folder
and every step of `Reproduction.steps()` but training is timed as `csn reproduce` runs it (same process, torch's
default threads). Protocols:

  before  the analyses as `csn reproduce` ran them before: selectivity of every run at every checkpoint, ablation at
          step=16, step=64 and the end, linearity at every checkpoint (the linear classifier fit per run), CKA at
          every checkpoint;
  after   the study as shipped (--set overrides apply to it): see `csn reproduce --dry-run`.

--subset N then measures the baseline run's selectivity on a seeded subset of N test images and reports how far
the C1 quantities of each stage (rise, recession, final - init of the mean CSI) move against the whole split.

The study's training wall time per seed is 3 runs x the measured run time / `parallel` runs at a time; the ratio
analysis / training per seed is the study's (the shared linear fit is then amortized over the seeds: the projected
ratio at the study's seeds is printed too).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import torch

from csn.analysis.base import run_analysis
from csn.analysis.linearity import LINEAR_FIT_DEFAULTS, fit_linear_classifier
from csn.analysis.selectivity import Selectivity
from csn.experiments.claims import THRESHOLDS
from csn.experiments.reproduce import Reproduction
from csn.experiments.runner import run_jobs
from csn.experiments.study import load_study
from csn.runs.config import load_data
from csn.runs.run import Run

BEFORE = ['study.ablation_checkpoints=["step=16","step=64","end"]', 'study.linearity_checkpoints=["0:end"]',
          'study.selectivity_checkpoints=["0:end"]', 'study.reg_selectivity_checkpoints=["0:end"]',
          'study.cka_checkpoints=["0:end"]']
"""The analyses of `csn reproduce` before the cuts, as study overrides (same samples and options otherwise)."""


def trained(root: Path, study: str, sets: list[str]) -> tuple[Path, float, float | None]:
    """ROOT/runs/baseline-s0 of the study, one run's training wall seconds and CPU seconds: baseline-s0 and -s1 are
    trained as `csn reproduce` trains them (2 worker processes, one thread each) unless complete; the mean of their
    wall times (training.parquet) and of their CPU times (the workers' rusage, kept in ROOT/runs/train_cpu.json for
    later calls that reuse the runs)."""
    _, cfg = load_study(study, sets=sets)
    rep = Reproduction(cfg, root / "runs", seeds=2, progress=False)
    jobs = rep.baseline_jobs()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    todo = [j for j in jobs if not (j.out / "run.json").is_file() or Run(j.out).checkpoints[-1].step != rep.total]
    run_jobs(jobs, parallel=cfg.study.parallel, progress=True, desc="training", steps=rep.total)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = root / "runs" / "train_cpu.json"
    if len(todo) == len(jobs):
        cpu = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / len(todo)
        record.write_text(json.dumps({"cpu_s_per_run": cpu}))
    cpu = json.loads(record.read_text())["cpu_s_per_run"] if record.is_file() else None
    times = [float(Run(j.out).read("training")["time_s"].iloc[-1]) for j in jobs]
    return jobs[0].out, sum(times) / len(times), cpu


def copy_runs(src: Path, rep: Reproduction) -> None:
    """The trained baseline as every run of one seed (checkpoints, run.json, training table; no analysis tables)."""
    for job in rep.baseline_jobs() + rep.reg_jobs():
        dst = job.out
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tables", "*.lock", "report"))
        (dst / "tables").mkdir()
        shutil.copy2(src / "tables" / "training.parquet", dst / "tables" / "training.parquet")


def bench(protocol: str, src: Path, root: Path, study: str, sets: list[str], train_s: float,
          train_cpu: float | None) -> dict:
    name, cfg = load_study(study, sets=sets + (BEFORE if protocol == "before" else []))
    out = root / protocol
    shutil.rmtree(out, ignore_errors=True)
    rep = Reproduction(cfg, out, name=name, seeds=1, progress=False)
    copy_runs(src, rep)
    work = {w.what: w.total for w in rep.work()}
    steps, times, cpu = rep.steps(), {}, {}
    for step in steps[1:]:  # the runs are complete: training is skipped
        t0, c0 = time.perf_counter(), time.process_time()
        step.fn()
        name = step.name.split(" (")[0]
        times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
    analyses = sum(times.values())
    training = 3 * train_s / cfg.study.parallel
    seeds = load_study(study, sets=sets)[1].study.seeds
    fit = fit_seconds(src) if work.get("linear_fit") else 0.0
    # at the study's seeds: every analysis scales with the seeds but the shared fit (after) / per-run fit (before)
    projected = (analyses - fit + fit / (seeds if protocol == "after" else 1)) / training
    out = {"protocol": protocol, "passes": work, "seconds": {k: round(v, 1) for k, v in times.items()},
           "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
           "analyses_s": round(analyses, 1), "training_s_per_seed": round(training, 1),
           "ratio_per_seed": round(analyses / training, 3), "linear_fit_s": round(fit, 1),
           f"ratio_at_{seeds}_seeds": round(projected, 3)}
    if train_cpu is not None:  # CPU time: the analyses' against the training's (3 runs x 1 thread)
        out["cpu_ratio_per_seed"] = round(sum(cpu.values()) / (3 * train_cpu), 3)
    return out


def fit_seconds(run: Path) -> float:
    """Seconds the linear classifier's fit takes (timed on its own: inside the linearity step it is cached)."""
    data = load_data(Run(run).config)
    x = data.train.normalize(data.train.images)
    x, y = x.reshape(x.shape[0], -1), data.train.labels.long()
    f = LINEAR_FIT_DEFAULTS
    t0 = time.perf_counter()
    fit_linear_classifier(x, y, data.num_classes, epochs=f["epochs"], lr=f["lr"], seed=f["seed"],
                          weight_decay=f["weight_decay"], batch_size=f["batch_size"])
    return time.perf_counter() - t0


def subset_check(run: Path, samples: int) -> dict:
    """Selectivity of `run` on a seeded subset of `samples` test images (tag s<samples>) against the whole split
    (its table from the 'after' protocol): per stage, how the C1 quantities (rise = peak - init, recession = peak -
    final, final - init; the peak where the whole split's curve peaks in the first quarter) move, and the time."""
    r = Run(run)
    t0, c0 = time.perf_counter(), time.process_time()
    run_analysis(r, Selectivity(samples=samples), tag=f"s{samples}", progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    full, sub = r.read("selectivity"), r.read(f"selectivity-s{samples}")
    total = int(r.info["total_steps"])
    out = {"samples": samples, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "stages": {}}
    for stage in dict.fromkeys(full["stage"]):
        a = full[full["stage"] == stage].groupby("step")["csi"].mean()
        b = sub[sub["stage"] == stage].groupby("step")["csi"].mean()
        early = a[(a.index > 0) & (a.index <= THRESHOLDS["early_fraction"] * total)]
        pk = int(early.idxmax())

        def c1(m):
            return {"rise": m[pk] - m.iloc[0], "recession": m[pk] - m.iloc[-1], "final_minus_init": m.iloc[-1] - m.iloc[0]}
        fa, fb = c1(a), c1(b)
        out["stages"][stage] = {"max_abs_diff_mean_csi": round(float((b - a).abs().max()), 4),
                                "mean_diff_mean_csi": round(float((b - a).mean()), 4),
                                **{f"d_{k}": round(float(fb[k] - fa[k]), 4) for k in fa}}
    return out


def machine() -> str:
    """The first 20 lines of lscpu (what RESULTS.md records)."""
    try:
        return "\n".join(subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:20])
    except OSError:
        return "(lscpu not available)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/csn-bench-reproduce"))
    ap.add_argument("--study", default="fmnist")
    ap.add_argument("--protocol", default="before,after")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="study override for both protocols")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the analyses [default: torch's, as "
                    "csn reproduce]; 1 gives CPU times that compare with the single-threaded training's on a loaded "
                    "machine (2 threads spin while the other waits for a core)")
    ap.add_argument("--subset", type=int, default=0, help="also compare selectivity on N test images with the whole "
                    "split (on the 'after' protocol's baseline run)")
    args = ap.parse_args()
    print(machine(), flush=True)
    src, train_s, train_cpu = trained(args.root, args.study, args.sets)
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = "" if train_cpu is None else f", {train_cpu:.1f} s of CPU"
    print(f"one run trained in {train_s:.1f} s{cpu} (single-threaded, 2 at a time); torch threads for the analyses: "
          f"{torch.get_num_threads()}; load average {os.getloadavg()}", flush=True)
    for protocol in [p for p in args.protocol.split(",") if p]:  # --protocol '' --subset N: the subset check alone
        print(json.dumps(bench(protocol, src, args.root, args.study, args.sets, train_s, train_cpu)), flush=True)
    if args.subset:
        print(json.dumps(subset_check(args.root / "after" / "baseline-s0", args.subset)), flush=True)
    print(f"load average {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
