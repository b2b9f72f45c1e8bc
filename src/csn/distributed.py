"""torchrun / DistributedDataParallel helpers. Without torchrun everything is a single process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_dist() -> bool:
    """True inside an initialized process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def init_from_env(backend: str | None = None) -> bool:
    """Initialize the default process group when launched by torchrun (WORLD_SIZE > 1); return whether it did."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when running distributed, else the model itself."""
    if not is_dist():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum across ranks (no-op in a single process)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def folder_loader(split, cfg, *, train: bool, device: torch.device):
    """A torch DataLoader with worker processes over a torchvision dataset, sharded with DistributedSampler."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = None
    if is_dist():
        sampler = DistributedSampler(split, shuffle=train, seed=cfg.seed, drop_last=train)
    per_rank = (cfg.batch_size // world_size()) if train else cfg.eval_batch_size
    loader = DataLoader(split, batch_size=per_rank, shuffle=train and sampler is None, sampler=sampler,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda", drop_last=train,
                        persistent_workers=cfg.workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
    return _DeviceLoader(loader, device, cfg.channels_last)


class _DeviceLoader:
    """Moves DataLoader batches to the device; set_epoch reseeds the sampler's shuffle."""

    def __init__(self, loader, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if hasattr(self.loader.sampler, "set_epoch"):
            self.loader.sampler.set_epoch(epoch)
        self.start_batch = start_batch

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            if i < self.start_batch:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.start_batch = 0
