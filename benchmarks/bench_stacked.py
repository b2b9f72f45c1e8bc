"""Benchmark: K small training runs on one device, four ways (issue 28: the fmnist map's 56 runs on one GPU).

    python benchmarks/bench_stacked.py [--device cpu|cuda] [--runs 6] [--steps 40] [--reps 2] [--threads 1]
        [--json FILE]

The model and batch of the fmnist preset (ResNet-8, 16/32/64 channels, 28x28x1 synthetic images, 10 classes,
batch 128, SGD momentum 0.9, weight decay 5e-4, channels_last), K = --runs models; each way trains every model
--steps steps per repetition, timed by the benchmarks' interleaved timer (bench_selectivity.interleaved: one
warm-up repetition of every way, then --reps, order rotating), and reports the training steps per second summed
over the K models (from the median repetition):
- sequential: one process steps the K models one after another (csn's --parallel 1 in the limit of no start-up);
- stacked: one process holds the K models' parameters stacked (torch.func.stack_module_state) and steps all K in
  one vmapped forward and backward (functional_call; BatchNorm running statistics stacked too) and one optimizer
  step: the design for "several models of one seed batched into one step" (the conditions of a map share their
  seed's batches). Checked against sequential: the same K initial models trained on the same batches, the
  largest difference of any weight after --check-steps steps (in float64) is printed;
- processes: K spawned processes, one model each, started together after a warm-up of --steps steps (csn's
  --parallel K; on a GPU each process has its own CUDA context and the driver time-slices them); threads per
  process: --threads;
- graphs (CUDA only): sequential, each model's whole training step captured once in a CUDA graph and replayed
  (static input and label tensors), the launch overhead of small kernels removed.
Without CUDA the graphs way is skipped. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
import warnings
from multiprocessing import get_context

import torch
import torch.nn.functional as F
from bench_selectivity import interleaved, sync  # the benchmarks' one interleaved timer


def _model(seed: int, device: torch.device) -> torch.nn.Module:
    from csn.models.resnet_cifar import resnet8

    torch.manual_seed(seed)
    return resnet8(num_classes=10, in_channels=1).to(device).to(memory_format=torch.channels_last)


def _batches(n: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(128, 1, 28, 28, generator=g).to(device).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 10, (128,), generator=g).to(device)) for _ in range(n)]


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)


class Sequential:
    def __init__(self, k: int, device: torch.device) -> None:
        self.models = [_model(s, device) for s in range(k)]
        self.opts = [_sgd(m.parameters()) for m in self.models]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for m, o in zip(self.models, self.opts):
            loss = F.cross_entropy(m(x), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()


class Stacked:
    def __init__(self, k: int, device: torch.device) -> None:
        from torch.func import functional_call, stack_module_state, vmap

        models = [_model(s, device) for s in range(k)]
        params, self.buffers = stack_module_state(models)
        self.params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        self.opt = _sgd(list(self.params.values()))
        base = copy.deepcopy(models[0]).to("meta")

        def loss(p, b, x, y):
            return F.cross_entropy(functional_call(base, (p, b), (x,)), y)

        self.losses = vmap(loss, in_dims=(0, 0, None, None))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        loss = self.losses(self.params, self.buffers, x, y).sum()  # the sum's gradient is each model's own
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def weights(self, i: int) -> dict[str, torch.Tensor]:
        return {**{n: p[i] for n, p in self.params.items()}, **{n: b[i] for n, b in self.buffers.items()}}


class Graphs:
    """Each model's forward, backward and optimizer step captured in one CUDA graph (PyTorch's whole-network
    capture recipe: warm-up on a side stream, static inputs, gradients kept between replays)."""

    def __init__(self, k: int, device: torch.device) -> None:
        self.x = torch.zeros(128, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
        self.y = torch.zeros(128, dtype=torch.long, device=device)
        self.graphs = []
        for s in range(k):
            m = _model(s, device)
            opt = _sgd(m.parameters())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(m(self.x), self.y).backward()
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(g):
                F.cross_entropy(m(self.x), self.y).backward()
                opt.step()
            self.graphs.append((m, opt, g))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x.copy_(x)
        self.y.copy_(y)
        for _, _, g in self.graphs:
            g.replay()


def _steps(trainer, batches, steps: int, device: torch.device) -> None:
    for i in range(steps):
        trainer.step(*batches[i % len(batches)])
    sync(device)


def _process(device: str, threads: int, steps: int, barrier, out) -> None:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    trainer, batches = Sequential(1, dev), _batches(8, dev)
    _steps(trainer, batches, steps, dev)  # warm-up
    barrier.wait()
    t0 = time.time()
    _steps(trainer, batches, steps, dev)
    out.put((t0, time.time()))


def processes_rate(k: int, device: torch.device, threads: int, steps: int) -> float:
    ctx = get_context("spawn")
    barrier, out = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_process, args=(str(device), threads, steps, barrier, out)) for _ in range(k)]
    for p in procs:
        p.start()
    spans = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return k * steps / (max(b for _, b in spans) - min(a for a, _ in spans))


def stacked_difference(k: int, device: torch.device, steps: int) -> float:
    """Largest |weight or BN statistic| difference between the stacked models and the same models stepped one by
    one on the same batches, after `steps` steps."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # float64: a difference is the design's, not float32 rounding's
    try:
        seq, st = Sequential(k, device), Stacked(k, device)
        for x, y in _batches(steps, device, seed=1):
            seq.step(x, y)
            st.step(x, y)
    finally:
        torch.set_default_dtype(old)
    worst = 0.0
    for i, m in enumerate(seq.models):
        w = st.weights(i)
        for n, t in m.state_dict().items():
            if t.is_floating_point():
                worst = max(worst, float((t - w[n]).detach().abs().max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=6, help="K models")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per model")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions after the warm-up")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    ap.add_argument("--check-steps", type=int, default=20, help="steps of the stacked-vs-sequential check")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*batching rule.*")  # vmap's note on adaptive_avg_pool2d's fallback
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    k = args.runs
    batches = _batches(8, device)
    trainers = {"sequential": Sequential(k, device), "stacked": Stacked(k, device)}
    if device.type == "cuda":
        try:
            trainers["graphs"] = Graphs(k, device)
        except Exception as e:  # a model or torch that cannot be captured: say so, measure the rest
            print(f"graphs: not measured ({type(e).__name__}: {e})", file=sys.stderr)
    times = interleaved({way: functools.partial(_steps, t, batches, args.steps, device) for way, t in trainers.items()},
                        args.reps)
    rates = {way: k * args.steps / statistics.median(t[0] for t in v) for way, v in times.items()}
    rates["processes"] = processes_rate(k, device, args.threads, args.steps)
    diff = stacked_difference(k, device, args.check_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# {datetime.date.today()} {platform.node()} {name}, torch {torch.__version__}, K={k} ResNet-8 models, "
          f"batch 128, {args.steps} steps each per repetition, median of {args.reps}, {args.threads} thread(s) per "
          "process, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    print("| way | steps/s (all K models) | vs sequential |\n|---|---|---|")
    for way, r in rates.items():
        print(f"| {way} | {r:,.1f} | {r / rates['sequential']:.2f}x |")
    print(f"stacked vs sequential after {args.check_steps} steps in float64: largest weight difference {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "runs": k, "rates": rates, "stacked_max_diff": diff, "argv": sys.argv}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
