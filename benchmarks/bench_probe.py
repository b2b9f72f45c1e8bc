"""Benchmark: what `csn probe` costs on one checkpoint, as a ratio to one selectivity pass over the same images.

    python benchmarks/bench_probe.py [--quick] [--reps N] [--threads 1] [--out DIR]

The run: a small Fashion-MNIST-like synthetic run (28x28 gray images, 10 classes, 6,000 training and 10,000 test
images; --quick: 2,000 test images), the fmnist preset's model (ResNet-8, width 1: read points of 16/32/64 channels
in three stages), trained for half an epoch (the probe's solver work depends on the representations, so they should
not be those of initialization). Trained once into --out (default: a temporary folder) and reused.

Both analyses run end to end with run_analysis on the last checkpoint, BatchNorm re-estimation off (the same work
for both, not what is compared), the table deleted before every repetition:
- selectivity: `Selectivity()` over the whole test split (one streaming pass: CSI, eta^2, class means);
- probe: `Probe()` with its defaults (2,000 training images, lambda 1e-3): one pass over the training subset, one
  over the whole test split, three float64 Newton-CG fits.
Beside it, the fits alone (probe_stage on activations collected once) and their iterations.

Method: as bench_selectivity.py: same process, torch.set_num_threads(--threads), one warm-up of each, then --reps
repetitions run interleaved (order rotating); reported: the median per-repetition ratio of wall-clock time and of
process CPU time (with --threads 1 the CPU ratio does not depend on other processes on the machine), and the median
seconds of each.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from csn.analysis.base import analysis_model, eval_loader, run_analysis
from csn.analysis.probe import PROBE_SEED, TRAIN_SAMPLES, Probe, StageData, collect_units, probe_stage, stage_groups
from csn.analysis.selectivity import Selectivity
from csn.data.loaders import split_loader, subset
from csn.runs.config import TrainConfig
from csn.runs.run import Run
from csn.training.loop import train


def bench_run(out: Path, num_test: int) -> Run:
    """The synthetic fmnist-like run (trained once, reused when out/run.json exists)."""
    path = out / f"probe-bench-{num_test}"
    if not (path / "run.json").is_file():
        cfg = TrainConfig.from_dict(dict(
            name="probe-bench", dataset="synthetic",
            synthetic=dict(num_train=6000, num_test=num_test, num_classes=10, channels=1, size=28),
            model="resnet8", width=1.0, epochs=0.5, batch_size=128, lr=0.05, checkpoints="step=0,end",
            eval_batch_size=1000, log_every=10, channels_last=False, seed=0))
        train(cfg, path, progress=False)
    return Run(path)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def fits_alone(run: Run) -> list[dict]:
    """Activations collected once at the last checkpoint; each stage's probe fit and scored, timed."""
    data, ckpt, cfg = run.dataset(), run.checkpoints[-1], run.config
    model = analysis_model(run, ckpt, data, bn_recalibrate=0, shared=False).model
    groups = stage_groups(model, [n for names in model.csn_stages.values() for n in names])
    layers = [n for names in groups.values() for n in names]
    tr_loader = split_loader(subset(data.train, TRAIN_SAMPLES, PROBE_SEED), cfg.eval_batch_size, "cpu")
    train_acts, ytr = collect_units(model, tr_loader, layers)
    test_acts, yte = collect_units(model, eval_loader(run, data, "test"), layers)
    out = []
    for stage, names in groups.items():
        sd = StageData(torch.cat([train_acts[n] for n in names], 1), ytr, torch.cat([test_acts[n] for n in names], 1), yte)
        t0 = time.perf_counter()
        r = probe_stage(sd, 10, 1e-3)
        out.append({"stage": stage, "seconds": time.perf_counter() - t0, **r})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 test images instead of 10,000")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the trained run (default: a temporary one)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = None if a.out else tempfile.TemporaryDirectory()
    out = Path(a.out or tmp.name)
    num_test = 2000 if a.quick else 10_000
    t0 = time.perf_counter()
    run = bench_run(out, num_test)
    print(f"run {run.path} ready in {time.perf_counter() - t0:.1f} s", flush=True)

    def go(analysis, name: str):
        def fn() -> None:
            run.table_path(f"{name}-bench").unlink(missing_ok=True)
            run_analysis(run, analysis, checkpoints="last", bn_recalibrate=0, tag="bench", progress=False,
                         device="cpu", log=lambda s: None)
        return fn

    fns = {"selectivity": go(Selectivity(), "selectivity"), "probe": go(Probe(), "probe")}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(a.reps):
        for n in names[r % 2:] + names[:r % 2]:
            times[n].append(timed(fns[n]))
    wall = [p[0] / s[0] for p, s in zip(times["probe"], times["selectivity"])]
    cpu = [p[1] / s[1] for p, s in zip(times["probe"], times["selectivity"])]
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    print(f"machine: {cpu_model()}, {a.threads} thread(s), torch {torch.__version__}, Python {sys.version.split()[0]}, "
          f"{datetime.date.today().isoformat()}")
    print(f"one checkpoint, {num_test:,} test images, probe fit on {TRAIN_SAMPLES:,} training images")
    print(f"probe / selectivity pass = {statistics.median(wall):.2f} (wall, median of {a.reps}, range "
          f"{min(wall):.2f}..{max(wall):.2f}); CPU time {statistics.median(cpu):.2f} (range {min(cpu):.2f}..{max(cpu):.2f})")
    print(f"    probe {med['probe']:.2f} s, selectivity {med['selectivity']:.2f} s (median wall)")
    for r in fits_alone(run):
        print(f"    fit alone {r['stage']}: {r['n_features']} features, {r['iterations']} iterations, "
              f"{r['seconds']:.2f} s, converged {r['converged']} (grad {r['grad_norm']:.1e}), test acc {r['acc']:.3f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
