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


def note(message: str) -> None:
    """The analyses' default `log`: a one-line note on stderr (rank 0's alone under torchrun)."""
    import sys

    from csn.distributed import is_main

    if is_main():
        print(message, file=sys.stderr, flush=True)


def bn_batches_for(ckpt: Checkpoint, bn_recalibrate: int | None) -> int:
    """Resolve the --bn-recalibrate flag: None = default policy (on before epoch 1), 0 = off, N = N batches."""
    if bn_recalibrate is None:
        return DEFAULT_BN_BATCHES if ckpt.epoch < BN_DEFAULT_BEFORE_EPOCH else 0
    if bn_recalibrate < 0:
        raise CsnError(f"--bn-recalibrate must be >= 0 (0 = off), got {bn_recalibrate}.")
    return int(bn_recalibrate)


def split_of(data, split: str):
    """The 'train' or 'test' split of a dataset, as analyses read it: without augmentation."""
    if split not in ("train", "test"):
        raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
    if split == "test":
        return data.test
    return data.train if getattr(data, "train_eval", None) is None else data.train_eval


def eval_loader(run: Run, data, split: str = "test", *, batch_size: int | None = None,
                device: str | torch.device = "cpu", samples: int | None = None, shard: bool = False,
                whole_batches: bool = False):
    """Deterministic, unaugmented batches of a split (in the run's order), optionally a seeded subset.

    shard=True (under torchrun): this rank's contiguous part of the split (csn.distributed.shard_split),
    a run of the single-process batches, so every rank computes exactly the activations one process
    would and statistics summed over ranks (class sums/counts, correct counts, minibatch HSIC) equal
    the single-process ones up to the order of summation. With fewer batches than ranks the split is
    cut into equal chunks of examples instead (sums over examples do not depend on batch boundaries;
    float32 activations may then differ in the last bits), unless whole_batches=True (per-batch
    statistics such as minibatch HSIC), which leaves the extra ranks without data. A single process
    gets the whole split.
    """
    from csn.distributed import folder_loader, shard_split, world_size

    s = split_of(data, split)
    bs = batch_size or int(run.config.get("eval_batch_size", 500))
    if samples and samples < len(s):  # the same seeded choice for in-memory and folder datasets
        if hasattr(s, "subset"):
            s = s.subset(samples, seed=777)
        else:
            from torch.utils.data import Subset

            idx = torch.randperm(len(s), generator=torch.Generator().manual_seed(777))[:samples].sort().values
            s = Subset(s, idx.tolist())
    if shard:
        s = shard_split(s, bs if whole_batches or -(-len(s) // bs) >= world_size() else None)
    if hasattr(s, "images"):
        return BatchLoader(s, bs, shuffle=False, device=device)
    from csn.training.config import TrainConfig

    cfg = TrainConfig.from_dict(run.config)
    cfg.eval_batch_size = bs
    return folder_loader(s, cfg, train=False, device=torch.device(device))


def bn_loader(run: Run, data, device: str | torch.device = "cpu"):
    """Training batches without augmentation, in a fixed seeded order, for BN re-estimation.

    The order is a seeded shuffle for folder datasets too (an ImageFolder lists its images class by
    class, so its first batches in file order would hold one or two classes).
    """
    s = split_of(data, "train")
    bs = int(run.config.get("batch_size", 128))
    seed = int(run.config.get("seed", 0)) + 99991
    if hasattr(s, "images"):
        return BatchLoader(s, bs, shuffle=True, seed=seed, device=device)
    from torch.utils.data import Subset

    from csn.distributed import folder_loader
    from csn.training.config import TrainConfig

    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(seed))
    cfg = TrainConfig.from_dict(run.config)
    cfg.eval_batch_size = bs
    return folder_loader(Subset(s, order.tolist()), cfg, train=False, device=torch.device(device))


def analysis_model(run: Run, ckpt: Checkpoint, data, *, bn_recalibrate: int | None = None,
                   device: str | torch.device = "cpu", shared: bool = True) -> AnalysisModel:
    """The model at `ckpt` in eval mode; BN statistics re-estimated on a copy when the policy says so.

    Under torchrun with shared=True every rank calls this for the same checkpoint (a collective):
    each re-estimates BN statistics on the same batches and rank 0's are broadcast, so every rank
    scores its shard with one model. shared=False: ranks load different checkpoints, no collective.
    """
    from csn.bn import has_batchnorm, recalibrate_bn
    from csn.distributed import broadcast_buffers_, same_outcome

    with same_outcome(enabled=shared):
        model = run.load_model(ckpt, device=device)
        n = bn_batches_for(ckpt, bn_recalibrate)
        if n > 0 and has_batchnorm(model):
            model = recalibrate_bn(model, bn_loader(run, data, device), n, device=device)
            n = int(getattr(model, "csn_bn_recalibrated", n))  # batches actually used (a small split has fewer)
        else:
            n = 0
    if shared and n > 0:
        broadcast_buffers_(model)
    return AnalysisModel(model.eval(), n)


def class_stats_of_split(run: Run, data, model: torch.nn.Module, split: str, layers, num_classes: int | None, *,
                         device: str | torch.device = "cpu", samples: int | None = None, shard: bool = True,
                         progress: bool = False, desc: str | None = None) -> dict:
    """collect_class_stats over a split (or its seeded subset of `samples`) for every layer.

    Under torchrun with shard=True, every rank streams its shard of the split's batches and the class
    sums, sums of squares and counts are all-reduced, so every rank holds the statistics of the whole
    split (equal to one process's); the progress bar is rank 0's. shard=False: this rank alone reads
    the whole split (no collective).
    """
    from csn.distributed import is_main, reduce_class_stats, same_outcome
    from csn.selectivity import collect_class_stats

    loader = eval_loader(run, data, split, device=device, samples=samples, shard=shard)
    with same_outcome(enabled=shard):  # a bad batch on one rank stops every rank before the reduction
        stats = collect_class_stats(model, loader, layers, num_classes, device=device, desc=desc,
                                    progress=progress and is_main())
    return reduce_class_stats(stats) if shard else stats
