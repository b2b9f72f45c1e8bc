"""vit-tiny: shapes, read points and stages, the split forward, token units, ablation, regularizer, training,
and a run through train + selectivity + ablation + regularizer."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from csn.analysis.ablation import Ablation, ablate_units, ablation_sweep
from csn.analysis.ablation.sweep import probe
from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.core.trace import run_with_cache
from csn.core.units import resolve_layers
from csn.errors import CsnError
from csn.models import ViT, create_model
from csn.models.vit import Attention
from csn.runs import Run
from csn.training.regularizer import SelectivityRegularizer
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _vit(pool: str = "mean", seed: int = 0, **kw) -> ViT:
    """A tiny ViT for 8x8 gray images: dim 24 (width 0.375), 4 heads, patch 2 (16 tokens), 6 blocks, eval mode.

    The dim differs from the token count, so a mix-up of the token and feature axes changes shapes.
    """
    torch.manual_seed(seed)
    return ViT(num_classes=10, in_channels=1, width=0.375, image_size=8, pool=pool, **kw).eval()


def _x(n: int = 5, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _data(n: int = 70, size: int = 8, k: int = 10, bs: int = 32, seed: int = 0):
    x = _x(n, size, seed)
    y = torch.arange(n) % k
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


# ------------------------------------------------------------------------------------------------
# the architecture
# ------------------------------------------------------------------------------------------------

def test_registry_defaults_for_fashion_mnist():
    m = create_model("vit-tiny", num_classes=10, in_channels=1, image_size=28)
    assert isinstance(m, ViT)
    assert (m.patch, m.dim, m.num_patches, len(m.blocks), m.pool) == ((7, 7), 64, 16, 6, "mean")
    assert m.blocks[0].attn.heads == 4 and m.blocks[0].mlp.fc1.out_features == 128
    assert isinstance(m.blocks[0].mlp.act, torch.nn.ReLU)
    assert m.csn_stages == {"stage1": ["blocks.0.mlp.act", "blocks.1.mlp.act"],
                            "stage2": ["blocks.2.mlp.act", "blocks.3.mlp.act"],
                            "stage3": ["blocks.4.mlp.act", "blocks.5.mlp.act"]}
    assert sum(p.numel() for p in m.parameters()) == 205_834
    assert m(_x(3, 28)).shape == (3, 10)
    assert create_model("vit-tiny", in_channels=1, image_size=28, width=2.0).dim == 128
    assert create_model("vit-tiny", in_channels=1, image_size=28, width=0.3).dim % 4 == 0  # heads divide the dim


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_output_shape_and_deterministic_init(pool):
    a, b, c = _vit(pool, seed=0), _vit(pool, seed=0), _vit(pool, seed=1)
    x = _x()
    out = a(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)
    assert (a.cls_token is not None) == (pool == "cls")
    assert a.embed(x).shape == (5, 16 + (pool == "cls"), 24)


def test_non_square_images():
    m = create_model("vit-tiny", num_classes=3, in_channels=3, image_size=[12, 20], width=0.25)
    assert m.patch == (3, 5) and m.num_patches == 16
    assert m(torch.randn(2, 3, 12, 20)).shape == (2, 3)
    assert ViT(image_size=(12, 20), patch=(6, 4)).num_patches == 10


def test_bad_sizes_are_csn_errors_naming_the_fix():
    with pytest.raises(CsnError, match="multiple of 4"):
        create_model("vit-tiny", in_channels=1, image_size=30)
    with pytest.raises(CsnError, match="does not divide"):
        ViT(image_size=28, patch=5)
    with pytest.raises(CsnError, match="equal stages"):
        ViT(image_size=28, depth=5)
    with pytest.raises(CsnError, match="pool must be"):
        ViT(image_size=28, pool="max")
    with pytest.raises(CsnError, match="not divisible by 4 heads"):
        Attention(10, 4)
    assert ViT(image_size=28, heads=3).dim == 63  # width rounds the dim to a multiple of the heads
    with pytest.raises(CsnError, match=r"image_size=\(32, 32\)"):
        create_model("vit-tiny", in_channels=1, image_size=28)(_x(2, 32))


# ------------------------------------------------------------------------------------------------
# read points, stages and the split forward
# ------------------------------------------------------------------------------------------------

def test_stage_read_points_are_post_relu_mlp_units_and_run_in_forward_order():
    m = _vit()
    modules = dict(m.named_modules())
    names = [n for ns in m.csn_stages.values() for n in ns]
    assert names == [f"blocks.{i}.mlp.act" for i in range(6)]
    fired = []
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: fired.append((n, o.shape, float(o.detach().min()))))
               for n in names]
    m(_x())
    for h in handles:
        h.remove()
    assert [(n, s) for n, s, _ in fired] == [(n, (5, 16, 48)) for n in names]  # mlp_ratio 2 x dim 24
    assert all(lo >= 0 for _, _, lo in fired)  # post-ReLU: CSI stays in [0, 1]


def test_block_outputs_stay_readable_with_a_pattern():
    m = _vit()
    assert resolve_layers(m, "blocks.*") == [f"blocks.{i}" for i in range(6)]  # the residual stream, not the MLP units
    assert resolve_layers(m, "blocks.*.mlp.act") == [n for ns in m.csn_stages.values() for n in ns]
    assert resolve_layers(m) == [n for ns in m.csn_stages.values() for n in ns]


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_forward_until_and_from_equal_forward_exactly(pool):
    m = _vit(pool)
    x = _x()
    ref = m(x)
    first_inputs = {}
    for stage, layers in m.csn_stages.items():
        block = dict(m.named_modules())[layers[0].removesuffix(".mlp.act")]
        h_ = block.register_forward_pre_hook(lambda _m, inp, s=stage: first_inputs.setdefault(s, inp[0].clone()))
        m(x)
        h_.remove()
    for stage in m.csn_stages:
        h = m.forward_until(stage, x)
        torch.testing.assert_close(h, first_inputs[stage], rtol=0, atol=0)  # the stage's input = its first block's
        torch.testing.assert_close(m.forward_from(stage, h), ref, rtol=0, atol=0)
    assert m.forward_until("stage1", x).shape[1] == 16 + (pool == "cls")
    with pytest.raises(CsnError, match="stage"):
        m.forward_until("stage9", x)


# ------------------------------------------------------------------------------------------------
# units: mean over tokens per hidden feature
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_units_are_hidden_features_averaged_over_tokens(pool):
    m = _vit(pool)
    x = _x()
    raw = {}
    modules = dict(m.named_modules())
    layers = resolve_layers(m)
    handles = [modules[n].register_forward_hook(lambda _m, _i, o, n=n: raw.__setitem__(n, o.detach().clone()))
               for n in layers]
    m(x)
    for h in handles:
        h.remove()
    _, cache = run_with_cache(m, x)
    assert list(cache) == layers
    tokens = 16 + (pool == "cls")
    for n in layers:
        assert raw[n].shape == (5, tokens, 48)
        ref = raw[n].double().sum(dim=1) / tokens  # every token, class token included
        assert cache[n].shape == (5, 48)
        np.testing.assert_allclose(cache[n].detach().double().numpy(), ref.numpy(), rtol=0, atol=1e-6)


def test_block_outputs_are_units_too():
    m = _vit()
    layers = resolve_layers(m, "blocks.*")
    _, cache = run_with_cache(m, _x(), layers)
    assert all(v.shape == (5, 24) for v in cache.values())  # dim 24, averaged over 16 tokens
    assert any(float(v.detach().min()) < 0 for v in cache.values())  # the residual stream is signed


# ------------------------------------------------------------------------------------------------
# ablation
# ------------------------------------------------------------------------------------------------

def test_ablate_units_zeroes_the_features_in_every_token():
    m = _vit()
    x = _x()
    idx = [0, 5, 11, 23]
    seen = {}
    pre = m.blocks[2].register_forward_pre_hook(lambda _m, inp: seen.__setitem__("next", inp[0].clone()))
    clean = m(x)
    clean_in = seen["next"]
    with ablate_units(m, {"blocks.1": idx}):
        ablated = m(x)
    pre.remove()
    got = seen["next"]
    assert (got[:, :, idx] == 0).all()                               # every token, every example
    keep = [i for i in range(24) if i not in idx]
    torch.testing.assert_close(got[:, :, keep], clean_in[:, :, keep], rtol=0, atol=0)
    assert (clean_in[:, :, idx] != 0).all()

    def manual(_m, _i, out):
        out = out.clone()
        out[:, :, idx] = 0.0
        return out

    h = m.blocks[1].register_forward_hook(manual)
    ref = m(x)
    h.remove()
    torch.testing.assert_close(ablated, ref, rtol=0, atol=0)
    assert not torch.allclose(ablated, clean)


def _csi(model, layers, x, seed=0):
    """Random CSI with ties (rounded), shaped like each layer's units."""
    pr = probe(model.eval(), x[:1], layers)
    g = torch.Generator().manual_seed(seed)
    return {layer: (torch.rand(pr.units[layer], generator=g) * 4).round() / 4 for layer in layers}


