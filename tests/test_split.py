"""The Split protocol: what a split offers (size, labels; images in memory or a folder read by workers)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

from csn.data.loaders import in_memory, shard_split, subset
from csn.data.split import FolderData, Split, TensorData, split_labels
from csn.data.tensors import TensorSplit


class _Folder(Dataset):
    """An ImageFolder-shaped dataset: (image, label) per index, the labels listed as targets."""

    def __init__(self, targets: list[int]) -> None:
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1, 2, 2), self.targets[i]


class _Unlabelled(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1), 0


def test_kinds_of_split():
    held = TensorSplit(torch.zeros(6, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    folder = _Folder([0, 1, 1, 0])
    assert isinstance(held, TensorData) and isinstance(held, Split) and not isinstance(held, FolderData)
    assert isinstance(folder, FolderData) and not isinstance(folder, TensorData)
    assert in_memory(held) and not in_memory(folder) and not in_memory(Subset(folder, [0]))
    assert isinstance(subset(held, 3, seed=0), TensorSplit) and isinstance(subset(folder, 2, seed=0), Subset)
    assert shard_split(held, world=1) is held


def test_split_labels():
    held = TensorSplit(torch.zeros(4, 1, 2, 2), torch.tensor([3, 1, 2, 0]))
    assert torch.equal(split_labels(held), held.labels)
    folder = _Folder([0, 1, 2, 1, 0])
    assert split_labels(folder).tolist() == [0, 1, 2, 1, 0]
    assert split_labels(Subset(folder, [4, 2, 1])).tolist() == [0, 2, 1]
    assert split_labels(Subset(Subset(folder, [1, 2, 3]), [2, 0])).tolist() == [1, 1]
    assert split_labels(_Unlabelled()) is None and split_labels(Subset(_Unlabelled(), [0])) is None
