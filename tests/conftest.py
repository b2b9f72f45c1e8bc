"""Shared fixtures: a tiny trained run on synthetic data, reused by the analysis tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("CSN_NO_PROGRESS", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

TINY = dict(
    name="tiny", dataset="synthetic", synthetic=dict(num_train=256, num_test=128, num_classes=4, channels=1, size=8),
    model="resnet8", width=0.5, epochs=2.0, batch_size=32, lr=0.05, checkpoints="steps:log2:4,1:end:0.5",
    eval_batch_size=64, log_every=2, channels_last=False, seed=0,
)


def tiny_config(**kw):
    from csn.runs.config import TrainConfig

    d = dict(TINY)
    d.update(kw)
    return TrainConfig.from_dict(d)


@pytest.fixture(autouse=True)
def _torch_threads_kept():
    """No test leaves its torch thread count to the next one (a command run in-process with --threads N sets it)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def one_thread():
    """Tiny models run fastest (and without thread contention on shared cores) on one thread (restored after the
    test by _torch_threads_kept)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run_master(tmp_path_factory) -> Path:
    """A tiny run trained once per test session (do not modify; copy it with `tiny_run`)."""
    from csn.training.loop import train

    out = tmp_path_factory.mktemp("master") / "tiny"
    train(tiny_config(), out, progress=False)
    return out


@pytest.fixture()
def tiny_run(tiny_run_master, tmp_path) -> Path:
    """A private copy of the tiny run that a test may write into."""
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_run_master, dst)
    return dst


def analyze(analysis_cls, run, **kw):
    """run_analysis with keyword options split between the analysis's own options and RunOptions."""
    from csn.analysis.base import run_analysis

    own = {k: kw.pop(k) for k in list(kw) if k in analysis_cls.Options.model_fields}
    extra = {k: kw.pop(k) for k in ("log", "data") if k in kw}
    return run_analysis(run, analysis_cls(**own), **extra, **kw)
