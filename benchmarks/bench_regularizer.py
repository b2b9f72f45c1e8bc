"""Cost of a regularized training step relative to an unregularized one (same process, interleaved).

ResNet-20 on Fashion-MNIST-shaped batches of 128, and ResNet-50 on synthetic 224x224 at a small batch.
Prints wall-clock and CPU-time ratios (target <= 1.10); medians over interleaved repetitions.

    python benchmarks/bench_regularizer.py [--threads 1] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from csn.models import create_model
from csn.training.regularizer import SelectivityRegularizer


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


def bench(name: str, model, x, y, reps: int, steps: int) -> None:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    reg = SelectivityRegularizer(model, num_classes=int(y.max()) + 1)
    step_time(model, opt, x, y, None, 0.0, 2)
    step_time(model, opt, x, y, reg, -1.0, 2)
    plain, regd = [], []
    for _ in range(reps):
        plain.append(step_time(model, opt, x, y, None, 0.0, steps))
        regd.append(step_time(model, opt, x, y, reg, -1.0, steps))
    pw, pc = statistics.median(p[0] for p in plain), statistics.median(p[1] for p in plain)
    rw, rc = statistics.median(p[0] for p in regd), statistics.median(p[1] for p in regd)
    print(f"{name}: plain step {pw * 1000:.1f} ms, regularized step {rw * 1000:.1f} ms "
          f"({len(reg.layers)} regularized read points)")
    print(f"regularized step / plain step ({name}) = {rw / pw:.3f} (wall clock), {rc / pc:.3f} (CPU time)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.arange(128) % 10
    bench("resnet20, batch 128, 28x28", create_model("resnet20", 10, 1).to(memory_format=torch.channels_last),
          x, y, args.reps, 3)
    x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 4
    bench("resnet50, batch 8, 224x224", create_model("resnet50", 1000, 3).to(memory_format=torch.channels_last),
          x, y, max(3, args.reps // 2), 1)


if __name__ == "__main__":
    main()
