"""Reader for MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST share the format)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from csn.data.registry import register_dataset
from csn.data.tensors import DataSplits
from csn.data.validate import check_memory, path_problem, to_nchw, validate_splits
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
_DEFLATE_MAX_RATIO = 1032  # deflate cannot expand a byte into more than ~1032 bytes


def _read_exactly(f, n: int) -> bytes:
    """Up to n bytes (fewer only at the end of the stream), whatever the stream's short reads."""
    parts, got = [], 0
    while got < n:
        chunk = f.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a native-endian numpy array.

    The header's claimed size is checked before the data is allocated: against the bytes the file
    holds (uncompressed), against what the compressed size can expand to (.gz), and against the
    memory limit ($CSN_MAX_DATA_GB); a .gz file is decompressed only up to the claimed size (+1 byte,
    to detect trailing data). Trailing or missing bytes are refused: the header does not match.
    """
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        size_on_disk = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = _read_exactly(f, 4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
                code = f" (data type code 0x{head[2]:02X} is not an IDX type)" if len(head) == 4 and head[:2] == b"\0\0" else ""
                raise CsnError(f"{path} is not an IDX file (bad magic number{code}); point --data-root at MNIST-format IDX files.")
            ndim = head[3]
            dims = _read_exactly(f, 4 * ndim)
            if len(dims) < 4 * ndim:
                raise CsnError(f"{path} is truncated (incomplete header); re-download or reinstall the dataset.")
            shape = struct.unpack(">" + "I" * ndim, dims)
            dtype = np.dtype(_DTYPES[head[2]])
            need = math.prod(shape) * dtype.itemsize  # Python ints: no product wraps around
            header = 4 + 4 * ndim
            claim = f"its header claims a {' x '.join(f'{d:,}' for d in shape) or 'scalar'} {dtype.name} array ({need:,} bytes)"
            if not gz and size_on_disk - header != need:
                short = size_on_disk - header < need
                raise CsnError(f"{path} {'is truncated' if short else 'has trailing data'}: {claim} but the file holds "
                               f"{size_on_disk - header:,} data bytes; re-download or reinstall the dataset.")
            if gz and need > _DEFLATE_MAX_RATIO * size_on_disk + 1024:
                raise CsnError(f"{path} is truncated or corrupt: {claim}, more than {size_on_disk:,} compressed bytes "
                               "can hold; re-download or reinstall the dataset.")
            check_memory(need, f"IDX file {path} ({claim.removeprefix('its header claims ')})")
            data = _read_exactly(f, need + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise CsnError(f"cannot read IDX file {path} ({e}); check that the file is complete or reinstall the dataset.") from None
    if len(data) < need:
        raise CsnError(f"{path} is truncated: {claim} but it decompresses to {len(data):,} data bytes; "
                       "re-download or reinstall the dataset.")
    if len(data) > need:
        raise CsnError(f"{path} has trailing data: {claim} but it decompresses to more; re-download or reinstall the dataset.")
    return np.frombuffer(data, dtype=dtype, count=need // dtype.itemsize).reshape(shape).astype(dtype.newbyteorder("="))


def _candidates(root: Path, stem: str) -> list[Path]:
    """Where `stem` may lie under root: `stem`, `stem.gz` and the common `stem.idx3-ubyte` dot variant."""
    return [root / c for c in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz")]


def find_idx_file(root: Path, stem: str) -> Path | None:
    """Find `stem` or `stem.gz` (also the common `stem.idx3-ubyte` dot variant) under root."""
    return next((p for p in _candidates(root, stem) if p.is_file()), None)


def idx_paths(root: str | Path, apt_hint: bool = False) -> dict[str, Path]:
    """{key of IDX_FILES: path} of the four standard IDX files under root (plain or .gz); a missing one is a
    CsnError naming it (and `apt-get install dataset-fashion-mnist` when apt_hint)."""
    root = Path(root)
    problem = path_problem(root, "directory")
    if problem and not (root.is_file() and root.suffix == ".npz"):
        raise CsnError(f"data root {root} {problem}; point --data-root at a directory that holds the IDX files.")
    found = {key: find_idx_file(root, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] for k, p in found.items() if p is None]
    if missing:
        if root.is_file() and root.suffix == ".npz":
            raise CsnError(f"{root} is a .npz file, not a directory of IDX files; use --dataset npz.")
        odd = [(p, path_problem(p)) for stem in missing for p in _candidates(root, stem) if path_problem(p)]
        if odd:
            raise CsnError(f"IDX file {odd[0][0]} {odd[0][1]}; replace it with the file itself.")
        fix = ("install them with `sudo apt-get install dataset-fashion-mnist` or point --data-root / "
               f"${FASHION_MNIST_ENV} at a directory that holds them") if apt_hint else "point --data-root at a directory that holds them"
        raise CsnError(f"missing IDX file(s) {', '.join(missing)} in {root}; {fix}.")
    return found  # type: ignore[return-value]


def idx_splits(name: str, root: str | Path, class_names: list[str] | None = None, *,
               apt_hint: bool = False) -> DataSplits:
    """A directory of MNIST-format IDX files as a checked DataSplits (see csn.data.validate).

    Classes (largest training label + 1), channels and image size are read from the files: [N, H, W]
    images are one channel; [N, H, W, C] or [N, C, H, W] images follow `csn.data.validate.to_nchw`.
    `class_names` are used when they match the number of classes, else the classes are named 0..K-1.
    """
    root = Path(root)
    paths = idx_paths(root, apt_hint)
    arrays = {key: read_idx(p) for key, p in paths.items()}
    sources = {key: str(p) for key, p in paths.items()}
    train_x, test_x = to_nchw(arrays["train_images"], arrays["test_images"], sources,
                              fix="store the images as [N, H, W] (one channel) or as a .npz file with a layout entry")
    data = validate_splits(train_x, arrays["train_labels"], test_x, arrays["test_labels"], name=name, sources=sources)
    if class_names and len(class_names) == data.num_classes:
        data.class_names = list(class_names)
    return data


def fashion_mnist_root(data_root: str | None = None) -> str:
    """The Fashion-MNIST directory: explicit argument, else $CSN_FASHION_MNIST, else the Debian package path."""
    return data_root or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_ROOT


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write an array as an IDX file (gzip if the name ends in .gz), in any IDX type (uint8, int8,
    int16, int32, float32, float64; stored big-endian as the format says); used by tests and tools."""
    array = np.asarray(array)
    codes = {np.dtype(t).newbyteorder("=").str: code for code, t in _DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("=").str)
    if code is None:
        raise CsnError(f"write_idx supports uint8, int8, int16, int32, float32 and float64 arrays, not {array.dtype}.")
    big = np.ascontiguousarray(array, dtype=np.dtype(_DTYPES[code]))
    header = bytes([0, 0, code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    data = header + big.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@register_dataset("fashion-mnist", aliases=("fmnist",))
def fashion_mnist(data_root: str | None = None) -> DataSplits:
    """Fashion-MNIST (10 classes); data_root optional: $CSN_FASHION_MNIST, else the Debian package's folder."""
    return idx_splits("fashion-mnist", fashion_mnist_root(data_root), list(FASHION_MNIST_CLASSES), apt_hint=True)


@register_dataset("idx")
def idx_dataset(data_root: str | None = None) -> DataSplits:
    """A directory of the four MNIST-format IDX files (classes, channels and image size read from them)."""
    if not data_root:
        raise CsnError("dataset 'idx' needs a directory of MNIST-format IDX files; pass --data-root DIR.")
    return idx_splits("idx", data_root)
