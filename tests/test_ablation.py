"""Ablation: the context manager, the fast batched sweep vs the naive protocol, summaries, the run driver and CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from csn.analysis import ablation as A
from csn.analysis.ablation import (
    Ablation,
    ablate_units,
    ablation_sweep,
    parse_grid,
    random_units,
    summarize_ablation,
)
from csn.analysis.ablation import analysis as analysis_mod
from csn.analysis.ablation import sweep as sweep_mod
from csn.cli import main as cli
from csn.errors import CsnError
from csn.models import MLP, SmallCNN
from tests.conftest import analyze


def ablate_run(run, **kw):
    """The request's rows of tables/ablation.parquet (the tests' shorthand for run_analysis), ordered by
    step, stage, order, draw, n."""
    df = analyze(Ablation, run, **kw).rows
    return df.sort_values(["step", "stage", "order", "draw", "n"], kind="stable").reset_index(drop=True)


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n=70, c=1, size=8, k=10, bs=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    y = torch.arange(n) % k
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _csi(model, layers, x, seed=0):
    """Random CSI with ties (rounded), shaped like each layer's units."""
    probe = sweep_mod.probe(model.eval(), x[:1], layers)
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.rand(probe.units[layer], generator=g) * 4).round() / 4 for layer in layers}


def _assert_same(fast: pd.DataFrame, naive: pd.DataFrame) -> None:
    keys = ["step", "stage", "order", "n", "draw"]
    assert len(fast) == len(naive) and len(fast) > 0
    m = fast.merge(naive, on=keys, suffixes=("_f", "_n"))
    assert len(m) == len(fast)
    assert (m["correct_f"] == m["correct_n"]).all()
    assert (m["total_f"] == m["total_n"]).all()
    np.testing.assert_array_equal(m["top5_f"].to_numpy(), m["top5_n"].to_numpy())
    np.testing.assert_allclose(m["loss_f"], m["loss_n"], rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------------
# the context manager
# ------------------------------------------------------------------------------------------------

def test_ablate_units_zeroes_exactly_the_intended_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 3, 3, padding=1)).eval()
    x = torch.randn(4, 2, 6, 6)
    seen = {}
    h = model[2].register_forward_pre_hook(lambda m, inp: seen.__setitem__("in", inp[0].clone()))
    try:
        with torch.no_grad():
            model(x)
            ref = seen["in"]
            assert (ref[:, [1, 3]].abs() > 0).any()
            for sel in ([1, 3], torch.tensor([False, True, False, True, False]), np.array([3, 1])):
                with ablate_units(model, {"1": sel}):
                    model(x)
                got = seen["in"]
                assert torch.equal(got[:, [1, 3]], torch.zeros_like(got[:, [1, 3]]))
                assert torch.equal(got[:, [0, 2, 4]], ref[:, [0, 2, 4]])
            with ablate_units(model, {"1": [2]}, mode="mean", means={"1": torch.arange(5.0)}):
                model(x)
            got = seen["in"]
            assert torch.equal(got[:, 2], torch.full_like(got[:, 2], 2.0))
            assert torch.equal(got[:, [0, 1, 3, 4]], ref[:, [0, 1, 3, 4]])
    finally:
        h.remove()


def test_ablate_units_on_linear_and_token_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    seen = {}
    model[2].register_forward_pre_hook(lambda m, inp: seen.__setitem__("in", inp[0].clone()))
    for x in (torch.randn(3, 4), torch.randn(3, 5, 4)):  # [N, F] features and [N, T, D] tokens
        with torch.no_grad():
            model(x)
            ref = seen["in"]
            with ablate_units(model, {"1": [0, 5]}):
                model(x)
        got = seen["in"]
        assert torch.equal(got[..., [0, 5]], torch.zeros_like(got[..., [0, 5]]))  # hidden features, never tokens
        assert torch.equal(got[..., 1:5], ref[..., 1:5])


