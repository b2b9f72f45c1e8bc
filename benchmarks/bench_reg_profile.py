"""Profile of the selectivity regularizer's cost in a training step: which operators it adds (issue 28 item 2).

    python benchmarks/bench_reg_profile.py                      # ResNet-50 224², batch 256, bf16, on the GPU
    python benchmarks/bench_reg_profile.py --cpu --model resnet20 --image-size 32 --batch 64 --classes 10

The step is the one csn's training loop takes (csn.training.loop._Training._train_step, written out here):
bf16 autocast (CUDA), channels_last, SGD with momentum, cross-entropy on float logits, and with the regularizer
csn's default (`reg_alpha=-1`, class means over the batch, every stage but the last: 13 blocks of ResNet-50),
added through SelectivityRegularizer.value_nowait as the loop adds it. Synthetic data held on the device.

Measured: --steps plain steps against --steps regularized steps, timed by the benchmarks' interleaved timer
(bench_selectivity.interleaved and report: one warm-up of each, then --reps repetitions, order rotating; the median
paired ratio); then torch.profiler over --profile-steps steps of each, and a table of the
operators by the device time (CUDA; CPU time on the CPU) the regularized step spends beyond the plain one:
what the regularizer costs, operator by operator, forward and backward.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench_selectivity import interleaved, report, sync  # the benchmarks' one interleaved timer
from torch.profiler import ProfilerActivity, profile

from csn.models import create_model
from csn.training.regularizer import SelectivityRegularizer

ALPHA = -1.0  # csn's suppression default: loss = ce - alpha * R


def make_step(model, opt, reg, device: torch.device, amp: bool):
    def step(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
            loss = F.cross_entropy(model(x).float(), y)
            if reg is not None:
                r, _ = reg.value_nowait(y)
                loss = loss - ALPHA * r
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_steps(step, batches, steps: int, device: torch.device) -> None:
    for i in range(steps):
        step(*batches[i % len(batches)])
    sync(device)


def op_times(step, batches, steps: int, device: torch.device) -> dict[str, float]:
    """Self device time (CUDA; CPU on the CPU) per operator name over `steps` steps, in ms per step."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run_steps(step, batches, steps, device)
    out: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total
        if us:
            out[e.key] = out.get(e.key, 0.0) + us / 1000.0 / steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--no-amp", dest="amp", action="store_false")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test with a small model)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("bench_reg_profile: skipped - no CUDA device here (pass --cpu for a smoke test on the CPU).")
        return 0
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_channels=3).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    reg = SelectivityRegularizer(model, num_classes=args.classes)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)
                .contiguous(memory_format=torch.channels_last),
                torch.randint(0, args.classes, (args.batch,), generator=g).to(device)) for _ in range(4)]
    plain = make_step(model, opt, None, device, args.amp)
    regularized = make_step(model, opt, reg, device, args.amp)
    def with_reg() -> None:
        with reg:
            run_steps(regularized, batches, args.steps, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}: {args.model} {args.image_size}², batch {args.batch}, bf16 "
          f"{args.amp and device.type == 'cuda'}, {len(reg.layers)} regularized layers, {args.classes} classes")
    times = interleaved({"plain": lambda: run_steps(plain, batches, args.steps, device), "regularized": with_reg},
                        args.reps)
    report(f"regularized / plain step, {args.steps} steps (target <= 1.10)", times, "regularized", "plain")
    base = op_times(plain, batches, args.profile_steps, device)
    with reg:
        added = op_times(regularized, batches, args.profile_steps, device)
    extra = sorted(((added.get(k, 0.0) - base.get(k, 0.0), k) for k in set(added) | set(base)), reverse=True)
    clock = "device" if device.type == "cuda" else "CPU"
    print(f"\nself {clock} ms per step: regularized - plain (total {sum(added.values()) - sum(base.values()):.2f})")
    print("| operator | plain | regularized | added |\n|---|---|---|---|")
    for d, k in extra[: args.top]:
        print(f"| {k[:70]} | {base.get(k, 0.0):.3f} | {added.get(k, 0.0):.3f} | {d:+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
