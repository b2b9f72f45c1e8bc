"""fmnist-pairs: a 100-class dataset made from Fashion-MNIST, two images side by side.

Why: the study's selectivity regularizer ran on ImageNet (1,000 classes, 32-64 images per GPU batch), where
nearly every class appears about once per batch; Fashion-MNIST's 10 classes put a dozen images of each class
in every batch. A pair (left | right) of Fashion-MNIST images of classes a and b is one 1 x 28 x 56 image of
class 10*a + b ("T-shirt/top | Trouser"): 100 classes, no download.

The pairing rule (`pair_indices`), per split, train pairs from the training images only and test pairs from
the test images only:

- per = (smallest class count of the split) // 10: 600 train and 100 test pairs per class on Fashion-MNIST
  (6,000 / 1,000 images per class: every image is used exactly once as a left and once as a right image).
- For each side (0 left, 1 right) and source class c, c's images (in file order, j = 0, 1, ...) are ordered
  by the key splitmix64 chained over (PAIRS_SEED, split (0 train, 1 test), side, c, j) (`pair_keys`): a
  fixed, documented hash, so the order never depends on a library's random number generator.
- Dealing: the first 10 * per images of class a in the left order give the left images of the classes
  (a, 0), (a, 1), ..., (a, 9), `per` each and in that order; the right order of class b gives the right
  images of (0, b), (1, b), ..., (9, b). Pair k of class 10*a + b is left[a][b*per + k] | right[b][a*per + k].
- Pairs are stored by class (10*a + b), then k.

The built dataset is cached as a checked file (`cache_dir()`: $CSN_CACHE, else ~/.cache/csn):
fmnist-pairs-v{PAIRS_FORMAT}-{KEY}.npz, KEY from the sha256s of the four source IDX files, the format
version and the seed; an uncompressed .npz (read with allow_pickle=False; the zip written byte-for-byte
deterministically) with a sha256 sidecar (`sha256sum -c` format), both written atomically (temporary
file, fsync, rename). Every read checks the sha256: a corrupt, modified or unreadable cache file is rebuilt
with a one-line note on stderr, never trusted; an unwritable cache directory builds in memory (a note).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from csn.core.resources import new_file_mode
from csn.data.idx import FASHION_MNIST_CLASSES, fashion_mnist_root, idx_paths, idx_splits
from csn.data.registry import register_dataset
from csn.data.tensors import DataSplits
from csn.data.validate import check_memory, note, validate_splits
from csn.errors import CsnError

PAIRS_NAME = "fmnist-pairs"
PAIRS_SEED = 23  # issue 23; a constant: changing it (or the rule) needs a new PAIRS_FORMAT
PAIRS_FORMAT = 1
CACHE_ENV = "CSN_CACHE"
SPLITS = ("train", "test")
SIDES = ("left", "right")
SIDECAR = ".sha256"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed zip entry times: the same pairs give the same file bytes
_ARRAYS = ("x_train", "y_train", "x_test", "y_test", "train_left", "train_right", "test_left", "test_right",
           "class_names", "sources", "format", "seed")


# ----------------------------------------------------------------------------- the pairing rule
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on a uint64 array (wrapping arithmetic)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def pair_keys(split: int, side: int, cls: int, n: int, seed: int = PAIRS_SEED) -> np.ndarray:
    """The sort keys of a class's n images (file order j = 0..n-1): splitmix64 chained over
    (seed, split, side, cls, j), i.e. h = sm(seed); h = sm(h ^ split); ...; key_j = sm(h ^ j)."""
    h = _splitmix64(np.full(max(n, 1), seed, dtype=np.uint64))
    for v in (split, side, cls):
        h = _splitmix64(h ^ np.uint64(v))
    return _splitmix64(h ^ np.arange(max(n, 1), dtype=np.uint64))[:n]


def pair_indices(labels: Sequence[int] | np.ndarray, split: str, classes: int = 10,
                 seed: int = PAIRS_SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(left, right, pair_labels) of one split by the module docstring's rule: indices into the split's
    source images (int64 [P]) and the pair labels 10*a + b (int64 [P]), sorted by label then k."""
    labels = np.asarray(labels)
    s = SPLITS.index(split)
    counts = np.bincount(labels, minlength=classes)
    if len(counts) != classes:
        raise CsnError(f"{PAIRS_NAME} pairs the images of {classes} classes, but the {split} labels go up to "
                       f"{len(counts) - 1}.")
    per = int(counts.min()) // classes
    if per < 1:
        raise CsnError(f"{PAIRS_NAME} needs at least {classes} {split} images of each class (to deal one to each "
                       f"of the {classes} classes it pairs with), but class {int(counts.argmin())} has "
                       f"{int(counts.min())}.")
    order = [[_dealt(labels, s, d, c, classes * per, seed) for c in range(classes)] for d in range(len(SIDES))]
    left = np.concatenate([order[0][a][b * per:(b + 1) * per] for a in range(classes) for b in range(classes)])
    right = np.concatenate([order[1][b][a * per:(a + 1) * per] for a in range(classes) for b in range(classes)])
    return left, right, np.repeat(np.arange(classes * classes, dtype=np.int64), per)


