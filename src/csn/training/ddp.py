"""DistributedDataParallel around the model for training under torchrun (PyTorch's own engine)."""

from __future__ import annotations

import torch

from csn.core.bn import has_batchnorm
from csn.dist import is_dist


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when running distributed, else the model itself.

    DDP averages gradients over ranks; with each rank's loss the mean over its equal share of the
    global batch, that is the gradient of the mean over the global batch (single-process value).
    """
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def sync_batchnorm(model: torch.nn.Module, device: torch.device, enabled: bool = True) -> tuple[torch.nn.Module, str]:
    """Under DDP, convert BatchNorm to SyncBatchNorm so training-mode statistics are the global batch's.

    Returns (model, mode) with mode one of "none" (no BatchNorm or a single process), "sync"
    (SyncBatchNorm: BN equals the single-process BN of the global batch), or "per-rank" (each rank
    normalizes with its own slice's statistics: when disabled, or on CPU/gloo where PyTorch's
    SyncBatchNorm is not implemented). The module keeps its identity, names and state-dict keys.
    """
    if not is_dist() or not has_batchnorm(model, running_stats=False):
        return model, "none"
    if not enabled or device.type not in ("cuda", "xpu", "hpu"):
        return model, "per-rank"
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model), "sync"


__all__ = ["wrap_ddp", "sync_batchnorm"]
