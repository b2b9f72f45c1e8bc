"""Benchmark: one checkpoint's Fisher traces (`csn fisher`) as a ratio to one plain eval pass over the same examples.

    python benchmarks/bench_fisher.py [--samples 1000] [--reps 5] [--threads 1] [--chunks 32,128,512] [--exact]
           [--eval-batches 100,250]

Target (the issue): <= 3 eval passes over the same N examples.

Models (random weights: the cost does not depend on them):
- fmnist: the fmnist preset's model, ResNet-8 (width 1, 77,754 parameters) on 28x28x1 inputs, 10 classes;
- smoke: the smoke preset's model, ResNet-8 (width 0.5) on 12x12x1 inputs, 4 classes.

Variants, over the same N random inputs:
- eval: `model(x)` under no_grad in eval mode (the plain evaluation pass) in batches of the preset's eval batch
  size (what csn's analyses use), and eval-bB in batches of B (--eval-batches): on a CPU, batches of 1,000 28x28
  images run slower than batches of 100 (caches), so the ratio is also given to the fastest eval pass ("best");
- fisher: `fisher_sums` with sampled labels (the default) and the default chunk (csn.analysis.fisher.default_chunk);
- fisher-cN: the same with chunks of N examples (--chunks), to show where the default comes from;
- exact (--exact): the expectation over every class (C per-class gradients per example).

Fisher batches are the preset's eval batches. Method: same process, torch.set_num_threads(--threads), one warm-up of every variant, then --reps repetitions in
which the variants run interleaved (their order rotating). Reported per variant: the median over repetitions of
the paired ratio to eval in process CPU time (time.process_time; with --threads 1 it does not depend on what else
runs on the machine) and in wall-clock time, and the median seconds.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from bench_selectivity import interleaved  # the one interleaved timer of the benchmarks

from csn.analysis.fisher import FisherSetup, default_chunk, fisher_sums, label_uniforms, parameter_groups
from csn.models import create_model
from csn.runs.config import preset

MODELS = {"fmnist": (28, 10), "smoke": (12, 4)}  # preset: (image size, classes)


def bench(name: str, args: argparse.Namespace) -> dict[str, float]:
    """Time the variants on one preset's model; print one line per variant; return the CPU-time ratios."""
    cfg = preset(name)
    size, classes = MODELS[name]
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=classes, in_channels=1, width=cfg.width).eval()
    x = torch.randn(args.samples, 1, size, size, generator=torch.Generator().manual_seed(1))
    u = label_uniforms(args.samples, 6151)
    bs = cfg.eval_batch_size
    batches = [(x[i:i + bs], u[i:i + bs]) for i in range(0, args.samples, bs)]
    groups = parameter_groups(model, model.csn_stages)
    chunk = default_chunk(model, x[0], "sampled", classes)

    def run_eval(b: int) -> Callable[[], object]:
        def go() -> None:
            with torch.no_grad():
                for i in range(0, args.samples, b):
                    model(x[i:i + b])
        return go

    def fisher(labels: str, c: int) -> Callable[[], object]:
        labelled = batches if labels == "sampled" else [(xb, torch.zeros(len(xb), dtype=torch.long)) for xb, _ in batches]
        return lambda: fisher_sums(model, labelled, FisherSetup(labels, groups, c))

    fns: dict[str, Callable[[], object]] = {"eval": run_eval(bs)}
    fns.update({f"eval-b{b}": run_eval(b) for b in args.eval_batches if b != bs})
    fns[f"fisher (chunk {chunk})"] = fisher("sampled", chunk)
    for c in args.chunks:
        if c != chunk:
            fns[f"fisher-c{c}"] = fisher("sampled", c)
    if args.exact:
        fns["exact"] = fisher("exact", max(1, chunk // classes))
    times = interleaved(fns, args.reps)
    evals = [n for n in times if n.startswith("eval")]
    times["best"] = [(min(times[n][r][0] for n in evals), min(times[n][r][1] for n in evals)) for r in range(args.reps)]
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {cfg.model} width {cfg.width}, {params:,} parameters, {size}x{size}x1, {classes} classes; "
          f"N = {args.samples}, eval batches of {bs}, {torch.get_num_threads()} thread(s)")
    ratios = {}
    for n, t in times.items():
        cpu = statistics.median(c / e[1] for (_, c), e in zip(t, times["eval"]))
        best = statistics.median(c / e[1] for (_, c), e in zip(t, times["best"]))
        wall = statistics.median(w / e[0] for (w, _), e in zip(t, times["eval"]))
        ratios[n] = cpu
        print(f"  {n:<22} {statistics.median(w for w, _ in t):8.3f} s wall, {statistics.median(c for _, c in t):8.3f} s "
              f"CPU; / eval: {cpu:5.2f} (CPU), {wall:5.2f} (wall); / best eval: {best:5.2f} (CPU)")
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--chunks", type=lambda s: [int(v) for v in s.split(",") if v], default=[32, 128, 512])
    ap.add_argument("--eval-batches", type=lambda s: [int(v) for v in s.split(",") if v], default=[100, 250])
    ap.add_argument("--exact", action="store_true")
    ap.add_argument("--models", default="fmnist,smoke")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench(name, args)


if __name__ == "__main__":
    main()