def _dealt(labels: np.ndarray, split: int, side: int, cls: int, n: int, seed: int) -> np.ndarray:
    """The first n images of class `cls` in the order of their keys (indices into the split)."""
    idx = np.flatnonzero(labels == cls)
    return idx[np.argsort(pair_keys(split, side, cls, len(idx), seed), kind="stable")][:n].astype(np.int64)


def pair_class_names(names: Sequence[str] = FASHION_MNIST_CLASSES) -> list[str]:
    """'left | right' names of the pair classes, class 10*a + b = names[a] | names[b]."""
    return [f"{a} | {b}" for a in names for b in names]


def build_arrays(root: str | Path, digests: dict[str, str] | None = None) -> dict[str, np.ndarray]:
    """The pairs of the Fashion-MNIST IDX files in `root` (read through csn.data.idx), as the cache file's
    arrays: x_/y_ train and test, the source indices of each side (train_left, ...), class_names,
    sources ('KEY SHA256' of each IDX file), format and seed."""
    data = idx_splits("fashion-mnist", root, list(FASHION_MNIST_CLASSES), apt_hint=True)
    if data.num_classes != len(FASHION_MNIST_CLASSES):
        raise CsnError(f"{PAIRS_NAME} pairs the {len(FASHION_MNIST_CLASSES)} Fashion-MNIST classes, but the IDX "
                       f"files in {root} hold {data.num_classes}; point --data-root / $CSN_FASHION_MNIST at "
                       "Fashion-MNIST.")
    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        x, y = getattr(data, split).images.numpy(), getattr(data, split).labels.numpy()
        left, right, labels = pair_indices(y, split)
        check_memory(len(labels) * x[:1].nbytes * 2, f"the {len(labels):,} {split} pairs of {PAIRS_NAME}")
        out[f"x_{split}"] = np.concatenate([x[left], x[right]], axis=3)
        out[f"y_{split}"], out[f"{split}_left"], out[f"{split}_right"] = labels, left, right
    out["class_names"] = np.array(pair_class_names())
    digests = digests if digests is not None else source_digests(idx_paths(root, apt_hint=True))
    out["sources"] = np.array([f"{k} {v}" for k, v in sorted(digests.items())])
    out["format"], out["seed"] = np.array(PAIRS_FORMAT), np.array(PAIRS_SEED)
    return out


# ----------------------------------------------------------------------------- the cache file
def cache_dir() -> Path:
    """Where csn caches built data: $CSN_CACHE when set, else ~/.cache/csn."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "csn"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_digests(paths: dict[str, Path]) -> dict[str, str]:
    """{IDX key: sha256} of the source files (as stored: a .gz file's compressed bytes)."""
    try:
        return {k: sha256_file(p) for k, p in paths.items()}
    except OSError as e:
        raise CsnError(f"cannot read the Fashion-MNIST file {e.filename} ({e.strerror}); check its permissions.") from None


def cache_path(digests: dict[str, str], directory: str | Path | None = None) -> Path:
    """The cache file of the pairs of the sources with these sha256s (format and seed in the key too)."""
    text = f"{PAIRS_NAME} format {PAIRS_FORMAT} seed {PAIRS_SEED}\n" + "".join(
        f"{k} {v}\n" for k, v in sorted(digests.items()))
    key = hashlib.sha256(text.encode()).hexdigest()[:16]
    return Path(directory if directory is not None else cache_dir()) / f"{PAIRS_NAME}-v{PAIRS_FORMAT}-{key}.npz"


def sidecar(path: str | Path) -> Path:
    """The checksum file of `path`: PATH.sha256."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path`, fsynced and renamed onto it when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, new_file_mode())  # the umask's mode, not the temporary file's 0600
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_npz(f: BinaryIO, arrays: dict[str, np.ndarray]) -> None:
    """An uncompressed .npz with fixed entry times: equal arrays give equal bytes."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key in _ARRAYS:
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_TIME)
            info.external_attr = 0o644 << 16
            with z.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(arrays[key]), allow_pickle=False)


