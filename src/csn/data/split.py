"""What a split of a dataset offers, whatever holds it: the `Split` protocol and its two kinds.

Code that needs to know how a split is held asks these protocols (`in_memory`, `split_labels`) instead of probing
attributes: an in-memory split (TensorData: images and labels as tensors, batched by BatchLoader) or a split read
from files by DataLoader workers (FolderData: torchvision's ImageFolder), possibly as a torch Subset of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Subset


@runtime_checkable
class Split(Protocol):
    """One split of a dataset: its examples can be counted (every kind below, and a torch Subset of one)."""

    def __len__(self) -> int: ...


@runtime_checkable
class TensorData(Split, Protocol):
    """A split held in memory (csn.data.tensors.TensorSplit): images [N, C, H, W] and integer labels [N]."""

    images: Tensor
    labels: Tensor


@runtime_checkable
class FolderData(Split, Protocol):
    """A split read from files by DataLoader workers (torchvision's ImageFolder): (image, label) per index, the
    labels listed as `targets`."""

    targets: Sequence[int]

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...


def split_labels(split: Split) -> Tensor | None:
    """The labels [N] of a split, in its order: an in-memory split's tensor, a folder's targets, a Subset's picked
    through its indices; None for a dataset that does not list its labels."""
    if isinstance(split, TensorData):
        return split.labels
    if isinstance(split, Subset):
        inner = split_labels(split.dataset)
        return None if inner is None else inner[torch.as_tensor(list(split.indices), dtype=torch.long)]
    if isinstance(split, FolderData):
        return torch.as_tensor(split.targets)
    return None


__all__ = ["Split", "TensorData", "FolderData", "split_labels"]
