"""The selectivity regularizer: formula, gradients, sums vs means, windows in the training loop."""

from __future__ import annotations

import pytest
import torch

from csn.analysis.selectivity import class_selectivity
from csn.data import BatchLoader, synthetic
from csn.errors import CsnError
from csn.models import create_model
from csn.runs.run import Run
from csn.training.loop import train
from csn.training.regularizer import SelectivityRegularizer, default_reg_layers
from tests.conftest import tiny_config


def _naive_csi(acts: torch.Tensor, labels: torch.Tensor, use_sums: bool, eps: float = 1e-7) -> torch.Tensor:
    """Independent float64 reference: loop over classes present, then over units."""
    classes = sorted(set(labels.tolist()))
    out = []
    for u in range(acts.shape[1]):
        vals = []
        for k in classes:
            col = [float(acts[i, u]) for i in range(len(labels)) if int(labels[i]) == k]
            vals.append(sum(col) if use_sums else sum(col) / len(col))
        top = max(vals)
        rest = (sum(vals) - top) / (len(vals) - 1)
        out.append((top - rest) / (top + rest + eps))
    return torch.tensor(out, dtype=torch.float64)


def _mlp():
    torch.manual_seed(0)
    return create_model("mlp", num_classes=4, in_channels=1, image_size=6, width=0.1).double()


def test_value_matches_naive_reference_on_unbalanced_batch_sums_and_means():
    model = _mlp()
    x = torch.randn(23, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0] * 10 + [1] * 3 + [3] * 10)  # class 2 absent, unbalanced
    layers = ["relu1", "relu2"]
    for use_sums in (False, True):
        reg = SelectivityRegularizer(model, layers, num_classes=4, statistic="sums" if use_sums else "means")
        with reg:
            model(x)
            stage_vals = reg.stage_values(y)
            acts = {k: v.detach() for k, v in reg.activations.items()}
        eps = 1e-6 if use_sums else 1e-7  # class sums default to the study's eps
        expected = {f"hidden{i}": _naive_csi(acts[f"relu{i}"], y, use_sums, eps).mean() for i in (1, 2)}
        assert set(stage_vals) == set(expected)
        for s in expected:
            assert abs(float(stage_vals[s]) - float(expected[s])) < 1e-10
    # means and sums genuinely differ on an unbalanced batch
    with SelectivityRegularizer(model, layers, num_classes=4) as a:
        model(x)
        ra = float(a.value(y))
    with SelectivityRegularizer(model, layers, num_classes=4, statistic="sums") as b:
        model(x)
        rb = float(b.value(y))
    assert abs(ra - rb) > 1e-3


def test_whole_split_batch_equals_streaming_csi():
    data = synthetic(num_train=64, num_test=60, num_classes=3, size=6, seed=2)
    model = _mlp().float()
    model.eval()
    x, y = data.test.images, data.test.labels
    reg = SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=3)
    with reg, torch.no_grad():
        model(x)
        r = float(reg.value(y))
    table = class_selectivity(model, BatchLoader(data.test, 7), layers=["relu1", "relu2"], num_classes=3)
    assert abs(r - table.groupby("layer")["csi"].mean().mean()) < 1e-5


def test_gradcheck_through_the_model():
    model = _mlp()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 0])
    reg = SelectivityRegularizer(model, ["relu1"], num_classes=4)

    def f(inp):
        with reg:
            model(inp)
            return reg.value(y)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(),), eps=1e-6, atol=1e-5)
    # gradients reach the weights
    with reg:
        model(x.detach())
        reg.value(y).backward()
    assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0


def test_one_class_batch_is_skipped_and_counted():
    model = _mlp()
    reg = SelectivityRegularizer(model, ["relu1"], num_classes=4)
    with reg:
        model(torch.randn(5, 1, 6, 6, dtype=torch.float64))
        assert reg.value(torch.zeros(5, dtype=torch.long)) is None
    assert reg.skipped == 1