def test_hooks_removed_after_exit_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x = torch.randn(3, 4)
    ref = model(x)

    def no_hooks():
        return all(not m._forward_hooks for m in model.modules())

    with pytest.raises(ValueError), ablate_units(model, {"1": [0, 1, 2]}):
        raise ValueError("boom")
    assert no_hooks() and torch.equal(model(x), ref)
    with pytest.raises(CsnError, match="out of range"), ablate_units(model, {"1": [6]}):
        model(x)
    assert no_hooks()
    with pytest.raises(CsnError, match="matches no module"), ablate_units(model, {"0": [1], "nope": [0]}):
        pass
    assert no_hooks()
    with pytest.raises(CsnError, match="mode"), ablate_units(model, {"1": [0]}, mode="bogus"):
        pass
    with pytest.raises(CsnError, match="means"), ablate_units(model, {"1": [0]}, mode="mean"):
        pass
    assert no_hooks() and torch.equal(model(x), ref)


# ------------------------------------------------------------------------------------------------
# grids, orders, seeds
# ------------------------------------------------------------------------------------------------

def test_grids():
    assert parse_grid(None).counts(16) == [0, 1, 2, 3, 4, 6, 8, 10, 12, 16]
    assert parse_grid(None).counts(64) == [0, 1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 64]
    assert parse_grid("0,1,2,4").counts(8) == [0, 1, 2, 4]
    assert parse_grid("2,4").counts(8) == [0, 2, 4]  # the unablated point is always there
    assert parse_grid("f:0,0.1,0.5,1").counts(10) == [0, 1, 5, 10]
    assert parse_grid([0, 3]).counts(3) == [0, 3] and parse_grid([0.0, 0.5]).kind == "fraction"
    for bad, msg in (("0,4,2", "not increasing"), ("0,2,2", "not increasing"), ("f:0,1.5", "above 1"),
                     ("a,b", "bad grid"), ("-1,2", "negative"), ("", None)):
        if msg is None:
            assert parse_grid(bad).kind == "fraction"
            continue
        with pytest.raises(CsnError, match=msg):
            parse_grid(bad)
    with pytest.raises(CsnError, match="larger than the 8 units"):
        parse_grid("0,9").counts(8, "layer1")


def test_ranking_ties_and_seeded_draws():
    csi = torch.tensor([0.5, 0.9, 0.5, 0.1, 0.9])
    assert A.rank_units(csi, "selective").tolist() == [1, 4, 0, 2, 3]
    assert A.rank_units(csi, "least").tolist() == [3, 0, 2, 1, 4]
    a = random_units(32, 8, seed=0, step=4, stage="layer1", layer="layer1.0", draw=0)
    assert np.array_equal(a, random_units(32, 8, seed=0, step=4, stage="layer1", layer="layer1.0", draw=0))
    others = [random_units(32, 8, seed=0, step=4, stage="layer1", layer="layer1.0", draw=d) for d in (1, 2)]
    assert all(set(a) != set(o) for o in others)
    assert set(a) != set(random_units(32, 8, seed=1, step=4, stage="layer1", layer="layer1.0", draw=0))
    assert len(set(a)) == 8
    # independent of the process and its hash salt
    code = ("from csn.analysis.ablation import random_units;"
            "print(random_units(32, 8, seed=0, step=4, stage='layer1', layer='layer1.0', draw=0).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    assert out.strip() == str(a.tolist())


def test_orders_and_draws_validated():
    with pytest.raises(CsnError, match="unknown order 'bogus'"):
        A.check_orders("selective,bogus", 3)
    with pytest.raises(CsnError, match="draws must be"):
        A.check_orders("random", 0)
    with pytest.raises(CsnError, match="repeats"):
        A.check_orders(["random", "random"], 1)


# ------------------------------------------------------------------------------------------------
# fast path == naive
# ------------------------------------------------------------------------------------------------

def _plain_sequential():
    torch.manual_seed(1)
    return _randomize_bn(nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)))


