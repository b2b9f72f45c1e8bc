"""The checks every in-memory dataset reader (IDX, .npz, synthetic) goes through, in one place.

A reader hands `validate_splits` its four arrays (train/test images as [N, C, H, W], train/test
labels as [N]) and the name of the file or array each came from; it gets back a `DataSplits` or a
`CsnError` whose message is one sentence naming the file and the fix. What is checked:

- shapes: labels are [N]; every split has at least one image, and as many labels as images; images
  have at least one channel and at least 1x1 pixels; train and test images have the same channels
  and height x width.
- pixels (files; synthetic data is generated already standardized and skips this): uint8 is kept
  as is. Other integer types are accepted when every value lies in 0..255 and are converted to
  uint8 (a note on stderr); values outside 0..255 are refused (never wrapped). Floats must be
  finite; the training split decides the scale: all values in [0, 1] are intensities (kept as
  float32), else all in [0, 255] are pixel values (divided by 255 into float32); anything else
  (negative, above 255: already-standardized data) is refused, and the test split must lie on the
  training split's scale. A note on stderr says which reading was taken. Both splits must be
  integer or both float. bool, complex and other types are refused.
- labels: integers, or floats that are whole numbers (converted, with a note); no negative label
  and none above 2**31 - 1. K = largest training label + 1, and every class 0..K-1 has at least
  one training example (a stray label 200 does not make a 201-class model); K >= 2. Every test
  label lies in 0..K-1 and every class has at least one test example: class selectivity (CSI)
  averages over every class of the evaluation split, so a split without a class is refused here,
  at load time, rather than by the analysis after training.
- normalization: each training channel must vary (a constant channel, e.g. all zeros, is refused:
  nothing to learn and a zero standard deviation); its mean and standard deviation (in [0, 1]
  units) normalize both splits.

Readers bound what they allocate before allocating it: `check_memory` refuses more than
$CSN_MAX_DATA_GB gigabytes (default 8) with the estimate and the limit.

`image_size` is an int for square images and (H, W) for others (run.json records [H, W]).
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from csn.core.resources import check_limit, env_limit
from csn.data.tensors import DataSplits, TensorSplit
from csn.errors import CsnError

MAX_DATA_ENV = "CSN_MAX_DATA_GB"
DEFAULT_MAX_DATA_GB = 8.0
MAX_LABEL = 2**31 - 1
KEYS = ("train_images", "train_labels", "test_images", "test_labels")
LAYOUTS = ("NHWC", "NCHW")


# ----------------------------------------------------------------------------- resource bounds
def max_data_bytes() -> int:
    """The most bytes a dataset reader may allocate: $CSN_MAX_DATA_GB gigabytes, default 8."""
    return int(env_limit(MAX_DATA_ENV, DEFAULT_MAX_DATA_GB, example="e.g. 32") * 1e9)


def check_memory(nbytes: int, what: str) -> None:
    """Refuse `what` (a description of the data) when it needs more than the limit, before allocating it."""
    check_limit(nbytes, max_data_bytes(), what=what, raise_it=f"set {MAX_DATA_ENV} to raise it")


def path_problem(path: str | os.PathLike, want: str = "file") -> str | None:
    """Why `path` cannot be read as a regular `want` ('file' or 'directory') although something is there, as the
    end of a sentence ('is a FIFO (named pipe), not a file'): a symbolic link loop, a link to nothing, a FIFO, a
    device (a link to /dev/zero), a socket, or the other kind. None when it is a `want`, or nothing is there."""
    link = os.path.islink(path)
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link loop (it leads back to itself)"
        if link:
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return f"cannot be read ({e.strerror})"
    to = f" (a link to {os.path.realpath(path)})" if link else ""
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    for test, kind in kinds:
        if test(st.st_mode):
            return f"is {kind}{to}, not a {want}"
    if want == "file" and stat.S_ISDIR(st.st_mode):
        return f"is a directory{to}, not a file"
    if want == "directory" and stat.S_ISREG(st.st_mode):
        return f"is a file{to}, not a directory"
    return None


def note(message: str) -> None:
    """One line on stderr about a conversion a reader made (the data loads; the user should know how)."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- image layout
def _layout_of(shape: Sequence[int]) -> str | None:
    c1, c3 = shape[1] <= 4, shape[3] <= 4
    if c3 and not c1:
        return "NHWC"
    if c1 and not c3:
        return "NCHW"
    return None


