"""In-memory datasets and a batch loader with whole-batch augmentation (no per-sample Python work)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from csn.data.split import Split
from csn.errors import CsnError


@dataclass
class TensorSplit:
    """One split held in memory: images [N, C, H, W], integer labels [N].

    uint8 images are pixel values (divided by 255 when normalized); float images are used as they
    are (intensities in [0, 1] read from files, or standardized synthetic data); then (x - mean) / std.
    """

    images: Tensor
    labels: Tensor
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> TensorSplit:
        """A stratification-free, seeded random subset of n examples (the whole split if n is None or >= N)."""
        if n is None or n >= len(self):
            return self
        if n <= 0:
            raise CsnError(f"a subset size must be positive, got {n}.")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return TensorSplit(self.images[idx], self.labels[idx], self.mean, self.std)

    def normalize(self, x: Tensor) -> Tensor:
        """Convert a batch of stored images to normalized float32."""
        x = x.float()
        if self.images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


@dataclass
class DataSplits:
    """A dataset: train and test splits plus what models need to know about it."""

    name: str
    train: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int | tuple[int, int]  # an int for square images, else (height, width)
    class_names: list[str] = field(default_factory=list)
    train_eval: Split | None = None  # the training split under the evaluation transform, where `train` augments
                                     # (ImageFolder); None: `train` itself is unaugmented (in-memory splits)


def random_crop_flip(x: Tensor, gen: torch.Generator, *, pad: int = 0, flip: bool = False) -> Tensor:
    """Random crop with zero padding and random horizontal flip, on a whole batch at once."""
    n, _, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h)[None, :]).to(x.device)  # [n, h]
        cols = (ox[:, None] + torch.arange(w)[None, :]).to(x.device)  # [n, w]
        b = torch.arange(n, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x.contiguous()


def mix_seed(*values: int) -> int:
    """Deterministic 62-bit seed from integers (Python's hash() of tuples is salted per process)."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x3FFFFFFFFFFFFFFF


@dataclass(frozen=True)
class BatchOptions:
    """How a BatchLoader batches (its keyword settings): order, augmentation, this rank's slice, device, layout."""

    shuffle: bool = False
    seed: int = 0
    augment: dict | None = None
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    device: str | torch.device = "cpu"
    channels_last: bool = False


class BatchLoader:
    """Iterate (images, labels) batches of an in-memory split: normalized float32, optionally augmented.

    Shuffling and augmentation are seeded per (seed, epoch, batch), so any batch can be reproduced
    exactly (resume mid-epoch) and every data-parallel rank sees its slice of the same global batch.
    The settings (shuffle, seed, augment, drop_last, rank, world_size, device, channels_last) are the fields of
    BatchOptions.
    """

    def __init__(self, split: TensorSplit, batch_size: int, **settings: Any) -> None:
        o = BatchOptions(**settings)
        if batch_size <= 0:
            raise CsnError(f"batch size must be positive, got {batch_size}.")
        if batch_size % o.world_size:
            raise CsnError(f"global batch size {batch_size} is not divisible by the world size {o.world_size}; choose a multiple.")
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, o.shuffle, o.seed
        self.augment = o.augment or {}
        self.drop_last, self.rank, self.world_size = o.drop_last, o.rank, o.world_size
        self.device, self.channels_last = torch.device(o.device), o.channels_last
        self.epoch = 0
        self.start_batch = 0

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and the batch to start from (for resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> Tensor:
        n = len(self.split)
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        return torch.randperm(n, generator=g)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        per_rank = self.batch_size // self.world_size
        for b in range(self.start_batch, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.split.images[idx]
            y = self.split.labels[idx]
            if self.augment:
                g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, b, 2))
                x = random_crop_flip(x, g, pad=int(self.augment.get("crop_pad", 0)), flip=bool(self.augment.get("flip", False)))
            if self.world_size > 1:
                sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank) if len(idx) == self.batch_size else \
                    slice(self.rank * -(-len(idx) // self.world_size), (self.rank + 1) * -(-len(idx) // self.world_size))
                x, y = x[sl], y[sl]
            x = self.split.normalize(x.to(self.device, non_blocking=True))
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y.to(self.device, non_blocking=True)
        self.start_batch = 0
