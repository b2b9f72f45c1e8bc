"""Datasets: Fashion-MNIST and any MNIST-format IDX directory, synthetic data, ImageFolder (torchvision)."""

from __future__ import annotations

from csn.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_root, load_idx_dir, read_idx, write_idx
from csn.data.synthetic import synthetic
from csn.data.tensors import BatchLoader, DataSplits, TensorSplit, random_crop_flip
from csn.errors import unknown

DATASETS = ("fashion-mnist", "idx", "synthetic", "imagefolder")


def _idx_splits(name: str, root: str, class_names: list[str] | None, apt_hint: bool) -> DataSplits:
    arrays = load_idx_dir(root, apt_hint=apt_hint)
    num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
    imgs = arrays["train_images"]
    mean = float(imgs.float().mean() / 255.0)
    std = float(imgs.float().std() / 255.0)
    train = TensorSplit(imgs, arrays["train_labels"], (mean,), (std,))
    test = TensorSplit(arrays["test_images"], arrays["test_labels"], (mean,), (std,))
    names = list(class_names) if class_names and len(class_names) == num_classes else [str(k) for k in range(num_classes)]
    return DataSplits(name, train, test, num_classes, 1, imgs.shape[-1], names)


def load_dataset(name: str, data_root: str | None = None, **kwargs) -> DataSplits:
    """Load a dataset by name: 'fashion-mnist', 'idx' (needs data_root), 'synthetic', 'imagefolder'."""
    if name in ("fashion-mnist", "fmnist"):
        return _idx_splits("fashion-mnist", fashion_mnist_root(data_root), list(FASHION_MNIST_CLASSES), True)
    if name == "idx":
        if not data_root:
            from csn.errors import CsnError
            raise CsnError("dataset 'idx' needs a directory of MNIST-format IDX files; pass --data-root DIR.")
        return _idx_splits("idx", data_root, None, False)
    if name == "synthetic":
        return synthetic(**kwargs)
    if name == "imagefolder":
        from csn.data.imagefolder import imagefolder
        return imagefolder(data_root, **kwargs)
    raise unknown("dataset", name, DATASETS)


__all__ = [
    "BatchLoader", "DataSplits", "TensorSplit", "random_crop_flip", "synthetic", "load_dataset", "read_idx",
    "write_idx", "load_idx_dir", "FASHION_MNIST_CLASSES", "DATASETS",
]
