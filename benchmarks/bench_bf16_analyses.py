"""Benchmark: the ablation protocol's passes under bf16 autocast against fp32 on a trained run: time, and how far
the numbers the verdicts use move (issue 28 item 3: "where the numbers do not move").

    csn train --preset fmnist --out runs/bf16 epochs=1 checkpoints=step=0,step=64,end   # a trained run (~30 s)
    python benchmarks/bench_bf16_analyses.py runs/bf16 [--samples 2000] [--threads 2] [--device cpu|cuda]

At each checkpoint after step 0 (compare(), which `bench_gpu_ablation.py --bf16` also runs): the ranking pass
(collect_class_stats over every block: CSI) and the fast ablation sweep (the study's orders, selective + 3 random
draws, the default grid) over a fixed seeded subset of --samples test images, in fp32 (as csn's analyses run) and
under torch.autocast(bfloat16), timed by the benchmarks' interleaved timer (bench_selectivity.interleaved: one
warm-up each, then --reps repetitions, order rotating). Both sweeps rank by the fp32 CSI, so their counts compare
the scoring passes alone; one more bf16 pass ranks by its own bf16 CSI, as the whole protocol under bf16 would.
Reported: median seconds and the speed-up, how many of the sweep's correct counts moved and the largest move as a
fraction of the images (scoring alone; ranking too), the unablated accuracy both ways, and the largest CSI
difference of any unit.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys

import torch
from bench_selectivity import interleaved, sync  # the benchmarks' one interleaved timer

from csn.analysis.ablation import ablation_sweep
from csn.analysis.ablation.analysis import means_and_csi, resolve_stages
from csn.analysis.base import eval_loader
from csn.analysis.selectivity import collect_class_stats
from csn.runs.run import Run

KEY = ["stage", "order", "n", "draw"]


def passes(model, loader, stages, classes: int, device: torch.device, bf16: bool, csi=None):
    """The ranking pass and the fast sweep, with or without bf16 autocast: (this pass's CSI per layer, the sweep's
    rows sorted); the sweep ranks by `csi` when given, else by this pass's CSI."""
    layers = [layer for ls in stages.values() for layer in ls]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        own = means_and_csi(collect_class_stats(model, loader, layers, classes, progress=False))[0]
        rows = ablation_sweep(model, loader, stages, own if csi is None else csi, orders=("selective", "random"),
                              draws=3, seed=0, num_classes=classes, device=device, progress=False)
    sync(device)
    return own, rows.sort_values(KEY).reset_index(drop=True)


def compare(model, loader, stages, classes: int, device: torch.device, reps: int = 2) -> dict:
    """fp32 against bf16 autocast on one model: median seconds of ranking + sweep, speed-up, and how far the
    sweep's correct counts, the unablated accuracy and the CSI move."""
    layers = [layer for ls in stages.values() for layer in ls]
    csi = means_and_csi(collect_class_stats(model, loader, layers, classes, progress=False))[0]  # the fp32 ranking
    last: dict[str, tuple] = {}

    def run(name: str, bf16: bool) -> None:
        last[name] = passes(model, loader, stages, classes, device, bf16, csi)

    times = interleaved({"fp32": lambda: run("fp32", False), "bf16": lambda: run("bf16", True)}, reps)
    sec = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    (csi32, a), (csi16, b) = last["fp32"], last["bf16"]
    whole = passes(model, loader, stages, classes, device, True)[1]  # ranked by its own bf16 CSI
    total = int(a["total"].iloc[0])
    moved, whole_moved = (a["correct"] - b["correct"]).abs(), (a["correct"] - whole["correct"]).abs()
    return {"fp32_s": sec["fp32"], "bf16_s": sec["bf16"], "speedup": sec["fp32"] / sec["bf16"], "points": len(a),
            "images": total, "moved": int((moved > 0).sum()), "max_moved": int(moved.max()),
            "max_moved_bf16_ranking": int(whole_moved.max()),
            "acc_fp32": int(a[a["n"] == 0]["correct"].iloc[0]) / total,
            "acc_bf16": int(b[b["n"] == 0]["correct"].iloc[0]) / total,
            "max_csi_diff": max(float((csi32[k] - csi16[k]).abs().max()) for k in csi32)}


def row(step: int | str, c: dict) -> str:
    """compare()'s result as a line of the Markdown table (HEADER)."""
    n = c["images"]
    return (f"| {step} | {c['fp32_s']:.1f} | {c['bf16_s']:.1f} | {c['speedup']:.2f}x | {c['moved']} of {c['points']} | "
            f"{c['max_moved']} ({c['max_moved'] / n:.2%}); ranked in bf16 {c['max_moved_bf16_ranking']} "
            f"({c['max_moved_bf16_ranking'] / n:.2%}) | {c['acc_fp32']:.4f} / {c['acc_bf16']:.4f} | "
            f"{c['max_csi_diff']:.4f} |")


HEADER = ("| step | fp32 rank + sweep (s) | bf16 (s) | speed-up | counts moved | largest move | unablated acc fp32 / "
          "bf16 | largest CSI difference |\n|---|---|---|---|---|---|---|---|")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions after the warm-up")
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
    print(HEADER)
    for ck in run.checkpoints[1:]:
        model = run.build_model().to(device)
        model.load_state_dict(run.load_state(ck))
        model.eval()
        print(row(ck.step, compare(model, loader, resolve_stages(model), classes, device, args.reps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
