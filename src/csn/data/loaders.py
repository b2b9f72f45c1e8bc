"""Loaders beyond the in-memory BatchLoader: seeded subsets, this rank's shard of a split, and torch
DataLoaders with worker processes for folder datasets (ImageFolder), resumable mid-epoch under torchrun."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from csn.data.split import Split, TensorData
from csn.data.tensors import BatchLoader, TensorSplit, mix_seed
from csn.dist import rank, shard_range, world_size
from csn.errors import CsnError


def in_memory(split: Split) -> bool:
    """Whether a split is held in memory (TensorData: images and labels as tensors, batched by BatchLoader)
    rather than a torch Dataset read from files by a DataLoader with workers (FolderData, e.g. ImageFolder)."""
    return isinstance(split, TensorData)


def split_loader(split: Split, batch_size: int, device: torch.device | str, *, seed: int | None = None,
                run_seed: int = 0, workers: int = 0, channels_last: bool = False) -> BatchLoader | _DeviceLoader:
    """The split unaugmented for measuring: in its order, or (seed given) in one fixed order shuffled by `seed`; a
    BatchLoader for an in-memory split, else a DataLoader with `workers` (run_seed, channels_last: the run's)."""
    device = torch.device(device)
    if in_memory(split):
        return BatchLoader(split, batch_size, shuffle=seed is not None, seed=0 if seed is None else seed, device=device)
    if seed is not None:
        order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
        split = Subset(split, order.tolist())
    return folder_loader(split, batch_size=batch_size, train=False, device=device, seed=run_seed, workers=workers,
                         channels_last=channels_last)


def subset(split: Split, n: int | None, seed: int) -> Split:
    """A fixed seeded subset of n examples of a split, in the split's order (the whole split if n is None
    or >= its size): TensorSplit.subset for in-memory splits, the same choice as a torch Subset otherwise."""
    if not n or n >= len(split):
        return split
    if in_memory(split):
        return split.subset(n, seed=seed)
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(split, idx.tolist())


def shard_split(split: Split, batch_size: int | None = None, rank_: int | None = None, world: int | None = None) -> Split:
    """This rank's shard (see shard_range) of a split: a TensorSplit slice, or a torch Subset of a Dataset.

    Returns the split itself in a single process.
    """
    w = world_size() if world is None else int(world)
    if w <= 1:
        return split
    idx = shard_range(len(split), batch_size, rank_, w)
    if in_memory(split):
        sl = slice(idx.start, idx.stop)
        return TensorSplit(split.images[sl], split.labels[sl], split.mean, split.std)
    return Subset(split, list(idx))


class EpochSampler(DistributedSampler):
    """DistributedSampler (per-epoch shuffle from (seed, epoch), this rank's share) that can start mid-epoch.

    `set_epoch(epoch, start=k)` skips this rank's first k indices without loading them (exact resume
    of the order; random augmentation in workers is not replayed).
    """

    def __init__(self, dataset, *, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:  # type: ignore[override]
        super().set_epoch(epoch)
        self.start = int(start)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return max(self.num_samples - self.start, 0)


def folder_loader(split: Split, *, batch_size: int, train: bool, device: torch.device, seed: int = 0, workers: int = 0,
                  channels_last: bool = False) -> _DeviceLoader:
    """A torch DataLoader with worker processes over a torchvision-style dataset, yielding batches on `device`.

    train=True: each rank loads its share of every global batch (batch_size / world size), in an
    order shuffled per epoch (DistributedSampler semantics, drop_last), resumable mid-epoch.
    train=False: the split as given, in order (pass a shard_split for this rank's part of it).
    """
    w, r = world_size(), rank()
    pin = device.type == "cuda"
    if train:
        if batch_size % w:
            raise CsnError(f"global batch size {batch_size} is not divisible by the world size {w}; choose a multiple.")
        sampler = EpochSampler(split, num_replicas=w, rank=r, shuffle=True, seed=seed, drop_last=True)
        loader = DataLoader(split, batch_size=batch_size // w, sampler=sampler, num_workers=workers,
                            pin_memory=pin, drop_last=True, persistent_workers=workers > 0,
                            generator=torch.Generator().manual_seed(mix_seed(seed, r, 3)))
    else:
        loader = DataLoader(split, batch_size=batch_size, shuffle=False, num_workers=workers,
                            pin_memory=pin, drop_last=False)
    return _DeviceLoader(loader, device, channels_last and device.type != "mps")


class _DeviceLoader:
    """Moves DataLoader batches to the device; set_epoch reseeds the sampler's shuffle and sets where to start."""

    def __init__(self, loader, device: torch.device, channels_last: bool) -> None:
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.start_batch = 0
        self._len = len(loader)

    def __len__(self) -> int:
        """Batches in a whole epoch (also while an epoch is started mid-way)."""
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        sampler = self.loader.sampler
        if isinstance(sampler, EpochSampler):
            sampler.set_epoch(epoch, start=start_batch * self.loader.batch_size)
            self.start_batch = 0
        else:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            self.start_batch = start_batch

    def __iter__(self):
        for i, (x, y) in enumerate(self.loader):
            if i < self.start_batch:
                continue
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.start_batch = 0
        if isinstance(self.loader.sampler, EpochSampler):
            self.loader.sampler.start = 0


__all__ = ["subset", "shard_split", "EpochSampler", "folder_loader"]