def _sweeps_agree(m: ViT, stage_layers: dict[str, list[str]], grid: str, max_masks: int | None, mode: str) -> None:
    """The fast sweep (stage input once, masks batched) gives the naive protocol's rows exactly."""
    layers = [la for ls in stage_layers.values() for la in ls]
    data = _data()
    csi = _csi(m, layers, data[0][0])
    g = torch.Generator().manual_seed(3)
    means = {k: torch.randn(v.numel(), generator=g) for k, v in csi.items()} if mode == "mean" else None
    kw = {"grid": grid, "draws": 2, "num_classes": 10, "max_batch_masks": max_masks, "step": 3, "mode": mode,
          "means": means}
    fast = ablation_sweep(m, data, stage_layers, csi, **kw)
    naive = ablation_sweep(m, data, stage_layers, csi, naive=True, **kw)
    keys = ["step", "stage", "order", "n", "draw"]
    assert len(fast) == len(naive) > 0 and set(fast["stage"]) == set(stage_layers)
    both = fast.merge(naive, on=keys, suffixes=("_f", "_n"))
    assert len(both) == len(fast)
    assert (both["correct_f"] == both["correct_n"]).all() and (both["total_f"] == both["total_n"]).all()
    np.testing.assert_array_equal(both["top5_f"].to_numpy(), both["top5_n"].to_numpy())
    np.testing.assert_allclose(both["loss_f"], both["loss_n"], rtol=1e-5, atol=0)
    # the largest ablation changes the loss in every stage (the sweep does reach the model)
    sel = fast[fast["order"] == "selective"].sort_values("stage")
    most, none = sel[sel["n"] == sel["n"].max()], sel[sel["n"] == 0]
    assert (np.abs(most["loss"].to_numpy() - none["loss"].to_numpy()) > 1e-6).all()