def to_nchw(train: np.ndarray, test: np.ndarray, sources: Mapping[str, str], layout: str | None = None,
            fix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Both image arrays as [N, C, H, W].

    [N, H, W] is one channel. For [N, A, B, C] arrays the channel axis is axis 3 (NHWC) when its size
    is at most 4 and axis 1's is not, axis 1 (NCHW) when its size is at most 4 and axis 3's is not;
    when both or neither are, the layout is ambiguous and must be given (`layout`, or `fix` says how).
    """
    given = None
    if layout is not None:
        given = str(layout).upper()
        if given not in LAYOUTS:
            raise CsnError(f"image layout {layout!r} is not one of {', '.join(LAYOUTS)}; give NHWC (channels last) "
                           "or NCHW (channels first).")
    arrays = {"train_images": train, "test_images": test}
    for key, x in arrays.items():
        if x.ndim not in (3, 4):
            raise CsnError(f"{sources[key]} holds an array of shape {list(x.shape)}; images must be "
                           "[N, H, W] (one channel), [N, H, W, C] or [N, C, H, W].")
    four = {k: x for k, x in arrays.items() if x.ndim == 4}
    if four and given is None:
        seen = {k: _layout_of(x.shape) for k, x in four.items()}
        known = {v for v in seen.values() if v}
        if len(known) > 1:
            raise CsnError(f"{sources['train_images']} looks {seen['train_images']} but {sources['test_images']} "
                           f"looks {seen['test_images']}; save both splits with the same layout.")
        if not known:
            k, x = next(iter(four.items()))
            raise CsnError(f"{sources[k]} has shape {list(x.shape)}, so either axis 1 or axis 3 could hold the "
                           f"channels; {fix or 'give the layout (NHWC or NCHW)'}.")
        given = known.pop()
    out = []
    for x in (train, test):
        if x.ndim == 3:
            x = x[:, None]
        elif given == "NHWC":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        out.append(x)
    return out[0], out[1]


# ----------------------------------------------------------------------------- pixels
def _num(v) -> str:
    """A value as written: shortest float repr for its dtype (float32 0.7 -> '0.7'), plain ints."""
    v = np.asarray(v)[()]  # a numpy scalar keeps its precision (float32 0.7 is not printed as 0.69999...)
    if v.dtype.kind == "f":
        return np.format_float_positional(v, trim="-") if np.isfinite(v) else str(v)
    return str(v.item())


def _range(x: np.ndarray) -> tuple[float, float]:
    return (x.min().item(), x.max().item()) if x.size else (0, 0)


def _pixels(train: np.ndarray, test: np.ndarray, sources: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Apply the pixel rules (module docstring): uint8 kept, other integers in 0..255 -> uint8,
    floats in [0, 1] or [0, 255] (the training split decides) -> float32 intensities in [0, 1]."""
    st, ss = sources["train_images"], sources["test_images"]
    for x, where in ((train, st), (test, ss)):
        if x.dtype.kind not in "uif":
            raise CsnError(f"{where} holds {x.dtype} images; save the pixels as uint8 (0..255) or as floats in [0, 1].")
    if (train.dtype.kind == "f") != (test.dtype.kind == "f"):
        raise CsnError(f"{st} holds {train.dtype} pixels but {ss} holds {test.dtype} pixels; save both splits "
                       "with the same pixel type.")
    if train.dtype.kind in "ui":
        out, converted = [], []
        for x, where in ((train, st), (test, ss)):
            if x.dtype != np.uint8:
                lo, hi = _range(x)
                if lo < 0 or hi > 255:
                    raise CsnError(f"{where} holds {x.dtype} pixels from {lo} to {hi}; csn reads integer images as "
                                   "pixel values 0..255: rescale them to 0..255 and save them as uint8.")
                converted.append(f"{where} ({x.dtype})")
                x = x.astype(np.uint8)
            out.append(x)
        if converted:
            note(f"{' and '.join(converted)} hold{'s' if len(converted) == 1 else ''} integer pixels, all in 0..255; "
                 "read as uint8.")
        return out[0], out[1]
    for x, where in ((train, st), (test, ss)):
        if not np.isfinite(x).all():
            raise CsnError(f"{where} holds NaN or infinite pixels; replace them (csn reads float images as "
                           "intensities in [0, 1] or pixel values in [0, 255]).")
    lo, hi = _range(train)
    if lo >= 0 and hi <= 1:
        scale, reading = 1.0, "intensities in [0, 1] (0 black, 1 white)"
    elif lo >= 0 and hi <= 255:
        scale, reading = 255.0, "pixel values in [0, 255] (divided by 255)"
    else:
        raise CsnError(f"{st} holds float pixels from {lo:g} to {hi:g}; csn reads float images as intensities in "
                       "[0, 1] or pixel values in [0, 255], not standardized values: save the raw pixels.")
    tlo, thi = _range(test)
    if tlo < 0 or thi > scale:
        raise CsnError(f"{ss} holds float pixels from {tlo:g} to {thi:g} but the training images ({st}) are "
                       f"{reading.split(' (')[0]}; save both splits on the same scale.")
    note(f"{st} and {ss} hold float pixels ({train.dtype}); read as {reading}, stored as float32.")
    if scale == 1.0:
        return train.astype(np.float32, copy=False), test.astype(np.float32, copy=False)
    return (train / scale).astype(np.float32), (test / scale).astype(np.float32)


# ----------------------------------------------------------------------------- labels
def _labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer labels (or whole-number floats) as int64, refusing negative and absurdly large ones."""
    if y.ndim != 1:
        raise CsnError(f"{where} holds an array of shape {list(y.shape)}; labels must be one class index per image, "
                       "shape [N].")
    kind = y.dtype.kind
    if kind not in "uif":
        raise CsnError(f"{where} holds {y.dtype} labels; save the class indices as integers 0..K-1.")
    if kind == "f":
        finite = np.isfinite(y)
        whole = finite & (y == np.floor(np.where(finite, y, 0)))
        if not whole.all():
            i = int(np.argmin(whole))
            raise CsnError(f"{where} holds the label {_num(y[i])} (at index {i}), which is not a whole number; "
                           "labels must be integer class indices 0..K-1.")
    if y.size:
        lo, hi = _range(y)
        if lo < 0:
            i = int(np.argmax(y < 0))
            raise CsnError(f"{where} holds the negative label {_num(y[i])} (at index {i}); labels must be class "
                           "indices 0..K-1.")
        if hi > MAX_LABEL:
            i = int(np.argmax(y))
            raise CsnError(f"{where} holds the label {_num(y[i])} (at index {i}), beyond any class count; labels "
                           "must be class indices 0..K-1.")
    if kind == "f":
        note(f"{where} holds float labels ({y.dtype}), all whole numbers; read as integer class indices.")
    return y.astype(np.int64, copy=False)


def _missing(present: np.ndarray, k: int, limit: int = 5) -> str:
    """The first few of 0..k-1 absent from the sorted array `present` ('3, 4, 7, ...')."""
    out: list[int] = []
    prev = -1
    for c in [*present.tolist(), k]:
        for m in range(prev + 1, c):  # stops after limit + 1 values, so a huge gap costs nothing
            out.append(m)
            if len(out) > limit:
                return ", ".join(map(str, out[:limit])) + ", ..."
        prev = c
    return ", ".join(map(str, out))


def require_every_class(labels: torch.Tensor | np.ndarray, num_classes: int, what: str, fix: str) -> None:
    """Raise CsnError('{what} has no example of class(es) ...; {fix}.') unless each of 0..K-1 occurs."""
    present = np.unique(np.asarray(labels))
    present = present[(present >= 0) & (present < num_classes)]
    if len(present) < num_classes:
        n = num_classes - len(present)
        raise CsnError(f"{what} has no example of {'class' if n == 1 else f'{n} classes'} "
                       f"{_missing(present, num_classes)} (of {num_classes}); {fix}.")


# ----------------------------------------------------------------------------- the whole dataset
def _numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _tensor(a: np.ndarray) -> torch.Tensor:
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def _shape_text(x: np.ndarray) -> str:
    c, h, w = x.shape[1:]
    return f"{h}x{w} with {c} channel{'s' if c != 1 else ''}"


def _check_shapes(arrays: Mapping[str, np.ndarray], sources: Mapping[str, str]) -> None:
    """Images [N, C, H, W] with at least one pixel, labels [N], one label per image, in both splits."""
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        sx, sy = sources[f"{split}_images"], sources[f"{split}_labels"]
        if x.ndim != 4:  # readers reshape to [N, C, H, W]; anything else is a reader bug
            raise CsnError(f"{sx} holds images of shape {list(x.shape)}; expected [N, C, H, W].")
        if y.ndim != 1:
            raise CsnError(f"{sy} holds an array of shape {list(y.shape)}; labels must be one class index per "
                           "image, shape [N].")
        if len(x) == 0:
            raise CsnError(f"{sx} holds no images; each split needs images of at least 2 classes.")
        if min(x.shape[1:]) == 0:
            raise CsnError(f"{sx} holds images of shape {list(x.shape[1:])} (channels, height, width); every "
                           "dimension must be at least 1.")
        if len(x) != len(y):
            raise CsnError(f"{sx} holds {len(x):,} images but {sy} holds {len(y):,} labels; each image needs "
                           "exactly one label (do the files belong together?).")


def _normalization(train_x: torch.Tensor, sources: Mapping[str, str]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of the training images (on the [0, 1] scale); a constant channel
    is refused."""
    channels = train_x.shape[1]
    div = 255.0 if train_x.dtype == torch.uint8 else 1.0
    means, stds = [], []
    for c in range(channels):
        xc = train_x[:, c].float()
        mean, std = float(xc.mean() / div), float(xc.std() / div)
        if not std > 0:
            which = f"channel {c} of " if channels > 1 else ""
            raise CsnError(f"{which}the images in {sources['train_images']} hold the same value "
                           f"({xc.flatten()[0].item() / div:g}) in every pixel; there is nothing to learn: check "
                           "how the images were exported.")
        means.append(mean)
        stds.append(std)
    return tuple(means), tuple(stds)


def validate_splits(train_images, train_labels, test_images, test_labels, *, name: str,
                    sources: Mapping[str, str], class_names: Sequence[str] | None = None,
                    norm: tuple[Sequence[float], Sequence[float]] | None = None) -> DataSplits:
    """Check a dataset by the rules in this module's docstring and return its DataSplits.

    Images are [N, C, H, W] (numpy or torch), labels [N]. `sources` names where each of the four
    arrays came from (keys train_images, train_labels, test_images, test_labels), for the messages.
    `norm` = (mean, std) per channel marks images already on the model's scale (synthetic data):
    the pixel rules are skipped and these statistics are used; None: images are pixels, normalized
    by the training split's per-channel mean and standard deviation.
    """
    arrays = {k: _numpy(a) for k, a in zip(KEYS, (train_images, train_labels, test_images, test_labels))}
    _check_shapes(arrays, sources)
    xt, xs = arrays["train_images"], arrays["test_images"]
    if xt.shape[1:] != xs.shape[1:]:
        raise CsnError(f"the test images in {sources['test_images']} are {_shape_text(xs)} but the training images "
                       f"in {sources['train_images']} are {_shape_text(xt)}; give both splits the same size and "
                       "channels (resize one of them).")
    if norm is None:
        xt, xs = _pixels(xt, xs, sources)
    yt = _labels(arrays["train_labels"], sources["train_labels"])
    ys = _labels(arrays["test_labels"], sources["test_labels"])

    classes = np.unique(yt)
    k = int(classes[-1]) + 1
    if len(classes) < 2:
        raise CsnError(f"{sources['train_labels']} holds a single class ({k - 1}); class selectivity compares "
                       "classes, so a dataset needs at least 2.")
    if len(classes) < k:
        raise CsnError(f"{sources['train_labels']} holds labels up to {k - 1} but {k - len(classes)} of those {k} "
                       f"classes have no training example (missing: {_missing(classes, k)}); labels must be the "
                       "consecutive class indices 0..K-1: relabel them (e.g. numpy.unique(y, return_inverse=True)).")
    if ys.max() >= k:
        i = int(np.argmax(ys >= k))
        raise CsnError(f"{sources['test_labels']} holds the label {int(ys[i])} (at index {i}) but the training labels "
                       f"({sources['train_labels']}) define classes 0..{k - 1}; every test label must be a training "
                       "class.")
    require_every_class(ys, k, sources["test_labels"],
                        "class selectivity averages over every class of the evaluation split: add test examples "
                        "of each class")
    if class_names is not None and len(class_names) != k:
        raise CsnError(f"{len(class_names)} class names for the {k} classes of {sources['train_labels']}; give one "
                       "name per class.")
    names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(k)]

    train_x, test_x = _tensor(xt), _tensor(xs)
    channels = train_x.shape[1]
    mean_t, std_t = _normalization(train_x, sources) if norm is None else (tuple(norm[0]), tuple(norm[1]))
    h, w = train_x.shape[2:]
    image_size: int | tuple[int, int] = int(h) if h == w else (int(h), int(w))
    train = TensorSplit(train_x, _tensor(yt), mean_t, std_t)
    test = TensorSplit(test_x, _tensor(ys), mean_t, std_t)
    return DataSplits(name, train, test, k, int(channels), image_size, names)
