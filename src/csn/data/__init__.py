"""Datasets: Fashion-MNIST, fmnist-pairs (100 classes of Fashion-MNIST pairs, csn.data.pairs) and any
MNIST-format IDX directory, a .npz file, synthetic data, ImageFolder (torchvision). The in-memory readers
(IDX, fmnist-pairs, npz, synthetic) check what they read through one function,
`csn.data.validate.validate_splits` (its docstring lists the rules)."""

from __future__ import annotations

from csn.data.idx import (
    FASHION_MNIST_CLASSES,
    idx_splits,
    read_idx,
    write_idx,
)
from csn.data.imagefolder import imagefolder
from csn.data.npz import load_npz
from csn.data.pairs import fmnist_pairs
from csn.data.registry import FORMATS, DatasetFormat, dataset_format, dataset_help, register_dataset
from csn.data.synthetic import SYNTHETIC_KEYS, synthetic
from csn.data.tensors import BatchLoader, DataSplits, TensorSplit, random_crop_flip
from csn.data.validate import MAX_DATA_ENV, validate_splits

DATASETS = FORMATS
"""The dataset formats by name (a registry: `name in DATASETS`, `DATASETS.names()`)."""


def load_dataset(name: str, data_root: str | None = None, **kwargs) -> DataSplits:
    """Load a dataset by name: a registered format (csn.data.registry; `dataset_help()` lists them) read from
    data_root with the options it takes.

    'fashion-mnist' (data_root optional), 'fmnist-pairs' (100 classes: two Fashion-MNIST images side by
    side, label 10*a + b; data_root optional as for 'fashion-mnist'; cached, see csn.data.pairs), 'idx'
    (data_root: a directory of the four MNIST-format IDX files; classes, channels and image size are read
    from them), 'npz' (data_root: a .npz file with x_train, y_train, x_test, y_test; option
    layout='NHWC'/'NCHW'), 'synthetic' (options: SYNTHETIC_KEYS), 'imagefolder' (data_root with train/ and
    val/ class folders).
    """
    return dataset_format(name).load(name, data_root, kwargs)


__all__ = [
    "DATASETS",
    "FORMATS",
    "DatasetFormat",
    "FASHION_MNIST_CLASSES",
    "MAX_DATA_ENV",
    "SYNTHETIC_KEYS",
    "BatchLoader",
    "DataSplits",
    "TensorSplit",
    "dataset_format",
    "dataset_help",
    "fmnist_pairs",
    "idx_splits",
    "imagefolder",
    "load_dataset",
    "load_npz",
    "random_crop_flip",
    "read_idx",
    "register_dataset",
    "synthetic",
    "validate_splits",
    "write_idx",
]
