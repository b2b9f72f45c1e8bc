"""Datasets: Fashion-MNIST, fmnist-pairs (100 classes of Fashion-MNIST pairs, csn.data.pairs) and any
MNIST-format IDX directory, a .npz file, synthetic data, ImageFolder (torchvision). The in-memory readers
(IDX, fmnist-pairs, npz, synthetic) check what they read through one function,
`csn.data.validate.validate_splits` (its docstring lists the rules)."""

from __future__ import annotations

from csn.data.idx import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_root,
    idx_splits,
    read_idx,
    write_idx,
)
from csn.data.imagefolder import imagefolder
from csn.data.npz import load_npz
from csn.data.pairs import PAIRS_NAME, fmnist_pairs
from csn.data.synthetic import SYNTHETIC_KEYS, synthetic
from csn.data.tensors import BatchLoader, DataSplits, TensorSplit, random_crop_flip
from csn.data.validate import MAX_DATA_ENV, validate_splits
from csn.errors import CsnError, unknown

DATASETS = ("fashion-mnist", PAIRS_NAME, "idx", "npz", "synthetic", "imagefolder")


def _no_options(name: str, kwargs: dict, valid: tuple[str, ...] = (), kind: str = "option") -> None:
    for k in kwargs:
        if k not in valid:
            if not valid:
                raise CsnError(f"dataset {name!r} takes no options, got {k!r}.")
            raise unknown(f"{name} {kind}", k, valid)


def load_dataset(name: str, data_root: str | None = None, **kwargs) -> DataSplits:
    """Load a dataset by name.

    'fashion-mnist' (data_root optional), 'fmnist-pairs' (100 classes: two Fashion-MNIST images side by
    side, label 10*a + b; data_root optional as for 'fashion-mnist'; cached, see csn.data.pairs), 'idx'
    (data_root: a directory of the four MNIST-format IDX files; classes, channels and image size are read
    from them), 'npz' (data_root: a .npz file with x_train, y_train, x_test, y_test; option
    layout='NHWC'/'NCHW'), 'synthetic' (options: SYNTHETIC_KEYS), 'imagefolder' (data_root with train/ and
    val/ class folders).
    """
    if name in ("fashion-mnist", "fmnist"):
        _no_options(name, kwargs)
        return idx_splits("fashion-mnist", fashion_mnist_root(data_root), list(FASHION_MNIST_CLASSES), apt_hint=True)
    if name == PAIRS_NAME:
        _no_options(name, kwargs)
        return fmnist_pairs(data_root)
    if name == "idx":
        _no_options(name, kwargs)
        if not data_root:
            raise CsnError("dataset 'idx' needs a directory of MNIST-format IDX files; pass --data-root DIR.")
        return idx_splits("idx", data_root)
    if name == "npz":
        _no_options(name, kwargs, ("layout",))
        return load_npz(data_root, **kwargs)
    if name == "synthetic":
        _no_options(name, kwargs, SYNTHETIC_KEYS, kind="key")
        return synthetic(**kwargs)
    if name == "imagefolder":
        return imagefolder(data_root, **kwargs)
    raise unknown("dataset", name, DATASETS)


__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "MAX_DATA_ENV",
    "SYNTHETIC_KEYS",
    "BatchLoader",
    "DataSplits",
    "TensorSplit",
    "fmnist_pairs",
    "idx_splits",
    "load_dataset",
    "load_npz",
    "random_crop_flip",
    "read_idx",
    "synthetic",
    "validate_splits",
    "write_idx",
]
