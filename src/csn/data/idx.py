"""Reader for MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST share the format)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from csn.errors import CsnError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "CSN_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CsnError(f"cannot read IDX file {path} ({e}); check that the file is complete or reinstall the dataset.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise CsnError(f"{path} is not an IDX file (bad magic number); point --data-root at MNIST-format IDX files.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise CsnError(f"{path} is truncated (incomplete header); re-download or reinstall the dataset.")
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    dtype = np.dtype(_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) - header < count * dtype.itemsize:
        raise CsnError(f"{path} is truncated ({len(raw) - header} data bytes, {count * dtype.itemsize} expected); re-download or reinstall the dataset.")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def find_idx_file(root: Path, stem: str) -> Path | None:
    """Find `stem` or `stem.gz` (also the common `stem.idx3-ubyte` dot variant) under root."""
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = root / cand
        if p.is_file():
            return p
    return None


def load_idx_dir(root: str | Path, *, apt_hint: bool = False) -> dict[str, torch.Tensor]:
    """Load the four standard IDX files of a directory as tensors (images uint8 [N,1,H,W], labels int64)."""
    root = Path(root)
    out: dict[str, torch.Tensor] = {}
    missing = []
    for key, stem in IDX_FILES.items():
        p = find_idx_file(root, stem)
        if p is None:
            missing.append(stem)
            continue
        arr = read_idx(p)
        if key.endswith("images"):
            if arr.ndim != 3:
                raise CsnError(f"{p} holds an array of shape {arr.shape}, expected [N, H, W] images.")
            out[key] = torch.from_numpy(arr.astype(np.uint8, copy=True)).unsqueeze(1)
        else:
            if arr.ndim != 1:
                raise CsnError(f"{p} holds an array of shape {arr.shape}, expected [N] labels.")
            out[key] = torch.from_numpy(arr.astype(np.int64, copy=True))
    if missing:
        fix = ("install them with `sudo apt-get install dataset-fashion-mnist` or point --data-root / "
               f"${FASHION_MNIST_ENV} at a directory that holds them") if apt_hint else "point --data-root at a directory that holds them"
        raise CsnError(f"missing IDX file(s) {', '.join(missing)} in {root}; {fix}.")
    for split in ("train", "test"):
        if len(out[f"{split}_images"]) != len(out[f"{split}_labels"]):
            raise CsnError(f"{root}: {split} images and labels have different lengths; the IDX files do not belong together.")
    return out


def fashion_mnist_root(data_root: str | None = None) -> str:
    """The Fashion-MNIST directory: explicit argument, else $CSN_FASHION_MNIST, else the Debian package path."""
    return data_root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip if the name ends in .gz); used by tests and tools."""
    array = np.ascontiguousarray(array)
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}
    if array.dtype not in codes:
        raise CsnError(f"write_idx supports uint8/int8 arrays, not {array.dtype}.")
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + array.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
