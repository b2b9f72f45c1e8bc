"""Cost of a regularized training step relative to an unregularized one (same process, interleaved).

ResNet-20 on Fashion-MNIST-shaped batches of 128, and ResNet-50 on synthetic 224x224 at a small batch.
Every variant of the statistic (issue 23) is timed against the same plain steps:

- means-batch: csn's default (class means over the whole batch);
- sums-group32: class sums within groups of 32 consecutive images (a batch of 8 is one short group);
- study: reg_mode=study as `csn train` resolves it (sums, groups of 32, eps 1e-6);
- reduce-sum: csn's statistic with R the sum over stages instead of the mean.

Prints wall-clock and CPU-time ratios (target <= 1.10); medians over interleaved repetitions.

    python benchmarks/bench_regularizer.py [--threads 1] [--reps 7] [--variants means-batch,study] [--models resnet20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csn.models import create_model
from csn.runs.config import TrainConfig
from csn.training.regularizer import SelectivityRegularizer

VARIANTS = {
    "means-batch": {},
    "sums-group32": dict(statistic="sums", group=32),
    "study": TrainConfig(reg_mode="study").reg_resolved,
    "reduce-sum": dict(reduce="sum"),
}


def step_time(model, opt, x, y, reg, alpha: float, steps: int) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        if reg is not None:
            with reg:
                logits = model(x)
                r = reg.value(y)
            loss = F.cross_entropy(logits, y) - alpha * r
        else:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def bench(name: str, model, x, y, reps: int, steps: int, variants: list[str]) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    regs = {v: SelectivityRegularizer(model, num_classes=int(y.max()) + 1, **VARIANTS[v]) for v in variants}
    step_time(model, opt, x, y, None, 0.0, 2)
    for reg in regs.values():
        step_time(model, opt, x, y, reg, -1.0, 2)
    plain: list[tuple[float, float]] = []
    regd: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(reps):  # interleaved: plain, then every variant, in each repetition
        plain.append(step_time(model, opt, x, y, None, 0.0, steps))
        for v, reg in regs.items():
            regd[v].append(step_time(model, opt, x, y, reg, -1.0, steps))
    pw, pc = statistics.median(p[0] for p in plain), statistics.median(p[1] for p in plain)
    print(f"{name}: plain step {pw * 1000:.1f} ms ({len(next(iter(regs.values())).layers)} regularized read points)")
    for v in variants:
        rw, rc = statistics.median(p[0] for p in regd[v]), statistics.median(p[1] for p in regd[v])
        print(f"regularized step / plain step ({name}, {v}) = {rw / pw:.3f} (wall clock), {rc / pc:.3f} (CPU time); "
              f"regularized step {rw * 1000:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--models", default="resnet20,resnet50", help="comma-separated, of: resnet20, resnet50")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    models = {m.strip() for m in args.models.split(",")}
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if "resnet20" in models:
        x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        y = torch.arange(128) % 10
        bench("resnet20, batch 128, 28x28", create_model("resnet20", 10, 1).to(memory_format=torch.channels_last),
              x, y, args.reps, 3, variants)
    if "resnet50" in models:
        x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
        y = torch.arange(8) % 4
        bench("resnet50, batch 8, 224x224", create_model("resnet50", 1000, 3).to(memory_format=torch.channels_last),
              x, y, max(3, args.reps // 2), 1, variants)


if __name__ == "__main__":
    main()
