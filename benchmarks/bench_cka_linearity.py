"""Benchmark: all-pairs CKA vs a naive pair loop, and the cost of the linearity measures.

    python benchmarks/bench_cka_linearity.py [--quick]

1. All-pairs CKA (csn.analysis.cka.CKAAccumulator: one Gram per layer and batch, all HSIC terms
   from two matmuls) vs a naive loop that, for each pair of layers, builds both Grams and the three
   HSIC terms (what a per-pair `cka(X, Y)` function does). 10 layers of random features of varying
   widths, batch 256, 20 batches, float64 accumulation in both.
2. Linearity: a plain evaluation pass (model(x) under no_grad) vs linearized_outputs (one JVP +
   the forward of model_t) and vs linearity_measures with a previous checkpoint (two JVPs, ReLU
   pattern comparisons, three extra forwards), on a small CIFAR-style ResNet with 28x28 inputs.

Same process, time.perf_counter, median of repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from csn.analysis.cka import CKAAccumulator
from csn.analysis.linearity import linearity_measures, linearized_outputs


def timeit(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# -- 1. CKA ------------------------------------------------------------------------------------

def naive_cka(batches: list[list[torch.Tensor]]) -> torch.Tensor:
    """Pair by pair: for every pair (i < j), both Grams and HSIC(K,L), HSIC(K,K), HSIC(L,L) per batch."""
    m = len(batches[0])

    def gram(x):
        x = x.to(torch.float64)
        k = x @ x.T
        k.fill_diagonal_(0)
        return k

    def hsic(k, l):
        n = k.shape[0]
        return (torch.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * torch.dot(k.sum(1), l.sum(1))) / (n * (n - 3))

    out = torch.eye(m, dtype=torch.float64)
    for i in range(m):
        for j in range(i + 1, m):
            kl = kk = ll = 0.0
            for feats in batches:
                k, l = gram(feats[i]), gram(feats[j])
                kl += hsic(k, l)
                kk += hsic(k, k)
                ll += hsic(l, l)
            out[i, j] = out[j, i] = kl / torch.sqrt(kk * ll)
    return out


def fast_cka(batches: list[list[torch.Tensor]]) -> torch.Tensor:
    acc = CKAAccumulator(len(batches[0]))
    for feats in batches:
        acc.update(feats)
    return acc.result()


def bench_cka(num_batches: int, repeats: int) -> None:
    widths = [32, 64, 128, 256, 512, 64, 128, 256, 512, 10]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(num_batches):
        base = torch.randn(256, 16, generator=g)
        batches.append([torch.relu(base @ torch.randn(16, w, generator=g) + torch.randn(256, w, generator=g)) for w in widths])
    diff = float((naive_cka(batches) - fast_cka(batches)).abs().max())
    t_naive = timeit(lambda: naive_cka(batches), repeats)
    t_fast = timeit(lambda: fast_cka(batches), repeats)
    print(f"CKA: {len(widths)} layers (widths {widths}), batch 256, {num_batches} batches; max |naive - all-pairs| = {diff:.1e}")
    print(f"  naive pair loop {t_naive * 1e3:.1f} ms, all-pairs {t_fast * 1e3:.1f} ms")
    print(f"all-pairs CKA speed-up over naive = {t_naive / t_fast:.1f}x")


# -- 2. Linearity ------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        h = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(h)) + self.short(x))


class SmallResNet(nn.Module):
    """ResNet-8-like: stem + 3 stages of one basic block (widths 16/32/64), 1x28x28 inputs."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Block(16, 16, 1))
        self.layer2 = nn.Sequential(Block(16, 32, 2))
        self.layer3 = nn.Sequential(Block(32, 64, 2))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


def bench_linearity(num_batches: int, repeats: int) -> None:
    torch.manual_seed(0)
    m0 = SmallResNet().eval()
    mprev, mt = copy.deepcopy(m0), copy.deepcopy(m0)
    with torch.no_grad():
        for a, b in zip(mprev.parameters(), mt.parameters()):
            a.add_(0.02 * torch.randn_like(a))
            b.copy_(a + 0.02 * torch.randn_like(a))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)) for _ in range(num_batches)]

    def plain():
        with torch.no_grad():
            for x, _ in data:
                mt(x)

    def linearized():
        for x, _ in data:
            linearized_outputs(mt, m0, x)

    def measures():
        linearity_measures(mt, m0, data, model_prev=mprev)

    t_plain = timeit(plain, repeats)
    t_lin = timeit(linearized, repeats)
    t_all = timeit(measures, repeats)
    print(f"Linearity: SmallResNet (3 stages 16/32/64), batch 128, {num_batches} batches, {torch.get_num_threads()} threads")
    print(f"  plain eval pass {t_plain * 1e3:.0f} ms, linearized_outputs {t_lin * 1e3:.0f} ms, "
          f"linearity_measures(init + prev, ReLU patterns) {t_all * 1e3:.0f} ms")
    print(f"linearization (JVP + forward) cost relative to a plain evaluation pass = {t_lin / t_plain:.2f}x")
    print(f"all linearity measures (init + prev) cost relative to a plain evaluation pass = {t_all / t_plain:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer batches and repeats")
    args = ap.parse_args()
    reps = 1 if args.quick else 3
    bench_cka(num_batches=5 if args.quick else 20, repeats=reps)
    bench_linearity(num_batches=2 if args.quick else 6, repeats=reps)


if __name__ == "__main__":
    main()