MODELS = {
    "smallcnn": (lambda: (torch.manual_seed(0), _randomize_bn(SmallCNN(10, 1, width=0.5)))[1], None),
    "mlp": (lambda: (torch.manual_seed(0), MLP(10, 1, image_size=8, hidden=(32, 16)).eval())[1], None),
    "sequential": (_plain_sequential, {"early": ["2"], "late": ["5"]}),
}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("grid,max_masks", [(None, None), ("0,1,2,4", 3), ("f:0,0.3,1", 1)])
def test_fast_path_equals_naive(name, grid, max_masks):
    build, stages = MODELS[name]
    model = build()
    stage_layers = stages or {k: list(v) for k, v in model.csn_stages.items()}
    data = _data()
    csi = _csi(model, [la for ls in stage_layers.values() for la in ls], data[0][0])
    kw = {"grid": grid, "draws": 2, "num_classes": 10, "max_batch_masks": max_masks, "step": 7}
    fast = ablation_sweep(model, data, stage_layers, csi, **kw)
    naive = ablation_sweep(model, data, stage_layers, csi, naive=True, **kw)
    _assert_same(fast, naive)
    assert fast["top5"].notna().all() and set(fast["order"]) == set(A.ORDERS)
    assert (fast.groupby(["stage", "order", "draw"])["n"].min() == 0).all()


def test_fast_path_mean_mode_and_tight_memory_budget_equal_naive():
    model = MODELS["smallcnn"][0]()
    stage_layers = {k: list(v) for k, v in model.csn_stages.items()}
    data = _data()
    csi = _csi(model, [la for ls in stage_layers.values() for la in ls], data[0][0])
    g = torch.Generator().manual_seed(3)
    means = {k: torch.rand(v.numel(), generator=g) for k, v in csi.items()}
    kw = {"grid": "0,2,5,8", "draws": 2, "num_classes": 10, "mode": "mean", "means": means}
    fast = ablation_sweep(model, data, stage_layers, csi, max_elements=1, **kw)  # budget forces one mask per pass
    _assert_same(fast, ablation_sweep(model, data, stage_layers, csi, naive=True, **kw))


def test_stage_input_computed_once_per_batch():
    model = MODELS["mlp"][0]()
    data = _data()
    csi = _csi(model, ["relu2"], data[0][0])
    rows = []
    model.fc1.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    model.fc2.register_forward_hook(lambda m, i, o: rows.append(-o.shape[0]))
    df = ablation_sweep(model, data, {"hidden2": ["relu2"]}, csi, grid="0,1,2,4", draws=3, num_classes=10)
    prefix = [r for r in rows if r > 0]
    suffix = [-r for r in rows if r < 0]
    assert prefix == [1] + [len(y) for _, y in data]  # the probe, then once per batch
    assert len(df) == 4 * 5  # n in 0,1,2,4 x (selective, least, 3 random draws)
    distinct, rest = divmod(sum(suffix) - 1, 70)  # every distinct mask scored once over the 70 examples
    assert rest == 0 and 1 + 3 * 3 <= distinct <= 1 + 3 * 5  # n=0 shared; at n>0 random may repeat a ranking
    assert len(suffix) - 1 == len(data)  # all masks of a batch share one forward pass