def write_cache(path: str | Path, arrays: dict[str, np.ndarray]) -> str:
    """Atomically write the pairs' cache file and then its sha256 sidecar; return the sha256."""
    path = Path(path)
    with _atomic(path) as f:
        _write_npz(f, arrays)
        f.flush()
        f.seek(0)
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _atomic(sidecar(path)) as f:
        f.write(f"{digest}  {path.name}\n".encode())
    return digest


def read_cache(path: str | Path) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(arrays, None) from a cache file whose bytes match its sidecar's sha256; (None, None) when there is no
    cache file; (None, what is wrong) when it cannot be trusted (no valid sidecar, corrupt, unreadable)."""
    path = Path(path)
    if not path.exists():
        return None, None
    try:
        want = sidecar(path).read_bytes().decode("ascii").split(" ", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        want = ""
    if len(want) != 64:
        return None, f"has no valid checksum ({sidecar(path).name} is missing or damaged)"
    try:
        check_memory(path.stat().st_size, f"the cached {PAIRS_NAME} file {path}")
        data = path.read_bytes()
    except OSError as e:
        return None, f"cannot be read ({e.strerror})"
    if hashlib.sha256(data).hexdigest() != want:
        return None, f"is corrupt (its sha256 differs from {sidecar(path).name}: truncated or modified)"
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in _ARRAYS}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        return None, f"cannot be read ({type(e).__name__})"
    if int(arrays["format"]) != PAIRS_FORMAT or int(arrays["seed"]) != PAIRS_SEED:
        return None, f"holds format {int(arrays['format'])} / seed {int(arrays['seed'])}, not {PAIRS_FORMAT} / {PAIRS_SEED}"
    return arrays, None


def _cached(path: Path, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The cache file's arrays, else built and written to it; one note on stderr: built and cached, or a bad
    cache file is rebuilt, or the cache cannot be written (the built arrays are used all the same)."""
    arrays, problem = read_cache(path)
    if arrays is not None:
        return arrays
    if problem:
        note(f"the cached {PAIRS_NAME} file {path} {problem}; not used: rebuilding it.")
    arrays = build()
    try:
        write_cache(path, arrays)
        if not problem:
            note(f"{PAIRS_NAME}: built and cached in {path} ({path.stat().st_size / 1e6:.0f} MB; ${CACHE_ENV} moves "
                 "the cache).")
    except OSError as e:
        note(f"cannot write the {PAIRS_NAME} cache {path} ({e.strerror or e}); using the pairs built in memory "
             f"(set {CACHE_ENV} to a writable directory to cache them).")
    return arrays


# ----------------------------------------------------------------------------- the dataset
@register_dataset(PAIRS_NAME, summary="100 classes: two Fashion-MNIST images side by side, label 10*a + b "
                  "(data_root optional, as for fashion-mnist; cached)")
def fmnist_pairs(data_root: str | Path | None = None, *, cache: str | Path | None = None) -> DataSplits:
    """The fmnist-pairs dataset (module docstring) of the Fashion-MNIST files in `data_root` (default:
    $CSN_FASHION_MNIST, else the Debian package's folder), read from the cache in `cache` (default
    `cache_dir()`) when it holds them with a valid sha256, else built and cached."""
    root = Path(fashion_mnist_root(str(data_root) if data_root else None))
    digests = source_digests(idx_paths(root, apt_hint=True))
    path = cache_path(digests, cache)
    arrays = _cached(path, lambda: build_arrays(root, digests))
    sources = {f"{split}_{what}": f"{path} (array {key}_{split})" for split in SPLITS
               for what, key in (("images", "x"), ("labels", "y"))}
    return validate_splits(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"],
                           name=PAIRS_NAME, sources=sources, class_names=[str(c) for c in arrays["class_names"]])


__all__ = ["CACHE_ENV", "PAIRS_FORMAT", "PAIRS_NAME", "PAIRS_SEED", "build_arrays", "cache_dir", "cache_path",
           "fmnist_pairs", "pair_class_names", "pair_indices", "pair_keys", "read_cache", "write_cache"]