@pytest.mark.parametrize("pool", ["mean", "cls"])
@pytest.mark.parametrize("grid,max_masks,mode", [("0,1,2,4", 3, "zero"), ("f:0,0.3,1", None, "zero"),
                                                  ("0,2,5", 2, "mean")])
def test_fast_sweep_equals_naive(pool, grid, max_masks, mode):
    m = _vit(pool)
    _sweeps_agree(m, {k: list(v) for k, v in m.csn_stages.items()}, grid, max_masks, mode)


def test_fast_sweep_equals_naive_on_block_outputs():
    m = _vit()
    stage_layers = {"early": ["blocks.0", "blocks.1"], "late": ["blocks.5"]}
    _sweeps_agree(m, stage_layers, "0,1,3,8", 3, "zero")


# ------------------------------------------------------------------------------------------------
# the selectivity regularizer and training
# ------------------------------------------------------------------------------------------------

def test_regularizer_gives_finite_gradients():
    torch.manual_seed(0)
    m = ViT(num_classes=4, in_channels=1, width=0.25, image_size=8).train()
    x, y = _x(32), torch.arange(32) % 4
    reg = SelectivityRegularizer(m, num_classes=4)
    assert reg.layers == [f"blocks.{i}.mlp.act" for i in range(4)]  # all stages but the last
    with reg:
        logits = m(x)
        r = reg.value(y)
    assert r is not None and torch.isfinite(r)
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(r, list(params.values()), retain_graph=True, allow_unused=True)
    g = dict(zip(params, grads, strict=True))
    assert g["blocks.0.mlp.fc1.weight"] is not None and float(g["blocks.0.mlp.fc1.weight"].abs().sum()) > 0
    assert g["blocks.4.mlp.fc1.weight"] is None  # the last stage is not regularized
    loss = F.cross_entropy(logits, y) - (-1.0) * r
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_train_selectivity_ablation_and_regularizer_on_a_run(tmp_path):
    """The whole path on a ViT: a regularized training run, selectivity at every checkpoint, an ablation sweep."""
    from csn.training.loop import train

    cfg = tiny_config(name="vit", model="vit-tiny", width=0.25, epochs=1.0, lr=0.05, warmup_epochs=0.25,
                      reg_alpha=-1.0, reg_window="0:end")
    run = train(cfg, tmp_path / "vit", progress=False)
    ckpts = run.checkpoints
    assert ckpts[0].step == 0 and ckpts[-1].step == 8 and len(ckpts) >= 3  # 256 images / batch 32
    log = pd.read_parquet(run.table_path("training"))
    assert np.isfinite(log["train_loss"]).all() and (log["alpha"] == -1.0).all()
    assert np.isfinite(log["reg_value"]).all() and (log["reg_value"] >= 0).all()  # the regularizer ran at every step
    again = Run(tmp_path / "vit")
    first, last = again.load_model(0), again.load_model(ckpts[-1])
    assert isinstance(last, ViT) and last.patch == (2, 2) and last.dim == 16
    assert not torch.equal(first.blocks[0].attn.qkv.weight, last.blocks[0].attn.qkv.weight)
    assert last(_x(2)).shape == (2, 4)

    sel = run_analysis(again, Selectivity(), progress=False).rows
    assert set(sel["stage"]) == {"stage1", "stage2", "stage3"} and set(sel["step"]) == {c.step for c in ckpts}
    assert set(sel["layer"]) == {f"blocks.{i}.mlp.act" for i in range(6)}
    assert ((sel["csi"] >= 0) & (sel["csi"] <= 1)).all()  # post-ReLU units
    abl = run_analysis(again, Ablation(draws=2, grid="f:0,0.5,1"), checkpoints="first,last", progress=False).rows
    assert set(abl["stage"]) == {"stage1", "stage2", "stage3"} and set(abl["order"]) >= {"selective", "random"}
    assert set(abl["step"]) == {0, 8} and abl["top1"].between(0, 1).all()
