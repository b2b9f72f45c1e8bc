"""The Accuracy analysis (BatchNorm re-estimated test accuracy of a checkpoint) against a naive reference: BN
statistics re-estimated by hand on a copy (hooks collect each BN layer's batch mean and unbiased variance over the
same training batches; their plain averages become the running statistics), then the whole test split scored in
one eval-mode pass."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from csn.analysis.accuracy import Accuracy
from csn.analysis.base import bn_loader, run_analysis
from csn.errors import CsnError
from csn.runs.run import Run


def _naive(run: Run, step: int, bn_batches: int) -> tuple[int, int]:
    """(correct, images) on the whole test split after re-estimating BN by hand from `bn_batches` batches."""
    data = run.dataset()
    ckpt = next(c for c in run.checkpoints if c.step == step)
    model = copy.deepcopy(run.load_model(ckpt))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if bn_batches:
        seen: dict[int, list] = {i: [] for i in range(len(bns))}
        hooks = [m.register_forward_pre_hook(lambda _m, inp, i=i: seen[i].append(
            (inp[0].double().mean((0, 2, 3)), inp[0].double().var((0, 2, 3), unbiased=True)))) for i, m in enumerate(bns)]
        model.train()
        with torch.no_grad():
            for b, (x, _y) in enumerate(bn_loader(run, data)):
                if b == bn_batches:
                    break
                model(x)
        for h in hooks:
            h.remove()
        for i, m in enumerate(bns):
            m.running_mean.copy_(torch.stack([s[0] for s in seen[i]]).mean(0).float())
            m.running_var.copy_(torch.stack([s[1] for s in seen[i]]).mean(0).float())
    model.eval()
    test = data.test
    with torch.no_grad():
        pred = model(test.normalize(test.images)).argmax(1)
    return int((pred == test.labels).sum()), len(test.labels)


@pytest.mark.parametrize("bn", [None, 0, 3])
def test_accuracy_matches_a_naive_reference(tiny_run, bn):
    run = Run(tiny_run)
    steps = [c.step for c in run.checkpoints]
    res = run_analysis(run, Accuracy(), checkpoints=",".join(f"step={s}" for s in steps), bn_recalibrate=bn,
                       progress=False)
    rows = res.rows.set_index("step")
    assert list(rows.index) == steps and (rows["n_images"] == 128).all() and (rows["split"] == "test").all()
    for c in run.checkpoints:
        n_bn = (16 if c.epoch < 1 else 0) if bn is None else bn  # the policy: 16 batches before epoch 1
        n_bn = min(n_bn, 8)  # the tiny training split has 8 batches
        assert rows.loc[c.step, "bn_recalibrated"] == n_bn
        correct, n = _naive(run, c.step, n_bn)
        assert abs(int(rows.loc[c.step, "correct"]) - correct) <= 1  # float32 vs float64 statistics: a tie at most
        assert rows.loc[c.step, "acc"] == pytest.approx(rows.loc[c.step, "correct"] / 128, abs=1e-12)
        if n_bn == 0:  # the checkpoint's own statistics: the training loop's own score of the whole split
            assert rows.loc[c.step, "correct"] == correct
    final = run.checkpoints[-1]
    assert rows.loc[final.step, "acc"] == pytest.approx(final.metrics["test_acc"], abs=1e-12) or bn


def test_rows_are_resumed_and_other_settings_are_refused(tiny_run):
    run = Run(tiny_run)
    first = run_analysis(run, Accuracy(), checkpoints="step=0,step=4", bn_recalibrate=2, progress=False)
    again = run_analysis(run, Accuracy(), checkpoints="step=0,step=4", bn_recalibrate=2, progress=False)
    assert again.computed == [] and first.computed == [0, 4]
    pd.testing.assert_frame_equal(first.rows, again.rows, check_dtype=False)  # str read back from parquet
    with pytest.raises(CsnError, match="BatchNorm statistics re-estimated from"):
        run_analysis(run, Accuracy(), checkpoints="step=4", bn_recalibrate=5, progress=False)
    with pytest.raises(CsnError, match="--samples"):
        run_analysis(run, Accuracy(samples=64), checkpoints="step=4", bn_recalibrate=2, progress=False)
    sub = run_analysis(run, Accuracy(samples=64), checkpoints="step=4", bn_recalibrate=2, tag="sub", progress=False)
    assert int(sub.rows["n_images"].iloc[0]) == 64
