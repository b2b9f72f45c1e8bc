"""What every eval-mode analysis of a run shares: loaders without augmentation, and the model at a
checkpoint with BatchNorm statistics re-estimated where they lag (SPEC "Pitfalls: BatchNorm lag")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csn.data import BatchLoader
from csn.errors import CsnError
from csn.runs import Checkpoint, Run

DEFAULT_BN_BATCHES = 16
"""Training batches used to re-estimate BN statistics when the default policy turns it on."""
BN_DEFAULT_BEFORE_EPOCH = 1.0
"""The default policy re-estimates BN statistics for checkpoints before this epoch, where they lag."""


@dataclass
class AnalysisModel:
    """A model ready for eval-mode analysis and how its BN statistics were obtained (recorded in tables)."""

    model: torch.nn.Module
    bn_recalibrated: int  # number of training batches used; 0 = checkpoint's running statistics


def bn_batches_for(ckpt: Checkpoint, bn_recalibrate: int | None) -> int:
    """Resolve the --bn-recalibrate flag: None = default policy (on before epoch 1), 0 = off, N = N batches."""
    if bn_recalibrate is None:
        return DEFAULT_BN_BATCHES if ckpt.epoch < BN_DEFAULT_BEFORE_EPOCH else 0
    if bn_recalibrate < 0:
        raise CsnError(f"--bn-recalibrate must be >= 0 (0 = off), got {bn_recalibrate}.")
    return int(bn_recalibrate)


def split_of(data, split: str):
    """The 'train' or 'test' split of a dataset."""
    if split not in ("train", "test"):
        raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
    return data.train if split == "train" else data.test


def eval_loader(run: Run, data, split: str = "test", *, batch_size: int | None = None,
                device: str | torch.device = "cpu", samples: int | None = None, shard: bool = False):
    """Deterministic, unaugmented batches of a split (in the run's order), optionally a seeded subset.

    shard=True (under torchrun): this rank's contiguous run of the same whole batches
    (csn.distributed.shard_split), so statistics summed over ranks (class sums/counts, correct counts,
    minibatch HSIC terms) equal the single-process ones; a single process gets the whole split.
    """
    from csn.distributed import folder_loader, shard_split

    s = split_of(data, split)
    bs = batch_size or int(run.config.get("eval_batch_size", 500))
    if hasattr(s, "images"):
        if samples:
            s = s.subset(samples, seed=777)
        if shard:
            s = shard_split(s, bs)
        return BatchLoader(s, bs, shuffle=False, device=device)
    from torch.utils.data import Subset

    from csn.training.config import TrainConfig

    if samples and samples < len(s):  # the same seeded choice of indices as TensorSplit.subset
        idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(777))[:samples].sort().values
        s = Subset(s, idx.tolist())
    cfg = TrainConfig.from_dict(run.config)
    cfg.eval_batch_size = bs
    return folder_loader(s, cfg, train=False, device=torch.device(device), shard=shard)


def bn_loader(run: Run, data, device: str | torch.device = "cpu"):
    """Training batches without augmentation, in a fixed seeded order, for BN re-estimation."""
    s = data.train
    bs = int(run.config.get("batch_size", 128))
    if hasattr(s, "images"):
        return BatchLoader(s, bs, shuffle=True, seed=int(run.config.get("seed", 0)) + 99991, device=device)
    return eval_loader(run, data, "train", batch_size=bs, device=device)


def analysis_model(run: Run, ckpt: Checkpoint, data, *, bn_recalibrate: int | None = None,
                   device: str | torch.device = "cpu") -> AnalysisModel:
    """The model at `ckpt` in eval mode; BN statistics re-estimated on a copy when the policy says so."""
    from csn.bn import has_batchnorm, recalibrate_bn

    model = run.load_model(ckpt, device=device)
    n = bn_batches_for(ckpt, bn_recalibrate)
    if n > 0 and has_batchnorm(model):
        model = recalibrate_bn(model, bn_loader(run, data, device), n, device=device)
        n = int(getattr(model, "csn_bn_recalibrated", n))  # batches actually used (a small split has fewer)
    else:
        n = 0
    return AnalysisModel(model.eval(), n)
