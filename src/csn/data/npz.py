"""Reader for a dataset exported to one `.npz` file: arrays x_train, y_train, x_test, y_test.

    numpy.savez("mydata.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    csn train --dataset npz --data-root mydata.npz

Images: [N, H, W] (one channel), [N, H, W, C] or [N, C, H, W]. The channel axis of 4-d arrays is
decided by `csn.data.validate.to_nchw`: axis 3 when its size is at most 4 and axis 1's is not, axis 1
when its size is at most 4 and axis 3's is not; otherwise (e.g. [N, 3, 4, 3], or 8 channels) the file
must say, with an entry layout="NHWC" or layout="NCHW" (or `load_dataset(..., layout=...)`).
Pixels and labels follow csn.data.validate: uint8 pixels are kept; other integers in 0..255 become
uint8; floats are intensities in [0, 1] or pixel values in [0, 255] (a note says which); labels are
integers or whole-number floats. Optional entry class_names: one string per class.

The file is read with allow_pickle=False (object arrays are refused, never unpickled), and every
array's header is read before its data, so an array claiming more than the memory limit
($CSN_MAX_DATA_GB, default 8 GB) is refused before it is allocated or decompressed.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from csn.data.registry import register_dataset
from csn.data.tensors import DataSplits
from csn.data.validate import check_memory, note, path_problem, to_nchw, validate_splits
from csn.errors import CsnError

NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_OPTIONAL = ("class_names", "layout")
_KEY_OF = {"x_train": "train_images", "y_train": "train_labels", "x_test": "test_images", "y_test": "test_labels"}
_SAVEZ = "numpy.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)"


def _header(z: np.lib.npyio.NpzFile, key: str, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its .npy header, without reading (or decompressing) its data."""
    member = key + ".npy" if key + ".npy" in z.zip.namelist() else key
    with z.zip.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = reader(f)
    if dtype.hasobject or dtype.names is not None:
        raise CsnError(f"array {key} in {path} holds {'Python objects' if dtype.hasobject else 'structured records'} "
                       f"({dtype}); csn reads plain numeric arrays only (it never unpickles): save {key} as a "
                       "numeric array.")
    return tuple(int(d) for d in shape), dtype


@register_dataset("npz", options=("layout",), summary="data_root: a .npz file with x_train, y_train, x_test, "
                  "y_test (option layout='NHWC'/'NCHW')")
def load_npz(path: str | Path | None, layout: str | None = None, name: str = "npz") -> DataSplits:
    """Load and check the .npz dataset at `path` (see the module docstring for the format and rules)."""
    if not path:
        raise CsnError(f"dataset 'npz' needs a .npz file; pass --data-root FILE.npz (written with {_SAVEZ}).")
    path = Path(path)
    if path.is_dir():
        raise CsnError(f"{path} is a directory; dataset 'npz' reads one .npz file (--data-root FILE.npz); "
                       "for a directory of IDX files use --dataset idx.")
    problem = path_problem(path, "file")
    if problem:
        raise CsnError(f"data root {path} {problem}; pass --data-root FILE.npz written with {_SAVEZ}.")
    if not path.is_file():
        raise CsnError(f"{path} does not exist; pass --data-root FILE.npz written with {_SAVEZ}.")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CsnError(f"cannot read {path} ({e.strerror}); check its permissions.") from None
    if magic != b"PK\x03\x04":
        raise CsnError(f"{path} is not a .npz archive (a zip of .npy arrays); write it with {_SAVEZ}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_ARRAYS if k not in z.files]
            if missing:
                raise CsnError(f"{path} lacks the array{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                               f"(it holds: {', '.join(z.files) or 'nothing'}); write it with {_SAVEZ}.")
            extra = [k for k in z.files if k not in NPZ_ARRAYS + NPZ_OPTIONAL]
            if extra:
                note(f"{path}: ignoring the array{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                     f"(csn reads {', '.join(NPZ_ARRAYS)} and optionally {', '.join(NPZ_OPTIONAL)}).")
            wanted = [k for k in NPZ_ARRAYS + NPZ_OPTIONAL if k in z.files]
            headers = {k: _header(z, k, path) for k in wanted}
            need = sum(math.prod(shape) * dtype.itemsize for shape, dtype in headers.values())
            parts = ", ".join(f"{k} {list(headers[k][0])} {headers[k][1]}" for k in NPZ_ARRAYS)
            check_memory(need, f"the arrays in {path} ({parts})")
            arrays = {k: z[k] for k in wanted}
    except CsnError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError) as e:
        raise CsnError(f"{path} is not a readable .npz file ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
                       f" write it with {_SAVEZ}.") from None
    sources = {_KEY_OF[k]: f"{path} (array {k})" for k in NPZ_ARRAYS}
    file_layout = arrays.get("layout")
    if file_layout is not None:
        if file_layout.dtype.kind != "U" or file_layout.size != 1:
            raise CsnError(f"array layout in {path} must be one string, 'NHWC' or 'NCHW'; got a {file_layout.dtype} "
                           f"array of shape {list(file_layout.shape)}.")
        file_layout = str(file_layout.reshape(()))
        if layout is not None and str(layout).upper() != file_layout.upper():
            raise CsnError(f"{path} says layout={file_layout!r} but {layout!r} was asked for; drop one of them.")
    names = arrays.get("class_names")
    if names is not None:
        if names.dtype.kind not in "US" or names.ndim != 1:
            raise CsnError(f"array class_names in {path} must be a 1-d array of strings (one per class); got a "
                           f"{names.dtype} array of shape {list(names.shape)}.")
        names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    train_x, test_x = to_nchw(arrays["x_train"], arrays["x_test"], sources, layout or file_layout,
                              fix=f"add layout='NHWC' or layout='NCHW' to {path} (numpy.savez(..., layout='NHWC'))")
    return validate_splits(train_x, arrays["y_train"], test_x, arrays["y_test"], name=name, sources=sources,
                           class_names=names)


__all__ = ["NPZ_ARRAYS", "load_npz"]
