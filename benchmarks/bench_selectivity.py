"""Benchmark: what a CSI pass costs over a plain evaluation pass, and what BN re-estimation adds.

    python benchmarks/bench_selectivity.py [--quick] [--reps N] [--threads 2]

1. CSI pass / plain eval pass, targets <= 1.15 (issue 3):
   - ResNet-20 (widths 16/32/64, in_channels=1) on the Fashion-MNIST test split (10,000 images,
     batches of 500);
   - ResNet-50 on synthetic 224x224 inputs (3 batches of 16, 1,000 classes).
   The CSI pass is `collect_class_stats` over all default read points (every residual block's output:
   hooks, spatial means, float64 per-class sums, sums of squares and counts - everything CSI and eta^2
   need); the plain pass is `model(x)` under no_grad in eval mode, over the same pre-built batches.
2. (BN re-estimation with DEFAULT_BN_BATCHES + CSI pass) / CSI pass, target <= 1.25 (issue 10), on the
   fmnist preset's model over the Fashion-MNIST test split, with the loaders the analysis uses
   (unaugmented, seeded training batches of the preset's batch size for BN; test batches of the
   preset's eval batch size).

Method: same process, torch.set_num_threads(--threads), untrained models (cost does not depend on the
weights), one warm-up of every variant, then --reps repetitions in which the variants run interleaved
(their order rotating). Reported: the median over repetitions of the per-repetition wall-clock
ratio (time.perf_counter; paired, so slow phases of a loaded machine largely cancel), the median
seconds of each variant, and the same ratio in process CPU time (time.process_time), which with
--threads 1 does not depend on what else runs on the machine (with more threads it includes
OpenMP spin-waiting).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from csn.analysis.selectivity import collect_class_stats
from csn.core.bn import DEFAULT_BN_BATCHES, recalibrate_bn
from csn.data import BatchLoader, load_dataset
from csn.models import create_model
from csn.runs.config import preset


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[tuple[float, float]]]:
    """Warm every variant up once, then run them `reps` times interleaved (rotating order).

    Returns per variant a list of (wall seconds, process CPU seconds) per run.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for r in range(reps):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[n]()
            times[n].append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer around a pass measures the pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(label: str, times: dict[str, list[tuple[float, float]]], num: str, den: str) -> float:
    """Print the median paired wall-clock ratio (and the CPU-time ratio, robust to other processes); return it."""
    wall = [a[0] / b[0] for a, b in zip(times[num], times[den])]
    cpu = [a[1] / b[1] for a, b in zip(times[num], times[den])]
    ratio = statistics.median(wall)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    print(f"{label} = {ratio:.2f}\n    wall: median of {len(wall)} paired repetitions, range {min(wall):.2f}..{max(wall):.2f}; "
          f"{num} {med[num]:.3f} s, {den} {med[den]:.3f} s\n"
          f"    CPU time (process_time; with 1 thread unaffected by other processes): "
          f"{statistics.median(cpu):.2f}, range {min(cpu):.2f}..{max(cpu):.2f}", flush=True)
    return ratio


def plain_pass(model: torch.nn.Module, batches) -> None:
    with torch.no_grad():
        for x, _ in batches:
            model(x)


def csi_pass(model: torch.nn.Module, batches, num_classes: int) -> None:
    collect_class_stats(model, batches, None, num_classes, progress=False)


def bench_resnet20_fmnist(reps: int, samples: int | None) -> float:
    data = load_dataset("fashion-mnist")
    split = data.test.subset(samples, seed=0) if samples else data.test
    batches = list(BatchLoader(split, 500))
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    times = interleaved({"csi": lambda: csi_pass(model, batches, 10), "plain": lambda: plain_pass(model, batches)}, reps)
    return report(f"CSI pass / plain eval pass (resnet20, fmnist test, {len(split)} images)", times, "csi", "plain")


def bench_resnet50_synthetic(reps: int, num_batches: int) -> float:
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 224, 224, generator=g), torch.randint(0, 1000, (16,), generator=g))
               for _ in range(num_batches)]
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=1000, in_channels=3).eval()
    times = interleaved({"csi": lambda: csi_pass(model, batches, 1000), "plain": lambda: plain_pass(model, batches)},
                        reps)
    return report(f"CSI pass / plain eval pass (resnet50, synthetic 224x224, {num_batches}x16 images)", times,
                  "csi", "plain")


def bench_bn_fmnist_preset(reps: int, samples: int | None) -> float:
    cfg = preset("fmnist")
    data = load_dataset("fashion-mnist")
    test = data.test.subset(samples, seed=0) if samples else data.test
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width,
                         image_size=data.image_size).eval()

    def test_loader():
        return BatchLoader(test, cfg.eval_batch_size)

    def bn_then_csi():
        bn = BatchLoader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed + 99991)
        csi_pass(recalibrate_bn(model, bn, DEFAULT_BN_BATCHES), test_loader(), data.num_classes)

    times = interleaved({"bn+csi": bn_then_csi, "csi": lambda: csi_pass(model, test_loader(), data.num_classes)},
                        reps)
    return report(f"(BN re-estimation, {DEFAULT_BN_BATCHES} batches of {cfg.batch_size} + CSI pass) / CSI pass "
                  f"({cfg.model} width {cfg.width:g}, fmnist preset, test split, {len(test)} images)",
                  times, "bn+csi", "csi")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 test images, 2 ResNet-50 batches, 3 repetitions")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per variant (default 5, quick 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--only", choices=["resnet20", "resnet50", "bn"], help="run one benchmark")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reps = args.reps or (3 if args.quick else 5)
    samples = 2000 if args.quick else None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {reps} repetitions", flush=True)
    results = {}
    if args.only in (None, "resnet20"):
        results["resnet20"] = bench_resnet20_fmnist(reps, samples)
    if args.only in (None, "resnet50"):
        results["resnet50"] = bench_resnet50_synthetic(reps, 2 if args.quick else 3)
    if args.only in (None, "bn"):
        results["bn"] = bench_bn_fmnist_preset(reps, samples)
    targets = {"resnet20": 1.15, "resnet50": 1.15, "bn": 1.25}
    for k, v in results.items():
        print(f"  {k}: {v:.2f} (target <= {targets[k]:.2f}: {'met' if v <= targets[k] else 'NOT met'})")


if __name__ == "__main__":
    main()
