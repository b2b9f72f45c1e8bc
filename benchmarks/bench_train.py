"""Throughput of `csn train` (dense checkpoint schedule on) vs a minimal hand-written torch loop.

Same model, data, batch size, optimizer and thread count, in the same process, alternating runs.
Prints images/s of both and their ratio (target >= 0.9), with and without the checkpoint work.

    python benchmarks/bench_train.py [--preset fmnist] [--epochs 1] [--reps 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from csn.data import BatchLoader
from csn.runs.config import build_model_for, data_info, load_data, preset
from csn.training.loop import train


def hand_loop(cfg, data, steps: int) -> tuple[float, float]:
    """The baseline: the loop anyone would write by hand (no checkpoints, no logging)."""
    torch.manual_seed(cfg.seed)
    model = build_model_for(cfg, data_info(data))
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loader = BatchLoader(data.train, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=True,
                         channels_last=cfg.channels_last)
    model.train()
    t0, c0, done = time.perf_counter(), time.process_time(), 0
    while done < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return time.perf_counter() - t0, time.process_time() - c0


def csn_loop(cfg) -> tuple[float, float, int]:
    """csn's loop with the preset's dense checkpoints (everything included); (wall, CPU) seconds, checkpoints."""
    with tempfile.TemporaryDirectory() as d:
        t0, c0 = time.perf_counter(), time.process_time()
        run = train(cfg, f"{d}/run", progress=False)
        return time.perf_counter() - t0, time.process_time() - c0, len(run.checkpoints)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="fmnist")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = preset(args.preset).override([f"epochs={args.epochs}"])
    data = load_data(cfg)
    steps = int(round(args.epochs * (len(data.train) // cfg.batch_size)))
    images = steps * cfg.batch_size
    hand, ours = [], []
    hand_loop(cfg, data, 20)  # warm-up
    for _ in range(args.reps):
        hand.append(hand_loop(cfg, data, steps))
        ours.append(csn_loop(cfg))
    h, hc = statistics.median(x[0] for x in hand), statistics.median(x[1] for x in hand)
    w, wc = statistics.median(o[0] for o in ours), statistics.median(o[1] for o in ours)
    ckpts = ours[-1][2]
    print(f"preset {args.preset}: model {cfg.model} width {cfg.width}, batch {cfg.batch_size}, {steps} steps, "
          f"{ckpts} checkpoints (eval on {cfg.eval_samples or 'all'} test images each, full split at the end), {args.threads} threads")
    print(f"hand-written loop: {images / h:.0f} img/s   csn train (everything, incl. checkpoints): {images / w:.0f} img/s")
    print(f"csn train throughput / hand-written loop = {h / w:.3f} (wall clock)")
    print(f"csn train throughput / hand-written loop = {hc / wc:.3f} (CPU time; robust to other load with 1 thread)")


if __name__ == "__main__":
    main()