class _OomAbove(nn.Module):
    """Raises an out-of-memory error for batches above a size (to exercise automatic splitting)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.fired = 0

    def forward(self, x):
        if x.shape[0] > self.limit:
            self.fired += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate (test)")
        return x


def test_out_of_memory_halves_the_masks_per_pass():
    model = _plain_sequential()
    model.insert(4, _OomAbove(limit=2 * 32))
    data = _data()
    stage_layers = {"early": ["2"]}
    csi = _csi(model, ["2"], data[0][0])
    fast = ablation_sweep(model, data, stage_layers, csi, grid="0,1,2,3,6", draws=3, num_classes=10)
    assert model[4].fired > 0
    _assert_same(fast, ablation_sweep(model, data, stage_layers, csi, grid="0,1,2,3,6", draws=3, num_classes=10,
                                      naive=True))


def test_sweep_bad_input():
    model = MODELS["mlp"][0]()
    data = _data()
    csi = _csi(model, ["relu1"], data[0][0])
    with pytest.raises(CsnError, match="matches no module"):
        ablation_sweep(model, data, {"s": ["relu9"]}, csi, num_classes=10)
    with pytest.raises(CsnError, match="larger than the 16 units"):
        ablation_sweep(model, data, {"hidden2": ["relu2"]}, {"relu2": torch.zeros(16)}, grid="0,17", num_classes=10)
    with pytest.raises(CsnError, match="no CSI given"):
        ablation_sweep(model, data, {"hidden2": ["relu2"]}, csi, num_classes=10)
    with pytest.raises(CsnError, match="has 3 values"):
        ablation_sweep(model, data, {"hidden1": ["relu1"]}, {"relu1": torch.zeros(3)}, num_classes=10)
    with pytest.raises(CsnError, match="re-iterable"):
        ablation_sweep(model, iter(data), {"hidden1": ["relu1"]}, csi, num_classes=10)
    # random order needs no CSI
    df = ablation_sweep(model, data, {"hidden2": ["relu2"]}, {}, orders="random", grid="0,8", draws=2, num_classes=10)
    assert len(df) == 4


# ------------------------------------------------------------------------------------------------
# a real (tiny) trained ResNet
# ------------------------------------------------------------------------------------------------

def test_resnet_checkpoints_n0_all_units_and_naive(tiny_run):
    from csn.analysis.base import eval_loader
    from csn.runs import Run

    run = Run(tiny_run)
    model = run.load_model()
    data = run.dataset()
    loader = eval_loader(run, data, "test")
    stage_layers = {k: list(v) for k, v in model.csn_stages.items()}
    x0 = next(iter(loader))[0]
    csi = _csi(model, [la for ls in stage_layers.values() for la in ls], x0)
    fast = ablation_sweep(model, loader, stage_layers, csi, grid="f:0,0.25,1", draws=2, num_classes=4)
    assert fast["top5"].isna().all()  # 4 classes: no top-5
    # n = 0 is the unablated network
    with torch.no_grad():
        xs, ys = zip(*[(x, y) for x, y in loader])
        x, y = torch.cat(xs), torch.cat(ys)
        logits = model(x)
    correct = int((logits.argmax(1) == y).sum())
    assert (fast.loc[fast["n"] == 0, "correct"] == correct).all()
    # every unit of layer1's blocks zeroed: layer2 sees zeros, so the output no longer depends on the input
    with torch.no_grad():
        h = model.forward_until("layer2", x[:1])
        const = model.forward_from("layer2", torch.zeros_like(h))
    full = fast[(fast["stage"] == "layer1") & (fast["fraction"] == 1.0)]
    assert (full["correct"] == int((y == const.argmax(1)).sum())).all()
    ce = float(torch.nn.functional.cross_entropy(const.expand(len(y), -1), y))
    np.testing.assert_allclose(full["loss"], ce, rtol=1e-5)
    # the run driver: fast == naive on real checkpoints (BN re-estimated early), rows are complete
    a = ablate_run(tiny_run, checkpoints="step=0,last", grid="0,1,3,8", draws=2, progress=False)
    os.remove(run.table_path("ablation"))
    b = ablate_run(tiny_run, checkpoints="step=0,last", grid="0,1,3,8", draws=2, naive=True, progress=False)
    _assert_same(a, b)
    assert list(a.columns) == A.ABLATION_COLUMNS
    assert set(a["step"]) == {0, 16} and (a.loc[a["step"] == 0, "bn_recalibrated"] > 0).all()
    # same seed, same draws; another seed, other random rows (same selective rows)
    os.remove(run.table_path("ablation"))
    c = ablate_run(tiny_run, checkpoints="step=0,last", grid="0,1,3,8", draws=2, progress=False)
    pd.testing.assert_frame_equal(a, c)
    # another seed is another configuration: refused for this table (the one compatibility rule), kept beside it
    with pytest.raises(CsnError, match=r"holds seed=0 but this request asks for seed=5; pass --seed 0 to use it, "
                                       r"--tag NAME to keep a separate table"):
        ablate_run(tiny_run, checkpoints="step=0,last", grid="0,1,3,8", draws=2, progress=False, seed=5)
    d = ablate_run(tiny_run, checkpoints="step=0,last", grid="0,1,3,8", draws=2, progress=False, seed=5, tag="seed5")
    assert len(pd.read_parquet(run.table_path("ablation"))) == len(a)  # untouched
    assert len(pd.read_parquet(run.table_path("ablation-seed5"))) == len(a)  # its own rows, not appended
    assert (d["seed"] == 5).all()
    def sel(df, o):
        return df[(df["order"] == o) & (df["n"] > 0) & (df["n"] < 8)].reset_index(drop=True)
    assert sel(a, "selective")["correct"].tolist() == sel(d, "selective")["correct"].tolist()
    assert sel(a, "random")["correct"].tolist() != sel(d, "random")["correct"].tolist()


def test_resume_per_checkpoint(tiny_run, monkeypatch):
    from csn.runs import Run

    run = Run(tiny_run)
    real = analysis_mod.ablation_sweep
    seen = []

    def failing(*args, step, **kw):
        seen.append(step)
        if step == 4:
            raise KeyboardInterrupt
        return real(*args, step=step, **kw)

    monkeypatch.setattr(analysis_mod, "ablation_sweep", failing)
    kw = {"checkpoints": "step=0,step=4,step=8", "grid": "0,2,8", "draws": 2, "stages": "layer1,layer3", "progress": False}
    with pytest.raises(KeyboardInterrupt):
        ablate_run(tiny_run, **kw)
    partial = pd.read_parquet(run.table_path("ablation"))
    assert set(partial["step"]) == {0}  # only the finished checkpoint, complete
    assert len(partial) == 2 * 3 * 4  # stages x grid x (selective + 2 random + least)
    seen.clear()
    monkeypatch.setattr(analysis_mod, "ablation_sweep",
                        lambda *a, step, **k: (seen.append(step), real(*a, step=step, **k))[1])
    df = ablate_run(tiny_run, **kw)
    assert seen == [4, 8] and set(df["step"]) == {0, 4, 8} and len(df) == 3 * 24
    seen.clear()
    ablate_run(tiny_run, **kw)
    assert seen == []  # all done
    ablate_run(tiny_run, **{**kw, "grid": "0,2,4,8"})
    assert seen == [0, 4, 8]  # another grid: recomputed, old rows replaced
    assert len(pd.read_parquet(run.table_path("ablation"))) == 3 * 2 * 4 * 4
    swept = []
    monkeypatch.setattr(analysis_mod, "ablation_sweep",
                        lambda *a, step, **k: (swept.append((step, list(a[2]))), real(*a, step=step, **k))[1])
    df = ablate_run(tiny_run, **{**kw, "grid": "0,2,4,8", "stages": "layer1,layer2,layer3"})
    assert swept == [(0, ["layer2"]), (4, ["layer2"]), (8, ["layer2"])]  # only the stage the table lacks
    assert len(df) == 3 * 3 * 4 * 4 and set(df["stage"]) == {"layer1", "layer2", "layer3"}
    ablate_run(tiny_run, **{**kw, "grid": "0,1,8", "checkpoints": "step=0"})  # a grid the table lacks: the stages are redone
    table = pd.read_parquet(run.table_path("ablation"))
    at0 = table[(table["step"] == 0) & table["stage"].isin(["layer1", "layer3"])]
    assert sorted(set(at0["n"])) == [0, 1, 8]  # never the union of two grids: n=2 and n=4 were replaced
    assert sorted(set(table[table["step"] == 4]["n"])) == [0, 2, 4, 8]  # other checkpoints untouched


def test_ranking_taken_from_selectivity_table_when_it_matches(tiny_run, monkeypatch):
    from csn.analysis.base import eval_loader
    from csn.runs import Run

    run = Run(tiny_run)
    csi = torch.tensor([0.3, 0.1, 0.7, 0.0, 0.5, 0.2, 0.6, 0.4])
    table = pd.DataFrame({"step": 16, "epoch": 2.0, "layer": "layer1.0", "stage": "layer1", "unit": np.arange(8),
                          "csi": csi.numpy(), "pref_class": 0, "mu_max": 1.0, "mu_rest": 0.5, "dead": False,
                          "eta2": 0.1, "split": "test", "bn_recalibrated": 0, "variant": "mean", "n_images": 128})
    run.write("selectivity", table)  # a whole table: a table without its declared columns is refused on read
    calls = []
    real = analysis_mod.means_and_csi
    monkeypatch.setattr(analysis_mod, "means_and_csi", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    kw = {"stages": "layer1", "checkpoints": "last", "orders": "selective,least", "grid": "0,1,2,5",
          "progress": False}
    got = ablate_run(tiny_run, **kw)
    assert calls == []
    model = run.load_model()
    want = ablation_sweep(model, eval_loader(run, run.dataset(), "test"), {"layer1": ["layer1.0"]},
                          {"layer1.0": csi}, orders="selective,least", grid="0,1,2,5", num_classes=4, step=16)
    assert got["correct"].tolist() == want.sort_values(["order", "draw", "n"])["correct"].tolist()
    with pytest.raises(CsnError, match="holds rank_split=test but this request asks for rank_split=train"):
        ablate_run(tiny_run, **kw, rank_split="train")  # another rank split: another table
    assert calls == []
    ablate_run(tiny_run, **kw, rank_split="train", tag="train")  # the table has no train-split CSI: computed here
    assert calls == [1]


def test_options_validated_once():
    with pytest.raises(CsnError, match="ablation option 'draws' must be >= 1, got 0"):
        Ablation(draws=0)
    with pytest.raises(CsnError, match="ablation option 'max_batch_masks' must be >= 1"):
        Ablation(max_batch_masks=0)
    with pytest.raises(CsnError, match="ablation option 'mode'"):
        Ablation(mode="bogus")
    assert Ablation(grid=[0, 0.5, 1.0]).options.grid == "f:0.0,0.5,1.0"
    assert Ablation(grid=[0, 2, 4]).options.grid == "0,2,4"
    assert parse_grid(Ablation(grid=parse_grid("f:0,0.25,1")).options.grid) == parse_grid("f:0,0.25,1")
    assert Ablation(samples="all").options.samples is None
    assert Ablation(orders="selective,random").options.orders == ("selective", "random")


def test_compute_with_unshared_checkpoints_and_progress_in_points(tiny_run):
    """--distribute checkpoints: compute with ctx.shared=False (no collective) gives the same rows; the bar counts
    points (checkpoints x stages x grid points), advanced by whole points from the sweep."""
    from csn.analysis import base
    from csn.runs import Run

    class Bar:
        def __init__(self):
            self.n, self.ticks = 0, []

        def update(self, k):
            self.n += k
            self.ticks.append(k)

    analysis = Ablation(grid="0,2,8", draws=2, stages="layer1,layer3")
    ctx = base._context(Run(tiny_run), analysis, base.RunOptions(checkpoints="last", progress=False), None,
                        lambda s: None)
    ckpt = ctx.checkpoints[0]
    expected = analysis.expected(ctx, ckpt)
    rows = {}
    for shared in (True, False):
        ctx.shared, ctx.progress = shared, Bar()
        ctx.state = analysis.prepare(ctx, [ckpt])
        rows[shared] = analysis.compute(ctx, ckpt, expected)["ablation"]
        assert ctx.progress.n == analysis.work(ctx, ckpt) == len(expected["ablation"]) == 2 * 3 * 4
        assert all(isinstance(k, int) for k in ctx.progress.ticks)
    pd.testing.assert_frame_equal(rows[True], rows[False])
    assert list(rows[True].columns) == A.ABLATION_COLUMNS and len(rows[True]) == 2 * 3 * 4


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

def test_summaries_normalize_integrate_and_gap():
    rows = []
    frac = [0.0, 0.5, 1.0]
    curves = {("selective", 0): [0.8, 0.4, 0.2], ("least", 0): [0.8, 0.8, 0.2],
              ("random", 0): [0.8, 0.6, 0.2], ("random", 1): [0.8, 0.7, 0.2]}
    for (order, draw), accs in curves.items():
        for f, acc in zip(frac, accs):
            rows.append({"step": 3, "epoch": 0.5, "stage": "layer1", "order": order, "n": int(f * 8), "fraction": f,
                         "draw": draw, "top1": acc, "top5": 1.0, "loss": 1.0, "correct": 0, "total": 10})
    s = summarize_ablation(pd.DataFrame(rows))
    assert np.allclose(s.curves.loc[s.curves["order"] == "selective", "top1_norm"], [1.0, 0.5, 0.25])
    area = s.areas.set_index(["order", "draw"])["area"]
    assert area[("selective", 0)] == pytest.approx(0.5 * (1 + 0.5) / 2 + 0.5 * (0.5 + 0.25) / 2)
    r = [np.trapezoid(np.array(v) / 0.8, frac) for k, v in curves.items() if k[0] == "random"]
    g = s.gaps.iloc[0]
    assert g["gap"] == pytest.approx(area[("selective", 0)] - np.mean(r))
    assert g["gap_std"] == pytest.approx(np.std(r, ddof=1)) and g["gap_se"] == pytest.approx(np.std(r, ddof=1) / np.sqrt(2))
    assert g["draws"] == 2 and g["least_area"] == pytest.approx(area[("least", 0)])


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_happy_path(tiny_run):
    res = CliRunner().invoke(cli, ["ablate", str(tiny_run), "--checkpoints", "step=0,last", "--grid", "f:0,0.5,1",
                                   "--draws", "2", "--plot", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "tables/ablation.parquet" in res.output and "layer1: first" in res.output and "; last" in res.output
    df = pd.read_parquet(tiny_run / "tables" / "ablation.parquet")
    assert set(df["step"]) == {0, 16} and set(df["stage"]) == {"layer1", "layer2", "layer3"}
    assert (tiny_run / "report" / "ablation_curves.png").is_file() and (tiny_run / "report" / "ablation_area.svg").is_file()
    assert CliRunner().invoke(cli, ["ablate", "--help"]).exit_code == 0


@pytest.mark.parametrize("args,message", [
    (["--stages", "layer9"], "unknown stage or layer 'layer9'"),
    (["--grid", "0,100"], "larger than the"),
    (["--grid", "0,4,2"], "not increasing"),
    (["--orders", "selective,bogus"], "unknown order 'bogus'"),
    (["--draws", "0"], "draws must be"),
    (["--checkpoints", "999"], "for step 999 write step=999"),
    (["--samples", "0"], "--samples must be >= 1"),
])
def test_cli_bad_input_one_line_exit_2_no_rows(tiny_run, args, message):
    res = CliRunner().invoke(cli, ["ablate", str(tiny_run), "--quiet"] + args)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("\n") == 1 and res.output.startswith("error: ")
    assert not (tiny_run / "tables" / "ablation.parquet").exists()
