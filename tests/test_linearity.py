"""Linearity measures: information quantities by hand, JVP linearization vs finite differences, ReLU patterns."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from csn.analysis.linearity import (
    accuracy,
    conditional_mutual_information,
    fit_linear_classifier,
    linearity_measures,
    linearized_outputs,
    mutual_information,
    performance_correlation,
    relu_agreement,
    relu_patterns,
)
from csn.errors import CsnError

# -- information measures against explicit log2 sums over a small contingency table ---------------

F = [0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 1, 1]
Y = [0, 0, 1, 1, 2, 1, 0, 1, 2, 2, 0, 1]
L = [0, 1, 1, 1, 2, 2, 0, 0, 2, 0, 1, 1]


def mi_by_hand(a, b):
    n = len(a)
    pab, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
    return sum(c / n * math.log2((c / n) / ((pa[x] / n) * (pb[y] / n))) for (x, y), c in pab.items())


def cmi_by_hand(a, b, c):
    n = len(a)
    total = 0.0
    for cv, nc in Counter(c).items():
        idx = [i for i in range(n) if c[i] == cv]
        total += nc / n * mi_by_hand([a[i] for i in idx], [b[i] for i in idx])
    return total


def test_mutual_information_tiny_cases():
    assert mutual_information([0, 0, 1, 1], [0, 0, 1, 1]) == pytest.approx(1.0)
    assert mutual_information([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert mutual_information(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8])) == pytest.approx(2.0)


def test_information_matches_hand_computed_table():
    assert mutual_information(F, Y) == pytest.approx(mi_by_hand(F, Y), abs=1e-12)
    assert mutual_information(L, Y) == pytest.approx(mi_by_hand(L, Y), abs=1e-12)
    assert conditional_mutual_information(F, Y, L) == pytest.approx(cmi_by_hand(F, Y, L), abs=1e-12)
    pc = performance_correlation(torch.tensor(F), torch.tensor(Y), torch.tensor(L))
    assert pc["mu_y_bits"] == pytest.approx(mi_by_hand(F, Y) - cmi_by_hand(F, Y, L), abs=1e-12)
    assert pc["i_ly_bits"] == pytest.approx(mi_by_hand(L, Y), abs=1e-12)
    assert pc["agreement"] == pytest.approx(sum(f == l for f, l in zip(F, L)) / len(F))
    assert pc["mu_y_bits"] <= pc["i_ly_bits"] + 1e-12


def test_performance_correlation_limits():
    # L constant: conditioning on it changes nothing, I(F;Y|L) = I(F;Y), so mu_Y = 0 = I(L;Y).
    pc = performance_correlation(F, Y, [4] * len(F))
    assert pc["i_fy_given_l_bits"] == pytest.approx(pc["i_fy_bits"], abs=1e-12)
    assert pc["mu_y_bits"] == pytest.approx(0.0, abs=1e-12)
    assert pc["i_ly_bits"] == pytest.approx(0.0, abs=1e-12)
    # F = L: mu_Y reaches its upper bound I(L;Y) = I(F;Y).
    pc = performance_correlation(L, Y, L)
    assert pc["mu_y_bits"] == pytest.approx(pc["i_ly_bits"], abs=1e-12)
    assert pc["mu_y_bits"] == pytest.approx(mi_by_hand(L, Y), abs=1e-12)
    assert pc["agreement"] == 1.0
    # F a function of L: I(F;Y|L) = 0, so mu_Y = I(F;Y).
    g = [x % 2 for x in L]
    pc = performance_correlation(g, Y, L)
    assert pc["mu_y_bits"] == pytest.approx(mi_by_hand(g, Y), abs=1e-12)


def test_information_rejects_bad_input():
    with pytest.raises(CsnError):
        mutual_information([0, 1], [0, 1, 1])
    with pytest.raises(CsnError):
        mutual_information(torch.tensor([0.5, 1.0]), torch.tensor([0, 1]))


# -- linear classifier -------------------------------------------------------------------------

def test_linear_classifier_deterministic_and_learns():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 2, 4, 4, generator=g) * 3
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 2, 4, 4, generator=g) + 50.0  # offset: standardization matters
    m1 = fit_linear_classifier(x, y, 3, epochs=5, lr=1e-2, seed=7)
    m2 = fit_linear_classifier(x, y, 3, epochs=5, lr=1e-2, seed=7)
    assert torch.equal(m1.weight, m2.weight) and torch.equal(m1.bias, m2.bias)
    assert isinstance(m1, nn.Linear) and m1.in_features == 32
    assert accuracy(m1, x, y) > 0.95


# -- linearization -----------------------------------------------------------------------------

def mlp(seed: int, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 3)] if bn else [nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)]
    m = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m


def test_jvp_linearization_matches_central_difference():
    m0, mt = mlp(0), mlp(1)
    mt.train()  # must be put in eval mode by the function and restored afterwards
    x = torch.randn(6, 5, dtype=torch.float64)
    ft, f_lin, f0 = linearized_outputs(mt, m0, x)
    assert mt.training and m0.training  # modes restored (both were in train mode)
    p0 = dict(m0.named_parameters())
    delta = {n: p.detach() - p0[n].detach() for n, p in mt.named_parameters()}
    buffers = dict(m0.named_buffers())
    eps = 1e-5

    def at(s):
        params = {n: p0[n].detach() + s * delta[n] for n in p0}
        return torch.func.functional_call(m0.eval(), (params, buffers), (x,))

    jd = (at(eps) - at(-eps)) / (2 * eps)
    assert torch.allclose(f_lin - f0, jd, atol=1e-8, rtol=0)
    assert torch.allclose(f0, m0.eval()(x), atol=1e-12)
    assert torch.allclose(ft, mt.eval()(x), atol=1e-12)


def test_linear_model_is_its_own_linearization():
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    mt = copy.deepcopy(m0)
    with torch.no_grad():
        for p in mt.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    ft, f_lin, f0 = linearized_outputs(mt, m0, x)
    assert torch.allclose(f_lin, ft, atol=1e-10, rtol=0)
    assert not torch.allclose(f0, ft)


def test_linearization_rejects_different_architectures():
    with pytest.raises(CsnError, match="same architecture"):
        linearized_outputs(mlp(0), mlp(0, bn=False), torch.randn(2, 5, dtype=torch.float64))


# -- ReLU patterns -----------------------------------------------------------------------------

class Reuse(nn.Module):
    """One nn.ReLU module used twice per forward (like torchvision's BasicBlock)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.c = nn.Linear(6, 3)
        self.relu_out = nn.ReLU(inplace=True)

    def forward(self, x):
        h = self.relu(self.a(x))
        h = self.relu(self.b(h))
        return self.relu_out(self.c(h))


def naive_states(m: Reuse, x):
    h1 = m.a(x)
    h2 = m.b(torch.relu(h1))
    h3 = m.c(torch.relu(h2))
    return [h1 > 0, h2 > 0, h3 > 0]


def test_relu_agreement_identical_and_naive():
    torch.manual_seed(0)
    ma, mb = Reuse(), Reuse()
    xs = [torch.randn(5, 4), torch.randn(7, 4)]
    assert relu_agreement(ma, copy.deepcopy(ma), xs) == 1.0
    assert relu_agreement(ma, ma, xs) == 1.0
    eq = tot = 0
    with torch.no_grad():
        for x in xs:
            for sa, sb in zip(naive_states(ma, x), naive_states(mb, x)):
                eq += int((sa == sb).sum())
                tot += sa.numel()
    assert relu_agreement(ma, mb, [(x, None) for x in xs]) == pytest.approx(eq / tot, abs=1e-15)
    with relu_patterns(ma) as store, torch.no_grad():
        ma(xs[0])
    assert len(store["relu"]) == 2 and len(store["relu_out"]) == 1


# -- all measures on one checkpoint -------------------------------------------------------------

class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.relu2(self.fc1(self.relu1(self.bn(self.conv(x))).flatten(1))))


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def test_linearity_measures_keys_and_identities():
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    torch.manual_seed(0)
    m0 = SmallCNN()
    mt = copy.deepcopy(m0)
    with torch.no_grad():
        for p in mt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    linear = fit_linear_classifier(x, y, 3, epochs=2, lr=1e-2, seed=0)
    mt.train()
    out = linearity_measures(mt, m0, loader, model_prev=copy.deepcopy(mt), linear_model=linear)
    assert mt.training
    for key in ["test_acc", "linear_agreement", "mu_y_bits", "i_ly_bits", "i_fy_bits", "linearized_agreement_init",
                "linearized_rel_dist_init", "linearized_agreement_prev", "linearized_rel_dist_prev",
                "relu_same_as_init", "relu_same_as_prev"]:
        assert key in out, key
    assert out["relu_same_as_prev"] == 1.0 and out["linearized_agreement_prev"] == 1.0
    assert math.isnan(out["linearized_rel_dist_prev"])  # f_t == f_prev: the ratio is undefined
    assert 0.5 < out["relu_same_as_init"] < 1.0
    assert 0.0 < out["linearized_rel_dist_init"] < 1.0  # small step: close to linear
    assert out["mu_y_bits"] <= out["i_ly_bits"] + 1e-12
    # streaming ReLU count equals the whole-split computation; linearized agreement equals a direct one
    assert out["relu_same_as_init"] == pytest.approx(relu_agreement(mt, m0, [x]), abs=1e-12)
    ft, f_lin, f0 = linearized_outputs(mt, m0, x)
    assert out["linearized_agreement_init"] == pytest.approx(float((ft.argmax(1) == f_lin.argmax(1)).float().mean()))
    rel = float((ft - f_lin).double().norm() / (ft - f0).double().norm())
    assert out["linearized_rel_dist_init"] == pytest.approx(rel, rel=1e-5)
    # optional inputs left out; the same object as init is handled
    out0 = linearity_measures(mt, mt, loader)
    assert set(out0) == {"test_acc", "linearized_agreement_init", "linearized_rel_dist_init", "relu_same_as_init"}
    assert out0["relu_same_as_init"] == 1.0 and out0["linearized_agreement_init"] == 1.0
