"""Benchmark: the ablation protocol's passes under bf16 autocast against fp32 on a trained run: time, and how far
the numbers the verdicts use move (issue 28 item 3: "where the numbers do not move").

    csn train --preset fmnist --out runs/bf16 epochs=1 checkpoints=step=0,step=64,end   # a trained run (~30 s)
    python benchmarks/bench_bf16_analyses.py runs/bf16 [--samples 2000] [--threads 2] [--device cpu|cuda]

At each checkpoint after step 0: the ranking pass (collect_class_stats over every block: CSI) and the fast ablation
sweep (the study's orders, selective + 3 random draws, the default grid) over a fixed seeded subset of --samples
test images, once in fp32 (as csn's analyses run) and once under torch.autocast(bfloat16), twice each, interleaved;
the bf16 sweeps rank by the fp32 CSI, so their counts compare the scoring passes alone; one more bf16 sweep ranks
by its own bf16 CSI, as the whole protocol under bf16 would. Reported: median seconds and the speed-up, how many of
the sweep's correct counts moved and the largest move as a fraction of the images (scoring alone; ranking too), the
unablated accuracy both ways, and the largest CSI difference of any unit.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time

import torch

from csn.analysis.ablation import ablation_sweep
from csn.analysis.ablation.analysis import means_and_csi, resolve_stages
from csn.analysis.base import eval_loader
from csn.analysis.selectivity import collect_class_stats
from csn.runs.run import Run

KEY = ["stage", "order", "n", "draw"]


def passes(model, loader, stages, csi_fp32, classes: int, device: torch.device, bf16: bool):
    """(ranking seconds, sweep seconds, CSI per layer, sweep rows) with or without bf16 autocast."""
    layers = [layer for ls in stages.values() for layer in ls]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        t0 = time.perf_counter()
        stats = collect_class_stats(model, loader, layers, classes, progress=False)
        t1 = time.perf_counter()
        rows = ablation_sweep(model, loader, stages, csi_fp32 or means_and_csi(stats)[0], orders=("selective", "random"),
                              draws=3, seed=0, num_classes=classes, device=device, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, means_and_csi(stats)[0], rows.sort_values(KEY).reset_index(drop=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = Run(args.run)
    data = run.dataset()
    classes = int(run.info["data"]["num_classes"])
    loader = eval_loader(run, data, "test", batch_size=args.batch, device=device, samples=args.samples)
    cpu = platform.processor() or platform.machine()
    print(f"# {datetime.date.today()} {platform.node()} {cpu}, torch {torch.__version__}, {args.device}, "
          f"{args.threads} threads; {run.path}, {args.samples} test images")
    print("| step | fp32 rank + sweep (s) | bf16 (s) | speed-up | counts moved | largest move | unablated acc fp32 / "
          "bf16 | largest CSI difference |\n|---|---|---|---|---|---|---|---|")
    for ck in run.checkpoints[1:]:
        model = run.build_model().to(device)
        model.load_state_dict(run.load_state(ck))
        model.eval()
        stages = resolve_stages(model)
        first = passes(model, loader, stages, None, classes, device, bf16=False)
        out = {False: [first], True: []}
        for bf16 in (True, False, True):
            out[bf16].append(passes(model, loader, stages, first[2], classes, device, bf16))
        whole = passes(model, loader, stages, None, classes, device, bf16=True)[3]  # ranked by its own CSI
        whole_moved = (out[False][0][3]["correct"] - whole["correct"]).abs()
        sec = {k: statistics.median(r[0] + r[1] for r in v) for k, v in out.items()}
        a, b = out[False][0][3], out[True][0][3]
        moved = (a["correct"] - b["correct"]).abs()
        total = int(a["total"].iloc[0])
        csi_diff = max(float((out[False][0][2][k] - out[True][0][2][k]).abs().max()) for k in first[2])
        acc = [int(x[x["n"] == 0]["correct"].iloc[0]) / total for x in (a, b)]
        print(f"| {ck.step} | {sec[False]:.1f} | {sec[True]:.1f} | {sec[False] / sec[True]:.2f}x | "
              f"{int((moved > 0).sum())} of {len(a)} | {int(moved.max())} ({moved.max() / total:.2%}); ranked in bf16 "
              f"{int(whole_moved.max())} ({whole_moved.max() / total:.2%}) | "
              f"{acc[0]:.4f} / {acc[1]:.4f} | {csi_diff:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
