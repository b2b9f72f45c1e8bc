"""BatchNorm recalibration against an exact float64 reference of each BN layer's input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from csn.core.bn import has_batchnorm, recalibrate_bn
from csn.errors import CsnError

torch.set_num_threads(1)

SIZES = [6, 6, 5, 7, 6]  # unequal batch sizes: the estimate is the average of per-batch statistics


def bn_net(dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.BatchNorm1d(5), nn.Linear(5, 3),
    ).to(dtype)
    with torch.no_grad():  # stale running statistics, as in an early checkpoint
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
    return net


def batches(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return [(3 + 2 * torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64).to(dtype), torch.zeros(n, dtype=torch.long))
            for n in SIZES]


def reference(net: nn.Module, data, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact float64 mean of per-batch means and unbiased variances of every BN input (pre-hook capture)."""
    ref = copy.deepcopy(net).train()
    captured: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, m in ref.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            def hook(_m, inp, name=name):
                captured.setdefault(name, []).append(inp[0].detach().double().clone())
            handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        for x, _ in data[:n]:
            ref(x)
    for h in handles:
        h.remove()
    out = {}
    for name, xs in captured.items():
        means, vars_ = [], []
        for x in xs:
            flat = x.transpose(0, 1).reshape(x.shape[1], -1)  # [C, everything else]
            cnt = flat.shape[1]
            mu = flat.sum(1) / cnt
            means.append(mu)
            vars_.append(((flat - mu[:, None]) ** 2).sum(1) / (cnt - 1))
        out[name] = (sum(means) / len(means), sum(vars_) / len(vars_))
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_recalibrate_matches_exact_average(dtype, tol):
    net = bn_net(dtype)
    data = batches(dtype)
    n = 3
    ref = reference(net, data, n)
    it = iter(data)
    new = recalibrate_bn(net, it, n)
    assert next(it) is data[n]  # exactly the first n batches were read
    mods = dict(new.named_modules())
    assert set(ref) == {"1", "4", "8"}
    for name, (mu, var) in ref.items():
        m = mods[name]
        torch.testing.assert_close(m.running_mean.double(), mu, rtol=tol, atol=tol)
        torch.testing.assert_close(m.running_var.double(), var, rtol=tol, atol=tol)
        assert int(m.num_batches_tracked) == n
    assert mods["1"].momentum == 0.3 and mods["4"].momentum == 0.1
    assert not any(m.training for m in new.modules())
    assert new.csn_bn_recalibrated == n


def test_original_model_untouched():
    net = bn_net()
    net.train()
    net[4].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    modes = [m.training for m in net.modules()]
    new = recalibrate_bn(net, batches(), 4)
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    assert [m.training for m in net.modules()] == modes
    assert new is not net
    assert not torch.equal(new[1].running_mean, net[1].running_mean)
    for p_new, p_old in zip(new.parameters(), net.parameters()):
        assert torch.equal(p_new, p_old) and p_new.data_ptr() != p_old.data_ptr()


def test_recalibrated_eval_output_equals_train_output_on_single_batch():
    """With one batch the running stats are that batch's stats (var unbiased), so eval ~ train mode."""
    net = bn_net()
    x, _ = batches()[0]
    new = recalibrate_bn(net, [(x, None)], 1)
    assert int(new[1].num_batches_tracked) == 1
    with torch.no_grad():
        ref = reference(net, [(x, None)], 1)
    torch.testing.assert_close(new[1].running_var, ref["1"][1], rtol=1e-10, atol=1e-12)


def test_no_batchnorm_is_noop_copy_and_zero_batches_returns_model():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).train()
    assert not has_batchnorm(net)
    assert has_batchnorm(bn_net())

    def never():
        raise AssertionError("data must not be read for a model without BatchNorm")
        yield

    new = recalibrate_bn(net, never(), 5)
    assert new is not net and not new.training and net.training
    for (k, a), (_, b) in zip(net.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), k

    bn = bn_net()
    assert recalibrate_bn(bn, never(), 0) is bn


def test_bad_arguments():
    with pytest.raises(CsnError, match="non-negative"):
        recalibrate_bn(bn_net(), batches(), -1)
    with pytest.raises(CsnError, match="no batches"):
        recalibrate_bn(bn_net(), [], 2)
