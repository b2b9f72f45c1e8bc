"""CSI, class statistics and batch CSI against naive float64 references (loops over images/classes)."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from csn.analysis.selectivity import (
    class_means_frame,
    class_selectivity,
    collect_class_stats,
    csi_for_classes,
    selectivity_frame,
)
from csn.core.stats import EPS, STUDY_EPS, ClassStats, batch_csi, csi_from_means
from csn.errors import CsnError

torch.set_num_threads(1)

K = 4
COUNTS = [18, 10, 7, 5]  # unbalanced on purpose
COLUMNS = ["layer", "stage", "unit", "csi", "pref_class", "mu_max", "mu_rest", "dead", "eta2"]


# ------------------------------------------------------------------------------------------------
# fixtures and naive references
# ------------------------------------------------------------------------------------------------

def conv_net(seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """Small conv net: read points 0 (pre-ReLU conv), 1, 3 (ReLU), 6 (linear logits); channel 0 of '3' is dead."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 5, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, K),
    )
    with torch.no_grad():
        net[2].weight[0].zero_()
        net[2].bias[0] = -1.0  # ReLU output of channel 0 of layer '3' is exactly zero everywhere
    return net.to(dtype)


class TokenNet(nn.Module):
    """Token model: [N, T, 4] -> embed (3-D, negative) -> ReLU (3-D) -> mean over tokens -> head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, K)

    def forward(self, x):
        return self.head(self.act(self.embed(x)).mean(1))


def labels_unbalanced(seed: int = 0, counts=COUNTS) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=g)]


def make_batches(x: torch.Tensor, y: torch.Tensor, b: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + b], y[i:i + b]) for i in range(0, len(y), b)]


def image_data(seed: int = 0, counts=COUNTS, dtype=torch.float64):
    y = labels_unbalanced(seed, counts)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(y), 3, 6, 6, generator=g, dtype=torch.float64).to(dtype)
    return x, y


def naive_unit_acts_seq(net: nn.Sequential, x: torch.Tensor, layer: int) -> list[list[float]]:
    """Per image (one at a time, float64), the unit activations of child `layer` via explicit loops."""
    net = copy.deepcopy(net).double().eval()
    rows = []
    with torch.no_grad():
        for i in range(len(x)):
            h = x[i:i + 1].double()
            for j in range(layer + 1):
                h = net[j](h)
            rows.append(naive_reduce(h[0]))
    return rows


def naive_reduce(h: torch.Tensor) -> list[float]:
    """Unit values of one example's output: channel spatial mean / token mean / the feature."""
    if h.dim() == 3:  # [C, H, W]
        c, hh, ww = h.shape
        return [sum(float(h[ci, a, b]) for a in range(hh) for b in range(ww)) / (hh * ww) for ci in range(c)]
    if h.dim() == 2:  # tokens [T, D]
        t, d = h.shape
        return [sum(float(h[ti, di]) for ti in range(t)) / t for di in range(d)]
    return [float(v) for v in h]


def naive_class_means(rows: list[list[float]], y: torch.Tensor, k: int, sums: bool = False) -> list[list[float]]:
    """[K][U] class means (or sums) by loops."""
    u = len(rows[0])
    out = []
    for c in range(k):
        members = [rows[i] for i in range(len(rows)) if int(y[i]) == c]
        tot = [sum(r[j] for r in members) for j in range(u)]
        out.append(tot if sums else [t / len(members) for t in tot])
    return out


def naive_csi(means: list[list[float]], eps: float = EPS):
    """Per unit (csi, pref, mu_max, mu_rest) from [K][U] means, by loops."""
    k, u = len(means), len(means[0])
    res = []
    for j in range(u):
        col = [means[c][j] for c in range(k)]
        pref = max(range(k), key=lambda c: col[c])
        mx = col[pref]
        rest = sum(col[c] for c in range(k) if c != pref) / (k - 1)
        res.append(((mx - rest) / (mx + rest + eps), pref, mx, rest))
    return res


