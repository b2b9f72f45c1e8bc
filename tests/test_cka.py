"""Linear CKA (unbiased minibatch HSIC): exactness against an independent naive estimator, invariances."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from csn.analysis.cka import CKAAccumulator, cka, linear_cka
from csn.errors import CsnError

# -- an independent, pair-by-pair implementation of the same estimator (loops, numpy) -------------

def naive_hsic1(x: np.ndarray, y: np.ndarray) -> float:
    n = x.shape[0]
    k = x @ x.T
    l = y @ y.T
    for i in range(n):
        k[i, i] = 0.0
        l[i, i] = 0.0
    one = np.ones(n)
    tr = np.trace(k @ l)
    return (tr + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def naive_cka(batches: list[list[np.ndarray]]) -> np.ndarray:
    """batches[b][layer] = [n, d] array; returns the CKA matrix, one Gram per pair per batch."""
    m = len(batches[0])
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            kl = np.mean([naive_hsic1(b[i], b[j]) for b in batches])
            kk = np.mean([naive_hsic1(b[i], b[i]) for b in batches])
            ll = np.mean([naive_hsic1(b[j], b[j]) for b in batches])
            out[i, j] = kl / math.sqrt(kk * ll)
    return out


def random_layers(gen: torch.Generator, n: int, widths: list[int]) -> list[torch.Tensor]:
    base = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    # correlated layers: a shared signal mixed with noise, so CKA values are spread out
    return [base @ torch.randn(8, w, generator=gen, dtype=torch.float64) + 0.5 * k * torch.randn(n, w, generator=gen, dtype=torch.float64)
            for k, w in enumerate(widths)]


def test_matches_naive_pairwise_estimator():
    gen = torch.Generator().manual_seed(0)
    widths = [3, 7, 12, 5]
    batches = [random_layers(gen, n, widths) for n in (9, 12, 7)]  # unequal batch sizes too
    acc = CKAAccumulator(len(widths))
    for b in batches:
        acc.update(b)
    expected = naive_cka([[t.numpy() for t in b] for b in batches])
    got = acc.result().numpy()
    assert np.allclose(got, expected, atol=1e-10, rtol=0)
    assert np.allclose(got, got.T, atol=1e-12)
    assert np.allclose(np.diag(got), 1.0, atol=1e-12)


def test_identical_features_give_one_and_invariances():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 10, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=gen, dtype=torch.float64))
    y = torch.randn(40, 5, generator=gen, dtype=torch.float64) + x[:, :5]
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert 0.05 < base < 0.999
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)      # orthogonal transform
    assert linear_cka(3.7 * x, 0.2 * y) == pytest.approx(base, abs=1e-10)  # isotropic scaling


def test_one_batch_equals_unbiased_full_data_estimate():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(4, 6, generator=gen, dtype=torch.float64) + torch.randn(30, 6, generator=gen, dtype=torch.float64)
    xa, ya = x.numpy(), y.numpy()
    # full-data unbiased HSIC (Song et al. 2012), written with explicit sums
    n = 30
    k, l = xa @ xa.T, ya @ ya.T
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)

    def h(a, b):
        return (np.sum(a * b) + a.sum() * b.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * np.sum(a.sum(1) * b.sum(1))) / (n * (n - 3))

    expected = h(k, l) / math.sqrt(h(k, k) * h(l, l))
    acc = CKAAccumulator(2)
    acc.update([x, y])
    assert float(acc.result()[0, 1]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_small_batches_rejected(n):
    acc = CKAAccumulator(1)
    with pytest.raises(CsnError, match="more than 3 examples"):
        acc.update([torch.randn(n, 4)])


def test_cross_block_equals_separate_computation():
    gen = torch.Generator().manual_seed(3)
    batches_a, batches_b = [], []
    for _ in range(3):
        layers = random_layers(gen, 16, [4, 9, 6, 3, 5])
        batches_a.append(layers[:2])
        batches_b.append(layers[2:])
    acc = CKAAccumulator(2, 3)
    for a, b in zip(batches_a, batches_b):
        acc.update_pair(a, b)
    block = acc.result()
    assert block.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            one = CKAAccumulator(1, 1)
            for a, b in zip(batches_a, batches_b):
                one.update_pair([a[i]], [b[j]])
            assert float(block[i, j]) == pytest.approx(float(one.result()[0, 0]), abs=1e-12)
    with pytest.raises(CsnError):
        acc.update_pair(batches_a[0], batches_b[0][:1])


def test_tensors_sum_like_data_parallel():
    gen = torch.Generator().manual_seed(4)
    batches = [random_layers(gen, 10, [3, 4, 5]) for _ in range(4)]
    whole, r0, r1 = CKAAccumulator(3), CKAAccumulator(3), CKAAccumulator(3)
    for i, b in enumerate(batches):
        whole.update(b)
        (r0 if i % 2 == 0 else r1).update(b)
    for t0, t1 in zip(r0.tensors(), r1.tensors()):  # what all_reduce(SUM) does on each rank
        t0 += t1
    assert torch.allclose(r0.result(), whole.result(), atol=1e-12)
    assert float(r0.count) == 4


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.fc1 = nn.Linear(4 * 6 * 6, 8)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)
        self.csn_stages = {"s1": ["relu"], "s2": ["relu2"]}

    def forward(self, x):
        h = self.relu(self.bn(self.conv(x)))
        return self.fc2(self.relu2(self.fc1(h.flatten(1))))


def _loader(n=42, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)  # last batch has 2 examples: skipped


def test_cka_models_same_object_and_copy():
    torch.manual_seed(0)
    model = Tiny()
    model.train()
    df = cka(model, model, _loader(), ["relu", "relu2"], ["relu", "relu2", "logits"])
    assert list(df.columns) == ["layer_a", "layer_b", "cka"]
    assert len(df) == 6
    assert model.training  # mode restored
    self_vals = df[df.layer_a == df.layer_b].cka
    assert np.allclose(self_vals, 1.0, atol=1e-10)
    df2 = cka(model, copy.deepcopy(model), _loader(), ["relu", "relu2"], ["relu", "relu2", "logits"])
    assert np.allclose(df.cka.values, df2.cka.values, atol=1e-10)
    # defaults: declared read points + logits
    df3 = cka(model, model, _loader(), None, None)
    assert set(df3.layer_a) == {"relu", "relu2", "logits"}


def test_cka_models_matches_manual_features_and_flatten():
    torch.manual_seed(1)
    a, b = Tiny().eval(), Tiny().eval()
    loader = _loader(n=40, batch=10)
    acc_units, acc_flat = CKAAccumulator(1, 2), CKAAccumulator(1, 2)
    with torch.no_grad():
        for x, _ in loader:
            ha = a.relu(a.bn(a.conv(x)))
            hb = b.relu(b.bn(b.conv(x)))
            acc_units.update_pair([ha.mean(dim=(2, 3))], [hb.mean(dim=(2, 3)), b(x)])
            acc_flat.update_pair([ha.flatten(1)], [hb.flatten(1), b(x)])
    df = cka(a, b, loader, ["relu"], ["relu", "logits"])
    assert np.allclose(df.cka.values, acc_units.result().numpy().ravel(), atol=1e-6)
    dff = cka(a, b, loader, ["relu"], ["relu", "logits"], flatten=True)
    assert np.allclose(dff.cka.values, acc_flat.result().numpy().ravel(), atol=1e-6)


def test_cka_rejects_tiny_batches_and_unknown_layers():
    model = Tiny()
    with pytest.raises(CsnError, match="more than 3 examples"):
        cka(model, model, _loader(n=6, batch=3), ["relu"], ["relu"])
    with pytest.raises(CsnError, match="matches no module"):
        cka(model, model, _loader(), ["nope"], ["relu"])