def test_masked_present_classes_match_naive_reference():
    # The GPU path (classes present masked, nothing read on the host) against the independent reference, on
    # batches where most classes are absent; CPU tensors take the indexed path, so call the formula directly.
    from csn.core.stats import batch_class_sums, csi_from_means

    g = torch.Generator().manual_seed(7)
    for k, n, u in ((10, 12, 5), (50, 9, 4), (3, 6, 3)):
        acts = torch.rand(n, u, generator=g, dtype=torch.float64) + 0.1
        y = torch.randint(0, k, (n,), generator=g)
        if len(set(y.tolist())) < 2:
            y[0], y[1] = 0, 1
        sums, counts = batch_class_sums(acts, y, k)
        for use_sums in (False, True):
            vals = sums if use_sums else sums / counts.clamp_min(1).unsqueeze(1)
            got = csi_from_means(vals, 1e-7, present=counts > 0).csi
            torch.testing.assert_close(got, _naive_csi(acts, y, use_sums), rtol=1e-12, atol=1e-12)


def test_value_nowait_equals_value_and_is_zero_without_two_classes():
    model = _mlp()
    reg = SelectivityRegularizer(model, ["relu1", "relu2"], num_classes=4)
    x = torch.randn(8, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 2])
    with reg:
        model(x)
        r, counted = reg.value_nowait(y)
        assert bool(counted) and torch.equal(r, reg.value(y))
        r1, counted1 = reg.value_nowait(torch.zeros(8, dtype=torch.long))  # one class: R is 0, its gradient 0
        assert not bool(counted1) and float(r1) == 0.0
        (r1 + 0 * sum(p.sum() for p in model.parameters())).backward()  # R adds nothing to any gradient
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_hooks_off_when_detached_and_defaults():
    model = create_model("resnet8", num_classes=4, in_channels=1, width=0.25)
    assert default_reg_layers(model) == ["layer1.0", "layer2.0"]  # every stage but the last
    reg = SelectivityRegularizer(model, num_classes=4)
    reg.attach()
    reg.attach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 2
    reg.detach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(CsnError, match="matches no module"):
        SelectivityRegularizer(model, ["layer7.*"])


def _stage_csi(run: Run, stages=("layer1", "layer2")) -> float:
    data = run.dataset()
    model = run.load_model()
    t = class_selectivity(model, BatchLoader(data.test, 64), num_classes=data.num_classes)
    return float(t[t["stage"].isin(stages)]["csi"].mean())


def test_alpha_sign_moves_selectivity_in_training(tmp_path):
    kw = dict(epochs=2.0, checkpoints="0:end:1", seed=1)
    base = train(tiny_config(**kw), tmp_path / "base", progress=False)
    down = train(tiny_config(reg_alpha=-3.0, reg_window="0:end", **kw), tmp_path / "down", progress=False)
    up = train(tiny_config(reg_alpha=3.0, reg_window="0:end", **kw), tmp_path / "up", progress=False)
    c_base, c_down, c_up = _stage_csi(base), _stage_csi(down), _stage_csi(up)
    assert c_down < c_base - 0.02, (c_down, c_base)
    assert c_up > c_base + 0.02, (c_up, c_base)
    log = down.read("training")
    assert (log["alpha"] == -3.0).all() and log["reg_value"].notna().all()


def test_window_applies_alpha_only_inside(tmp_path):
    run = train(tiny_config(epochs=2.0, checkpoints="0:end:1", reg_schedule="0*1 -2*1"), tmp_path / "w", progress=False)
    log = run.read("training")
    before, after = log[log["epoch"] <= 1.0], log[log["epoch"] > 1.0 + 1e-9]
    assert (before["alpha"] == 0).all() and before["reg_value"].isna().all()
    assert (after["alpha"] == -2).all() and after["reg_value"].notna().all()


@pytest.mark.parametrize("kw,msg", [
    (dict(reg_alpha=-1.0), "both"),
    (dict(reg_window="0:end"), "both"),
    (dict(reg_alpha=-1.0, reg_window="5:end"), "after"),
    (dict(reg_schedule="-20*x"), "-20\\*x"),
    (dict(reg_alpha=-1.0, reg_window="0:end", reg_layers=["nope"]), "matches no module"),
])
def test_bad_regularizer_settings(tmp_path, kw, msg):
    with pytest.raises(CsnError, match=msg):
        train(tiny_config(epochs=1.0, checkpoints="0:end:1", **kw), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()