def naive_eta2(rows: list[list[float]], y: torch.Tensor, k: int) -> list[float]:
    n, u = len(rows), len(rows[0])
    out = []
    for j in range(u):
        xs = [rows[i][j] for i in range(n)]
        m = sum(xs) / n
        total = sum((v - m) ** 2 for v in xs)
        between = 0.0
        for c in range(k):
            cx = [xs[i] for i in range(n) if int(y[i]) == c]
            mk = sum(cx) / len(cx)
            between += len(cx) * (mk - m) ** 2
        out.append(between / total if total > 0 else 0.0)
    return out


def assert_layer_matches(frame: pd.DataFrame, layer: str, rows, y, *, eps=EPS, sums=False, rtol=1e-10, atol=1e-12, eta2_rtol=1e-9):
    sub = frame[frame.layer == layer].sort_values("unit")
    ref = naive_csi(naive_class_means(rows, y, K, sums=sums), eps)
    dead = [all(r[j] == 0 for r in rows) for j in range(len(rows[0]))]
    np.testing.assert_array_equal(sub["dead"].to_numpy(), dead)
    exp_csi = [0.0 if d else r[0] for r, d in zip(ref, dead)]
    exp_pref = [-1 if d else r[1] for r, d in zip(ref, dead)]
    np.testing.assert_allclose(sub["csi"].to_numpy(), exp_csi, rtol=rtol, atol=atol)
    np.testing.assert_array_equal(sub["pref_class"].to_numpy(), exp_pref)
    np.testing.assert_allclose(sub["mu_max"].to_numpy(), [r[2] for r in ref], rtol=rtol, atol=atol)
    np.testing.assert_allclose(sub["mu_rest"].to_numpy(), [r[3] for r in ref], rtol=rtol, atol=atol)
    if not sums:
        np.testing.assert_allclose(sub["eta2"].to_numpy(), naive_eta2(rows, y, K), rtol=eta2_rtol, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# CSI tables vs naive references
# ------------------------------------------------------------------------------------------------

def test_conv_net_matches_naive_reference_unbalanced():
    net = conv_net()
    x, y = image_data()
    frame = class_selectivity(net, make_batches(x, y), layers=["0", "1", "3", "6"], num_classes=K, progress=False)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == 6 + 6 + 5 + K
    for layer in (0, 1, 3, 6):
        rows = naive_unit_acts_seq(net, x, layer)
        assert_layer_matches(frame, str(layer), rows, y)
    # the dead unit of '3' is reported as dead, with CSI exactly 0; the others are alive
    l3 = frame[frame.layer == "3"].sort_values("unit")
    assert l3["dead"].tolist() == [True, False, False, False, False]
    assert l3["csi"].iloc[0] == 0.0 and l3["pref_class"].iloc[0] == -1
    # the pre-ReLU layer really is negative-valued, and is not clipped to [0, 1]
    rows0 = naive_unit_acts_seq(net, x, 0)
    assert min(min(r) for r in rows0) < 0
    assert frame[frame.layer == "0"]["mu_rest"].min() < 0


def test_token_layer_matches_naive_reference():
    net = TokenNet().double()
    y = labels_unbalanced(3)
    x = torch.randn(len(y), 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    frame = class_selectivity(net, make_batches(x, y, 9), layers=["embed", "act"], num_classes=K, progress=False)
    for name, mods in (("embed", [net.embed]), ("act", [net.embed, net.act])):
        rows = []
        with torch.no_grad():
            for i in range(len(x)):
                h = x[i]
                for m in mods:
                    h = m(h)
                rows.append(naive_reduce(h))  # [T, D] -> mean over tokens per hidden feature
        assert_layer_matches(frame, name, rows, y)
    assert (frame[frame.layer == "act"].shape[0]) == 6  # units are hidden features, not tokens


def test_float32_model_within_float32_tolerance():
    net = conv_net(dtype=torch.float32)
    x, y = image_data(dtype=torch.float32)
    frame = class_selectivity(net, make_batches(x, y), layers=["1", "3"], num_classes=K, progress=False)
    for layer in (1, 3):
        rows = naive_unit_acts_seq(net, x, layer)
        assert_layer_matches(frame, str(layer), rows, y, rtol=1e-5, atol=1e-6, eta2_rtol=1e-5)


def test_num_classes_inferred_equals_given():
    net = conv_net()
    x, y = image_data()
    a = class_selectivity(net, make_batches(x, y), layers=["1"], num_classes=K, progress=False)
    b = class_selectivity(net, make_batches(x, y), layers=["1"], num_classes=None, progress=False)
    pd.testing.assert_frame_equal(a, b)


def test_default_layers_stage_column_and_mode_restored():
    net = conv_net()
    net.csn_stages = {"early": ["1"], "late": ["3"]}
    net.train()
    net[2].eval()  # mixed modes must be restored exactly
    x, y = image_data()
    frame = class_selectivity(net, make_batches(x, y), num_classes=K, progress=False)
    assert frame.groupby("layer")["stage"].first().to_dict() == {"1": "early", "3": "late"}
    assert net.training and not net[2].training and net[0].training
    assert all(len(m._forward_hooks) == 0 for m in net.modules())


# ------------------------------------------------------------------------------------------------
# study variant
# ------------------------------------------------------------------------------------------------

def test_study_variant_uses_sums_and_study_eps():
    net = conv_net()
    x, y = image_data()
    stats = collect_class_stats(net, make_batches(x, y), ["1", "3"], K, progress=False)
    study = selectivity_frame(stats, variant="study")
    mean = selectivity_frame(stats, variant="mean")
    for layer in (1, 3):
        rows = naive_unit_acts_seq(net, x, layer)
        assert_layer_matches(study, str(layer), rows, y, eps=STUDY_EPS, sums=True)
    # on unbalanced data, sums weight classes by size: the two variants differ clearly
    alive = ~mean["dead"]
    assert (study["csi"][alive] - mean["csi"][alive]).abs().max() > 0.01


def test_study_variant_on_balanced_split_only_changes_eps():
    n = 6
    net = conv_net()
    x, y = image_data(5, counts=[n] * K)
    stats = collect_class_stats(net, make_batches(x, y), ["1", "3"], K, progress=False)
    study = selectivity_frame(stats, variant="study")
    mean = selectivity_frame(stats, variant="mean")
    np.testing.assert_array_equal(study["pref_class"], mean["pref_class"])
    # sums = n * means, so study CSI = CSI of the means with eps / n
    for layer, st in stats.items():
        expected = csi_from_means(st.means(), STUDY_EPS / n).csi.masked_fill(st.dead(), 0).numpy()
        np.testing.assert_allclose(study[study.layer == layer]["csi"], expected, rtol=1e-12, atol=1e-14)
    assert (study["csi"] - mean["csi"]).abs().max() > 0  # eps does differ
    assert (study["csi"] - mean["csi"]).abs().max() < 1e-5


def test_unknown_variant():
    with pytest.raises(CsnError, match="variant"):
        selectivity_frame({}, variant="sum")


# ------------------------------------------------------------------------------------------------
# class means and class subsets
# ------------------------------------------------------------------------------------------------

def test_class_means_frame_and_csi_for_classes():
    net = conv_net()
    x, y = image_data()
    stats = collect_class_stats(net, make_batches(x, y), ["1", "3"], K, progress=False)
    cm = class_means_frame(stats)
    assert list(cm.columns) == ["layer", "unit", "class", "mean"]
    rows = {layer: naive_unit_acts_seq(net, x, layer) for layer in (1, 3)}
    for layer in (1, 3):
        means = naive_class_means(rows[layer], y, K)
        sub = cm[cm.layer == str(layer)]
        for rec in sub.itertuples():
            assert abs(rec.mean - means[rec._3][rec.unit]) < 1e-12

    subset = [3, 0, 2]
    got = csi_for_classes(cm, subset)
    assert list(got.columns) == ["layer", "unit", "csi", "pref_class", "mu_max", "mu_rest", "dead"]
    for layer in (1, 3):
        means = naive_class_means(rows[layer], y, K)
        sub_means = [means[c] for c in sorted(subset)]
        ref = naive_csi(sub_means)
        g = got[got.layer == str(layer)].sort_values("unit")
        np.testing.assert_allclose(g["csi"], [r[0] for r in ref], rtol=1e-10, atol=1e-12)
        exp_pref = [-1 if d else sorted(subset)[r[1]] for r, d in zip(ref, g["dead"])]
        np.testing.assert_array_equal(g["pref_class"], exp_pref)
    # equals recomputing from the stats restricted to the subset
    for layer, st in stats.items():
        r = csi_from_means(st.means()[sorted(subset)])
        g = got[got.layer == layer].sort_values("unit")
        np.testing.assert_allclose(g["csi"], r.csi.masked_fill(st.dead(), 0).numpy(), rtol=1e-12, atol=1e-14)

    # all classes reproduce the full table; extra key columns (step) group separately
    full = selectivity_frame(stats)
    two = pd.concat([cm.assign(step=0), cm.assign(step=5, mean=cm["mean"] * 2 + 1)], ignore_index=True)
    allk = csi_for_classes(two, range(K))
    s0 = allk[allk.step == 0].sort_values(["layer", "unit"])
    np.testing.assert_allclose(s0["csi"], full.sort_values(["layer", "unit"])["csi"], rtol=1e-12, atol=1e-14)
    s5 = allk[allk.step == 5]
    assert len(s5) == len(full) and not np.allclose(s5["csi"].to_numpy(), s0["csi"].to_numpy())


def test_csi_for_classes_errors():
    cm = pd.DataFrame({"layer": "a", "unit": [0, 0], "class": [0, 1], "mean": [1.0, 2.0]})
    with pytest.raises(CsnError, match="class 7"):
        csi_for_classes(cm, [0, 7])
    with pytest.raises(CsnError, match="at least 2"):
        csi_for_classes(cm, [1])


# ------------------------------------------------------------------------------------------------
# eta^2
# ------------------------------------------------------------------------------------------------

def test_eta2_matches_naive_and_is_offset_scale_invariant():
    g = torch.Generator().manual_seed(7)
    y = labels_unbalanced(7)
    acts = torch.rand(len(y), 5, generator=g, dtype=torch.float64) + 0.3 * y[:, None].double() * torch.arange(5)
    st = ClassStats(K)
    st.update(acts[:20], y[:20])
    st.update(acts[20:], y[20:])
    rows = acts.tolist()
    np.testing.assert_allclose(st.eta2().numpy(), naive_eta2(rows, y, K), rtol=1e-10, atol=1e-13)
    assert st.eta2()[4] > 0.3  # class information is there

    shifted = ClassStats(K)
    shifted.update(3.0 * acts + 10.0, y)
    np.testing.assert_allclose(shifted.eta2().numpy(), st.eta2().numpy(), rtol=1e-10, atol=1e-12)
    csi_a = csi_from_means(st.means()).csi
    csi_b = csi_from_means(shifted.means()).csi
    assert (csi_a - csi_b).abs().min() > 1e-3  # an offset changes CSI but not eta2

    const = ClassStats(K)
    const.update(torch.full((len(y), 2), 2.5, dtype=torch.float64), y)
    assert const.eta2().tolist() == [0.0, 0.0]


def test_stats_tensors_sum_across_ranks_and_reduce_hook():
    net = conv_net()
    x, y = image_data()
    full = collect_class_stats(net, make_batches(x, y), ["1"], K, progress=False)["1"]
    a = collect_class_stats(net, make_batches(x[:17], y[:17]), ["1"], K, progress=False)["1"]
    b = collect_class_stats(net, make_batches(x[17:], y[17:]), ["1"], K, progress=False)["1"]
    for ta, tb in zip(a.tensors(), b.tensors()):
        ta.add_(tb)
    for ta, tf in zip(a.tensors(), full.tensors()):
        torch.testing.assert_close(ta, tf, rtol=1e-12, atol=1e-12)

    calls = []

    def fake_all_reduce(t):  # two identical ranks
        calls.append(t.shape)
        t.mul_(2)

    twice = collect_class_stats(net, make_batches(x, y), ["1"], K, progress=False, reduce=fake_all_reduce)["1"]
    assert len(calls) == 3
    assert torch.equal(twice.counts, 2 * full.counts)
    torch.testing.assert_close(twice.means(), full.means(), rtol=1e-12, atol=0)
    out_of_place = collect_class_stats(net, make_batches(x, y), ["1"], K, progress=False, reduce=lambda t: t * 3)["1"]
    assert torch.equal(out_of_place.counts, 3 * full.counts)


def test_classstats_update_vectorized_equals_loop():
    g = torch.Generator().manual_seed(1)
    y = labels_unbalanced(1)
    acts = torch.randn(len(y), 3, generator=g, dtype=torch.float64)
    st = ClassStats()
    st.update(acts, y)
    for k in range(K):
        for j in range(3):
            vals = [float(acts[i, j]) for i in range(len(y)) if int(y[i]) == k]
            assert abs(float(st.sums[k, j]) - sum(vals)) < 1e-12
            assert abs(float(st.sumsq[k, j]) - sum(v * v for v in vals)) < 1e-12
        assert int(st.counts[k]) == COUNTS[k]


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------

def test_one_class_only_is_an_error():
    net = conv_net()
    x, _ = image_data()
    y = torch.zeros(len(x), dtype=torch.long)
    with pytest.raises(CsnError, match="at least 2 classes"):
        class_selectivity(net, make_batches(x, y), layers=["1"], progress=False)


def test_absent_class_is_named():
    net = conv_net()
    x, y = image_data()
    keep = y != 2
    names = ["T-shirt", "Trouser", "Pullover", "Dress"]
    with pytest.raises(CsnError, match=r"class 2 \('Pullover'\) has no examples"):
        class_selectivity(net, make_batches(x[keep], y[keep]), layers=["1"], num_classes=K,
                          class_names=names, progress=False)


def test_label_errors():
    net = conv_net()
    x, y = image_data()
    bad = y.clone()
    bad[30] = K
    with pytest.raises(CsnError, match=f"label {K} is out of range for num_classes={K}"):
        class_selectivity(net, make_batches(x, bad), layers=["1"], num_classes=K, progress=False)
    bad[30] = -1
    with pytest.raises(CsnError, match="label -1 is negative"):
        class_selectivity(net, make_batches(x, bad), layers=["1"], progress=False)
    with pytest.raises(CsnError, match="integer"):
        class_selectivity(net, make_batches(x, y.double()), layers=["1"], num_classes=K, progress=False)


def test_nan_activation_names_layer():
    net = conv_net()
    with torch.no_grad():
        net[2].weight[1, 0, 0, 0] = float("nan")
    x, y = image_data()
    with pytest.raises(CsnError, match="layer '3' produced NaN") as exc:
        class_selectivity(net, make_batches(x, y), layers=["1", "3"], num_classes=K, progress=False)
    assert "'1'" not in str(exc.value)
    stats = collect_class_stats(net, make_batches(x, y), ["1"], K, progress=False)  # layer 1 is fine
    assert torch.isfinite(stats["1"].sums).all()


def test_hooks_removed_and_mode_restored_after_exception():
    net = conv_net()
    net.train()
    x, y = image_data()

    def loader():
        yield x[:8], y[:8]
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError, match="disk died"):
        collect_class_stats(net, loader(), ["1", "3"], K, progress=False)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert all(m.training for m in net.modules())

    with pytest.raises(RuntimeError):  # the forward itself fails (wrong input shape)
        collect_class_stats(net, [(torch.randn(2, 5, 6, 6, dtype=torch.float64), y[:2])], ["1"], K, progress=False)
    assert all(len(m._forward_hooks) == 0 for m in net.modules())
    assert all(m.training for m in net.modules())


def test_unknown_layer_and_empty_loader():
    net = conv_net()
    with pytest.raises(CsnError, match="matches no module"):
        collect_class_stats(net, [], ["nope"], K, progress=False)
    with pytest.raises(CsnError, match="no examples"):
        collect_class_stats(net, [], ["1"], K, progress=False)


def test_progress_bar_runs():
    net = conv_net()
    x, y = image_data()
    stats = collect_class_stats(net, make_batches(x, y), ["1"], K, progress=True, desc="test")
    assert int(stats["1"].counts.sum()) == len(y)


# ------------------------------------------------------------------------------------------------
# csi_from_means and batch CSI
# ------------------------------------------------------------------------------------------------

def test_csi_from_means_naive_and_batched_dims():
    g = torch.Generator().manual_seed(2)
    means = torch.rand(3, 5, 4, generator=g, dtype=torch.float64)  # [..., K, U]
    r = csi_from_means(means)
    for b in range(3):
        ref = naive_csi(means[b].tolist())
        np.testing.assert_allclose(r.csi[b].numpy(), [q[0] for q in ref], rtol=1e-12)
        assert r.pref_class[b].tolist() == [q[1] for q in ref]
    assert torch.equal(csi_from_means(torch.zeros(3, 2)).csi, torch.zeros(2))
    with pytest.raises(CsnError, match="at least 2 classes"):
        csi_from_means(torch.ones(1, 3))


def test_batch_csi_equals_streaming_on_whole_split():
    g = torch.Generator().manual_seed(3)
    y = labels_unbalanced(3)
    acts = torch.rand(len(y), 6, generator=g, dtype=torch.float64) + 0.1 * y[:, None].double()
    acts[:, 2] = 0  # a dead unit in the batch
    st = ClassStats(K)
    st.update(acts, y)
    got = batch_csi(acts, y, K)
    torch.testing.assert_close(got, csi_from_means(st.means()).csi, rtol=1e-12, atol=1e-14)
    ref = naive_csi(naive_class_means(acts.tolist(), y, K))
    np.testing.assert_allclose(got.numpy(), [q[0] for q in ref], rtol=1e-10, atol=1e-12)
    assert got[2] == 0
    study = batch_csi(acts, y, K, eps=STUDY_EPS, class_sums=True)
    ref_s = naive_csi(naive_class_means(acts.tolist(), y, K, sums=True), STUDY_EPS)
    np.testing.assert_allclose(study.numpy(), [q[0] for q in ref_s], rtol=1e-10, atol=1e-12)


def test_batch_csi_uses_present_classes_only_and_none_below_two():
    g = torch.Generator().manual_seed(4)
    y = torch.tensor([0, 2, 2, 0, 2, 0, 0])
    acts = torch.rand(len(y), 3, generator=g, dtype=torch.float64)
    got = batch_csi(acts, y, 5)
    means = [[float(acts[y == c, j].mean()) for j in range(3)] for c in (0, 2)]
    np.testing.assert_allclose(got.numpy(), [q[0] for q in naive_csi(means)], rtol=1e-10)
    assert batch_csi(acts, torch.full_like(y, 3), 5) is None
    assert batch_csi(acts[:0], y[:0], 5) is None


def test_batch_csi_gradcheck():
    g = torch.Generator().manual_seed(5)
    acts = (torch.rand(7, 3, generator=g, dtype=torch.float64) + 0.5).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda a: batch_csi(a, y, 3), (acts,))
    assert torch.autograd.gradcheck(lambda a: batch_csi(a, y, 4, class_sums=True), (acts,))


def test_batch_csi_reduce_gives_global_batch():
    g = torch.Generator().manual_seed(6)
    y = labels_unbalanced(6)
    acts = torch.rand(len(y), 4, generator=g, dtype=torch.float64)
    from csn.core.stats import batch_class_sums

    other = batch_class_sums(acts[20:], y[20:], K)
    local = batch_csi(acts[:20], y[:20], K, reduce=lambda s, c: (s + other[0], c + other[1]))
    torch.testing.assert_close(local, batch_csi(acts, y, K), rtol=1e-12, atol=1e-14)


def test_batch_csi_half_precision_and_float32():
    g = torch.Generator().manual_seed(8)
    y = labels_unbalanced(8)
    acts = torch.rand(len(y), 4, generator=g, dtype=torch.float64)
    ref = batch_csi(acts, y, K)
    f32 = batch_csi(acts.float(), y, K)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), ref, rtol=1e-5, atol=1e-6)
    assert batch_csi(acts.bfloat16(), y, K).dtype == torch.float32
