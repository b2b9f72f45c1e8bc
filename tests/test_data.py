"""Dataset readers validate what they read (csn.data.validate): hostile IDX, .npz and synthetic input
is refused with one CsnError sentence naming the file (or array) and the problem, before anything
large is allocated; valid data loads exactly as before, in every accepted layout, non-square included."""

from __future__ import annotations

import gzip
import io
import json
import pathlib
import re
import struct
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csn.core.resources import human_bytes
from csn.data import BatchLoader, load_dataset, read_idx, synthetic, write_idx
from csn.data.validate import MAX_DATA_ENV, max_data_bytes
from csn.errors import CsnError
from csn.runs.config import build_model_for, data_info, load_data
from tests.conftest import tiny_config

RNG = np.random.default_rng(0)
NAMES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
         "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def _pixels(n, h=6, w=6, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w)).astype(dtype)


def _base(n_train=40, n_test=20, classes=3, h=6, w=6) -> dict[str, np.ndarray]:
    return {"train_images": _pixels(n_train, h, w, seed=1), "train_labels": (np.arange(n_train) % classes).astype(np.uint8),
            "test_images": _pixels(n_test, h, w, seed=2), "test_labels": (np.arange(n_test) % classes).astype(np.uint8)}


def _write_dir(root: pathlib.Path, arrays: dict, gz: bool = False) -> pathlib.Path:
    for key, arr in arrays.items():
        p = root / (NAMES[key] + (".gz" if gz else ""))
        if isinstance(arr, bytes):
            _raw(p, arr, gz)
        else:
            write_idx(p, arr)
    return root


def _raw(p: pathlib.Path, data: bytes, gz: bool) -> None:
    if gz:
        with gzip.open(p, "wb") as f:
            f.write(data)
    else:
        p.write_bytes(data)


def _header(code: int, shape) -> bytes:
    return bytes([0, 0, code, len(shape)]) + struct.pack(">" + "I" * len(shape), *shape)


def _labels_with(values, n=40, classes=3, dtype=np.uint8):
    y = (np.arange(n) % classes).astype(dtype)
    for i, v in values.items():
        y[i] = v
    return y


# ----------------------------------------------------------------------------- IDX: hostile files
def _stray_label():
    return {"train_labels": _labels_with({5: 200})}


IDX_HOSTILE = {
    # issue A, one by one
    "negative int8 label": ({"train_labels": _labels_with({7: -1}, dtype=np.int8)},
                            "train_labels", r"negative label -1 \(at index 7\)"),
    "dims whose product wraps to 0": ({"train_images": _header(0x08, (2**31, 2**31, 4))},
                                      "train_images", r"truncated: its header claims a 2,147,483,648 x 2,147,483,648 x 4"),
    "zero images": ({"train_images": _header(0x08, (0, 6, 6)), "train_labels": _header(0x08, (0,))},
                    "train_images", "holds no images"),
    "test 16x16, train 12x12": ({"train_images": _pixels(40, 12, 12), "test_images": _pixels(20, 16, 16)},
                                "test_images", r"are 16x16 with 1 channel but the training images in .*12x12"),
    "float labels 0.7": ({"train_labels": _labels_with({3: 0.7}, dtype=np.float32)},
                         "train_labels", r"label 0\.7\d* \(at index 3\), which is not a whole number"),
    "int16 pixels beyond 255": ({"train_images": (_pixels(40, dtype=np.int16) + np.int16(300))},
                                "train_images", r"int16 pixels from 300 to 555; .*rescale them to 0\.\.255"),
    "negative int16 pixels": ({"test_images": _pixels(20, dtype=np.int16) - np.int16(128)},
                              "test_images", r"int16 pixels from -128 to 127"),
    "one stray label 200": (_stray_label(), "train_labels",
                            r"labels up to 200 but 197 of those 201 classes have no training example \(missing: 3, 4, 5, 6, 7, \.\.\.\)"),
    "standardized float images": ({"train_images": (_pixels(40).astype(np.float32) - 128) / 64,
                                   "test_images": (_pixels(20).astype(np.float32) - 128) / 64},
                                  "train_images", r"float pixels from -2 to 1\.98.*not standardized values"),
    "single class": ({"train_labels": np.zeros(40, np.uint8), "test_labels": np.zeros(20, np.uint8)},
                     "train_labels", r"holds a single class \(0\); .*at least 2"),
    # and the rest of the rules
    "test label outside the training classes": ({"test_labels": _labels_with({4: 3}, n=20)},
                                                "test_labels", r"holds the label 3 \(at index 4\) but the training labels .* define classes 0\.\.2"),
    "class missing in test": ({"test_labels": (np.arange(20) % 2).astype(np.uint8)},
                              "test_labels", r"has no example of class 2 \(of 3\); class selectivity averages over every class"),
    "fewer labels than images": ({"train_labels": (np.arange(39) % 3).astype(np.uint8)},
                                 "train_images", r"holds 40 images but .*train-labels-idx1-ubyte(\.gz)? holds 39 labels"),
    "constant images": ({"train_images": np.zeros((40, 6, 6), np.uint8)},
                        "train_images", r"hold the same value \(0\) in every pixel; there is nothing to learn"),
    "labels of shape [N, 1]": ({"train_labels": (np.arange(40) % 3).astype(np.uint8)[:, None]},
                               "train_labels", r"shape \[40, 1\]; labels must be one class index per image"),
    "images of shape [N, 36]": ({"train_images": _pixels(40).reshape(40, 36)},
                                "train_images", r"shape \[40, 36\]; images must be \[N, H, W\]"),
    "float and integer splits": ({"test_images": _pixels(20).astype(np.float32) / 255},
                                 "train_images", r"holds uint8 pixels but .* holds float32 pixels; save both splits with the same pixel type"),
    "NaN pixels": ({"train_images": np.where(_pixels(40) > 250, np.nan, _pixels(40) / 255).astype(np.float32),
                    "test_images": _pixels(20).astype(np.float32) / 255},
                   "train_images", "NaN or infinite pixels"),
    "bad data type code": ({"train_labels": bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5])},
                           "train_labels", r"not an IDX file \(bad magic number \(data type code 0x07"),
    "trailing bytes": ({"train_labels": _header(0x08, (40,)) + bytes(np.arange(40) % 3) + b"\x00"},
                       "train_labels", "has trailing data"),
    "truncated data": ({"train_images": _header(0x08, (40, 6, 6)) + bytes(100)}, "train_images", "truncated"),
    "huge claimed shape": ({"train_images": _header(0x08, (10**9, 28, 28)) + bytes(36)}, "train_images",
                           r"truncated: its header claims a 1,000,000,000 x 28 x 28 uint8 array \(784,000,000,000 bytes\)"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("case", list(IDX_HOSTILE))
def test_idx_hostile_files_are_refused_naming_the_file(tmp_path, case, gz):
    changes, culprit, pattern = IDX_HOSTILE[case]
    arrays = {**_base(), **changes}
    _write_dir(tmp_path, arrays, gz=gz)
    with pytest.raises(CsnError) as e:
        load_dataset("idx", str(tmp_path))
    msg = str(e.value)
    assert NAMES[culprit] in msg, msg
    assert msg.count("\n") == 0 and msg.endswith("."), msg
    if gz and case in ("dims whose product wraps to 0", "huge claimed shape"):
        pattern = "truncated or corrupt: its header claims"  # the claim exceeds what the compressed bytes can hold
    if gz and case == "truncated data":
        pattern = "truncated: its header claims .* but it decompresses to 100 data bytes"
    assert re.search(pattern, msg), msg


def test_gz_read_is_bounded_by_the_header(tmp_path, monkeypatch):
    """A .gz whose header claims 40 bytes but that inflates to 50 MB: refused after reading 41 bytes."""
    p = tmp_path / "labels.gz"
    _raw(p, _header(0x08, (40,)) + bytes(50_000_000), gz=True)
    reads = []
    real_open = gzip.open

    def spy_open(*a, **k):
        f = real_open(*a, **k)
        real_read = f.read

        def read(n=-1):
            reads.append(n)
            return real_read(n)
        f.read = read
        return f
    monkeypatch.setattr(gzip, "open", spy_open)
    with pytest.raises(CsnError, match="has trailing data"):
        read_idx(p)
    assert reads and all(0 <= n <= 41 for n in reads), reads


def test_memory_limit_refuses_before_reading_and_can_be_raised(tmp_path, monkeypatch):
    _write_dir(tmp_path, _base(n_train=4000, h=28, w=28), gz=True)  # 3.1 MB of training images
    monkeypatch.setenv(MAX_DATA_ENV, "0.001")
    with pytest.raises(CsnError, match=r"train-images-idx3-ubyte.gz \(a 4,000 x 28 x 28 uint8 array \(3,136,000 bytes\)\) "
                                       r"needs 3.1 MB; the limit is 1 MB \(set CSN_MAX_DATA_GB to raise it\)"):
        load_dataset("idx", str(tmp_path))
    monkeypatch.setenv(MAX_DATA_ENV, "0.01")
    assert len(load_dataset("idx", str(tmp_path)).train) == 4000
    monkeypatch.setenv(MAX_DATA_ENV, "lots")
    with pytest.raises(CsnError, match="CSN_MAX_DATA_GB='lots' is not a positive number"):
        load_dataset("idx", str(tmp_path))


def test_memory_limit_default_and_units(monkeypatch):
    monkeypatch.delenv(MAX_DATA_ENV, raising=False)
    assert max_data_bytes() == 8 * 10**9
    assert [human_bytes(n) for n in (512, 1_250_000, 8e9, 1.152e12)] == ["512 B", "1.2 MB", "8 GB", "1.2 TB"]


# ----------------------------------------------------------------------------- IDX: valid files
def test_idx_infers_classes_channels_and_nonsquare_size(tmp_path):
    arrays = _base(classes=4, h=5, w=7)
    arrays["train_labels"] = (np.arange(40) % 4).astype(np.int32)  # int32 labels that fit are fine
    arrays["test_labels"] = (np.arange(20) % 4).astype(np.int16)
    _write_dir(tmp_path, arrays)
    data = load_dataset("idx", str(tmp_path))
    assert (data.num_classes, data.in_channels, data.image_size) == (4, 1, (5, 7))
    assert data.train.images.shape == (40, 1, 5, 7) and data.train.images.dtype == torch.uint8
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(arrays["train_images"]))
    assert data.train.labels.dtype == torch.int64 and data.test.labels.tolist() == arrays["test_labels"].tolist()
    assert data.class_names == ["0", "1", "2", "3"]
    assert data_info(data)["image_size"] == [5, 7]
    assert data.train.mean == (float(torch.from_numpy(arrays["train_images"]).float().mean() / 255),)


def test_idx_color_images_in_either_layout(tmp_path):
    nhwc = np.random.default_rng(3).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    arrays = _base(h=8, w=8)
    arrays["train_images"], arrays["test_images"] = nhwc, nhwc[:20].transpose(0, 3, 1, 2).copy()
    with pytest.raises(CsnError, match="looks NHWC but .* looks NCHW"):
        load_dataset("idx", str(_write_dir(tmp_path, arrays)))
    arrays["test_images"] = nhwc[:20]
    data = load_dataset("idx", str(_write_dir(tmp_path, arrays)))
    assert data.in_channels == 3 and data.image_size == 8 and len(data.train.mean) == 3
    assert torch.equal(data.train.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))


def test_idx_conversions_are_lossless_and_noted(tmp_path, capsys):
    arrays = _base()
    arrays["train_images"] = arrays["train_images"].astype(np.int16)  # 0..255 in int16: exact as uint8
    arrays["train_labels"] = arrays["train_labels"].astype(np.float64)  # whole-number floats
    data = load_dataset("idx", str(_write_dir(tmp_path, arrays)))
    assert data.train.images.dtype == torch.uint8
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(arrays["train_images"].astype(np.uint8)))
    assert data.train.labels.tolist() == arrays["train_labels"].astype(int).tolist()
    err = capsys.readouterr().err
    assert "note: " in err and "(int16) holds integer pixels, all in 0..255; read as uint8" in err
    assert "train-labels-idx1-ubyte holds float labels (float64), all whole numbers" in err


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_idx_float_images_keep_their_contrast(tmp_path, capsys, scale):
    """Float images in [0, 1] (or [0, 255]) are intensities, not zeros after a cast to uint8."""
    arrays = _base()
    for k in ("train_images", "test_images"):
        arrays[k] = (arrays[k] / 255.0 * scale).astype(np.float32)
    data = load_dataset("idx", str(_write_dir(tmp_path, arrays)))
    assert data.train.images.dtype == torch.float32
    torch.testing.assert_close(data.train.images[:, 0], torch.from_numpy(arrays["train_images"] / scale).float())
    x, _ = next(iter(BatchLoader(data.train, 40)))
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3  # normalized, not all zeros
    reading = "intensities in [0, 1]" if scale == 1 else "pixel values in [0, 255] (divided by 255)"
    assert reading in capsys.readouterr().err
    # the test split must be on the training split's scale
    if scale == 1.0:
        arrays["test_images"] = arrays["test_images"] * 255
        with pytest.raises(CsnError, match=r"t10k-images-idx3-ubyte holds float pixels from 0 to 255 but the training "
                                           r"images .* are intensities in \[0, 1\]; save both splits on the same scale"):
            load_dataset("idx", str(_write_dir(tmp_path, arrays)))


def test_fashion_mnist_class_names_only_when_they_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("CSN_FASHION_MNIST", str(_write_dir(tmp_path, _base(classes=3))))
    assert load_dataset("fashion-mnist").class_names == ["0", "1", "2"]
    _write_dir(tmp_path, _base(n_train=40, n_test=20, classes=10))
    assert load_dataset("fashion-mnist").class_names[0] == "T-shirt/top"


def test_idx_pointed_at_a_npz_file_says_so(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros(1))
    with pytest.raises(CsnError, match="is a .npz file, not a directory of IDX files; use --dataset npz"):
        load_dataset("idx", str(p))


# ----------------------------------------------------------------------------- npz
def _npz_arrays(n_train=40, n_test=20, classes=3, shape=(6, 6), dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, *shape)).astype(dtype), "y_train": np.arange(n_train) % classes,
            "x_test": rng.integers(0, 256, (n_test, *shape)).astype(dtype), "y_test": np.arange(n_test) % classes}


def _save(tmp_path, arrays, name="data.npz", compressed=False) -> pathlib.Path:
    p = tmp_path / name
    (np.savez_compressed if compressed else np.savez)(p, **arrays)
    return p


# (stored shape of one image, layout entry or None, expected [C, H, W] view as a function of the stored array)
LAYOUTS = {
    "NHW": ((6, 9), None, lambda x: x[:, None]),
    "NHWC gray": ((6, 9, 1), None, lambda x: x.transpose(0, 3, 1, 2)),
    "NHWC rgb": ((6, 9, 3), None, lambda x: x.transpose(0, 3, 1, 2)),
    "NCHW rgb": ((3, 6, 9), None, lambda x: x),
    "NCHW rgba": ((4, 6, 9), None, lambda x: x),
    "ambiguous, layout NHWC": ((3, 4, 3), "NHWC", lambda x: x.transpose(0, 3, 1, 2)),
    "ambiguous, layout NCHW": ((3, 4, 3), "NCHW", lambda x: x),
    "8 channels, layout NCHW": ((8, 6, 9), "NCHW", lambda x: x),
}


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
@pytest.mark.parametrize("case", list(LAYOUTS))
def test_npz_round_trip_in_every_layout(tmp_path, case, compressed):
    shape, layout, to_chw = LAYOUTS[case]
    arrays = _npz_arrays(shape=shape)
    if layout:
        arrays["layout"] = np.array(layout)
    data = load_dataset("npz", str(_save(tmp_path, arrays, compressed=compressed)))
    expect = to_chw(arrays["x_train"])
    c, h, w = expect.shape[1:]
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("npz", 3, c, (h, w) if h != w else h)
    assert data.train.images.dtype == torch.uint8 and data.train.images.is_contiguous()
    assert torch.equal(data.train.images, torch.from_numpy(np.ascontiguousarray(expect)))
    assert torch.equal(data.test.images, torch.from_numpy(np.ascontiguousarray(to_chw(arrays["x_test"]))))
    assert torch.equal(data.train.labels, torch.from_numpy(arrays["y_train"]).long())
    assert len(data.train.mean) == len(data.train.std) == c
    assert data.train.mean[-1] == pytest.approx(float(expect[:, -1].mean() / 255), rel=1e-5)


def test_npz_layout_argument_and_class_names(tmp_path):
    arrays = _npz_arrays(shape=(3, 4, 3))
    arrays["class_names"] = np.array(["cat", "dog", "emu"])
    p = _save(tmp_path, arrays)
    data = load_dataset("npz", str(p), layout="nhwc")
    assert data.in_channels == 3 and data.image_size == (3, 4) and data.class_names == ["cat", "dog", "emu"]
    with pytest.raises(CsnError, match="unknown npz option 'chanels'"):
        load_dataset("npz", str(p), chanels=3)
    with pytest.raises(CsnError, match="image layout 'HWC' is not one of NHWC, NCHW"):
        load_dataset("npz", str(p), layout="HWC")


def test_npz_float_images_and_labels(tmp_path, capsys):
    arrays = _npz_arrays(dtype=np.float64)
    arrays["x_train"] /= 255
    arrays["x_test"] /= 255
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    data = load_dataset("npz", str(_save(tmp_path, arrays)))
    torch.testing.assert_close(data.train.images[:, 0], torch.from_numpy(arrays["x_train"]).float())
    assert data.train.labels.dtype == torch.int64 and data.num_classes == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("note: ") for line in err)


class _Bomb:
    """Unpickling this would create a file: the reader must never unpickle."""
    marker: pathlib.Path | None = None

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _zip_with_header(p: pathlib.Path, shapes: dict) -> pathlib.Path:
    """A .npz whose .npy headers claim the given shapes (float32) over a few bytes of data."""
    with zipfile.ZipFile(p, "w") as z:
        for key, shape in shapes.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
            z.writestr(key + ".npy", buf.getvalue() + bytes(16))
    return p


def _hostile_npz(tmp_path, case) -> pathlib.Path:
    a = _npz_arrays()
    if case == "missing y_test":
        del a["y_test"]
    elif case == "object array":
        _Bomb.marker = tmp_path / "unpickled"
        a["x_train"] = np.array([_Bomb()] * 40, dtype=object)
    elif case == "not a zip":
        (tmp_path / "data.npz").write_bytes(b"\x93NUMPY not a zip")
        return tmp_path / "data.npz"
    elif case == "a directory":
        (tmp_path / "data.npz").mkdir()
        return tmp_path / "data.npz"
    elif case == "ambiguous layout":
        a = _npz_arrays(shape=(3, 4, 3))
    elif case == "unknown layout entry":
        a = _npz_arrays(shape=(3, 4, 3))
        a["layout"] = np.array("HWCN")
    elif case == "float labels 0.7":
        a["y_train"] = a["y_train"] + 0.7
    elif case == "float images already standardized":
        a["x_train"] = (a["x_train"] - 128.0) / 64
        a["x_test"] = (a["x_test"] - 128.0) / 64
    elif case == "bool images":
        a["x_train"], a["x_test"] = a["x_train"] > 127, a["x_test"] > 127
    elif case == "bool labels":
        a["y_train"] = a["y_train"] > 0
    elif case == "stray label 200":
        a["y_train"][5] = 200
    elif case == "int16 pixels wrapped":
        a["x_test"] = a["x_test"].astype(np.int16) * 2
    elif case == "test 16x16, train 12x12":
        a["x_train"], a["x_test"] = _pixels(40, 12, 12), _pixels(20, 16, 16)
    elif case == "single-class test split":
        a["y_test"] = np.zeros(20, np.int64)
    elif case == "class names that do not fit":
        a["class_names"] = np.array(["a", "b"])
    elif case == "header claims terabytes":
        return _zip_with_header(tmp_path / "data.npz", {"x_train": (10**6, 1000, 1000), "y_train": (4,),
                                                        "x_test": (4,), "y_test": (4,)})
    elif case == "zero images":
        a["x_train"], a["y_train"] = a["x_train"][:0], a["y_train"][:0]
    return _save(tmp_path, a)


NPZ_HOSTILE = {
    "missing y_test": r"data.npz lacks the array y_test \(it holds: x_train, y_train, x_test\)",
    "object array": r"array x_train in .*data.npz holds Python objects .*it never unpickles",
    "not a zip": r"data.npz is not a .npz archive",
    "a directory": r"data.npz is a directory; dataset 'npz' reads one .npz file",
    "ambiguous layout": r"data.npz \(array x_train\) has shape \[40, 3, 4, 3\], so either axis 1 or axis 3 could hold the "
                        r"channels; add layout='NHWC' or layout='NCHW' to",
    "unknown layout entry": r"image layout 'HWCN' is not one of NHWC, NCHW",
    "float labels 0.7": r"data.npz \(array y_train\) holds the label 0.7 \(at index 0\), which is not a whole number",
    "float images already standardized": r"data.npz \(array x_train\) holds float pixels from -2 to 1.98.* save the raw pixels",
    "bool images": r"data.npz \(array x_train\) holds bool images",
    "bool labels": r"data.npz \(array y_train\) holds bool labels",
    "stray label 200": r"data.npz \(array y_train\) holds labels up to 200 but 197 of those 201 classes",
    "int16 pixels wrapped": r"data.npz \(array x_test\) holds int16 pixels from 0 to 510",
    "test 16x16, train 12x12": r"test images in .*data.npz \(array x_test\) are 16x16 .* training images in .*\(array x_train\) are 12x12",
    "single-class test split": r"data.npz \(array y_test\) has no example of 2 classes 1, 2 \(of 3\)",
    "class names that do not fit": r"2 class names for the 3 classes of .*data.npz \(array y_train\)",
    "header claims terabytes": r"the arrays in .*data.npz \(x_train \[1000000, 1000, 1000\] float32, .*\) needs 4 TB; the limit is",
    "zero images": r"data.npz \(array x_train\) holds no images",
}


@pytest.mark.parametrize("case", list(NPZ_HOSTILE))
def test_npz_hostile_files_are_refused_naming_the_file(tmp_path, case):
    p = _hostile_npz(tmp_path, case)
    with pytest.raises(CsnError, match=NPZ_HOSTILE[case]) as e:
        load_dataset("npz", str(p))
    assert "\n" not in str(e.value)
    if case == "object array":
        assert not (tmp_path / "unpickled").exists()


def test_npz_needs_a_path_and_notes_extra_arrays(tmp_path, capsys):
    with pytest.raises(CsnError, match="dataset 'npz' needs a .npz file; pass --data-root FILE.npz"):
        load_dataset("npz", None)
    with pytest.raises(CsnError, match="nope.npz does not exist"):
        load_dataset("npz", str(tmp_path / "nope.npz"))
    a = _npz_arrays()
    a["x_val"] = a["x_test"]
    assert len(load_dataset("npz", str(_save(tmp_path, a))).test) == 20
    assert "ignoring the array x_val" in capsys.readouterr().err


# ----------------------------------------------------------------------------- non-square images, end to end
@pytest.mark.parametrize("model", ["mlp", "vgg16", "cnn", "resnet8"])
def test_nonsquare_images_through_run_json_to_a_model(tmp_path, model):
    p = _save(tmp_path, _npz_arrays(shape=(12, 20, 3)))
    cfg = tiny_config(dataset="npz", data_root=str(p), model=model, width=0.25)
    data = load_data(cfg)
    info = json.loads(json.dumps(data_info(data)))  # as run.json stores it
    assert info["image_size"] == [12, 20] and info["in_channels"] == 3
    net = build_model_for(cfg, info).eval()
    x, _ = next(iter(BatchLoader(data.train, 5)))
    assert x.shape == (5, 3, 12, 20) and net(x).shape == (5, 3)


def test_square_image_size_stays_an_int_for_models():
    from csn.models import create_model

    for size in (8, [8, 8], (8, 8)):
        assert create_model("mlp", num_classes=2, in_channels=1, image_size=size).fc1.in_features == 64
    vgg = create_model("vgg16", num_classes=2, in_channels=1, image_size=(12, 20), width=0.125)
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in vgg.modules()) == 3  # 12 -> 6 -> 3 -> 1, then no more


def test_cli_trains_on_a_nonsquare_npz_and_refuses_a_bad_one(tmp_path):
    from csn.cli import main

    good = _save(tmp_path, _npz_arrays(n_train=32, n_test=12, shape=(6, 10)), name="good.npz")
    bad = _save(tmp_path, {**_npz_arrays(), "y_test": np.arange(20) % 2}, name="bad.npz")
    r = CliRunner().invoke(main, ["train", "--dataset", "npz", "--data-root", str(bad), "--out", str(tmp_path / "r0")])
    assert r.exit_code == 2 and "bad.npz (array y_test) has no example of class 2" in r.output, r.output
    r = CliRunner().invoke(main, ["train", "--dataset", "npz", "--data-root", str(good), "--model", "mlp", "--epochs", "1",
                                  "--checkpoints", "0:end:1", "--out", str(tmp_path / "r1"), "--quiet", "batch_size=16",
                                  "width=0.1", "channels_last=false"])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "r1" / "run.json").read_text())["data"]
    assert info["image_size"] == [6, 10] and info["num_classes"] == 3


# ----------------------------------------------------------------------------- synthetic
def _synthetic_reference(num_train=512, num_test=256, num_classes=4, channels=1, size=12, seed=0, noise=0.6):
    """The generator as it was before validation was added (csn 0.x): results must stay bit-identical."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, max(2, size // 3), max(2, size // 3), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n):
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        scale = 1.0 + 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        shift = 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        x = protos[y] * scale + shift + noise * torch.randn(n, channels, size, size, generator=g)
        return x.float(), y.long()

    return make(num_train), make(num_test)


@pytest.mark.parametrize("kwargs", [
    {}, {"num_train": 512, "num_test": 256, "num_classes": 4, "channels": 1, "size": 12},  # the smoke preset
    {"num_train": 256, "num_test": 128, "num_classes": 4, "channels": 1, "size": 8},  # the tests' tiny run
    {"num_train": 30, "num_test": 9, "num_classes": 3, "channels": 3, "size": 7, "seed": 5, "noise": 1},
])
def test_synthetic_is_bit_identical_to_before(kwargs):
    data = load_dataset("synthetic", **kwargs)
    (xt, yt), (xs, ys) = _synthetic_reference(**kwargs)
    assert torch.equal(data.train.images, xt) and torch.equal(data.train.labels, yt)
    assert torch.equal(data.test.images, xs) and torch.equal(data.test.labels, ys)
    c = kwargs.get("channels", 1)
    assert data.train.mean == (0.0,) * c and data.train.std == (1.0,) * c
    k = kwargs.get("num_classes", 4)
    assert (data.num_classes, data.in_channels, data.image_size) == (k, c, kwargs.get("size", 12))
    assert data.class_names == [f"class{i}" for i in range(k)]


SYNTHETIC_HOSTILE = {
    "num_classes=1e9": ({"num_classes": 1e9}, (r"1,000,000,000 class prototypes needs 576 GB; the limit is 8 GB "
                                               r"\(set CSN_MAX_DATA_GB to raise it\)")),
    "num_train=2e9": ({"num_train": 2e9}, (r"generating synthetic data of 2,000,000,256 x 1 x 12 x 12 float32 images .*"
                                           r"needs 3.5 TB; the limit is 8 GB")),
    "size=1e5": ({"size": 1e5}, r"768 x 1 x 100000 x 100000 float32 images .* needs 71.8 TB; the limit is 8 GB"),
    "size=big": ({"size": "big"}, r"synthetic key 'size' must be a positive integer .*got 'big'"),
    "bogus key": ({"bogus": 1}, r"unknown synthetic key 'bogus' .*valid synthetic keys are: channels, noise, num_classes"),
    "one class": ({"num_classes": 1}, r"synthetic key 'num_classes' must be an integer of at least 2"),
    "fewer test images than classes": ({"num_test": 3}, r"synthetic key 'num_test' \(3\) must be at least num_classes \(4\)"),
    "bool size": ({"size": True}, r"synthetic key 'size' must be a positive integer"),
    "fractional count": ({"num_train": 10.5}, r"synthetic key 'num_train' must be a positive integer, got 10.5"),
    "negative noise": ({"noise": -1}, r"synthetic key 'noise' must be a finite number >= 0"),
    "zero channels": ({"channels": 0}, r"synthetic key 'channels' must be a positive integer"),
}


@pytest.mark.parametrize("case", list(SYNTHETIC_HOSTILE))
def test_synthetic_refuses_bad_and_huge_parameters(case, monkeypatch):
    monkeypatch.delenv(MAX_DATA_ENV, raising=False)
    kwargs, pattern = SYNTHETIC_HOSTILE[case]
    allocated = []
    monkeypatch.setattr(torch, "randn", lambda *a, **k: allocated.append(a) or pytest.fail("allocated"))
    with pytest.raises(CsnError, match=pattern):
        load_dataset("synthetic", **kwargs)
    assert not allocated


def test_synthetic_limit_override(monkeypatch):
    monkeypatch.setenv(MAX_DATA_ENV, "0.0001")  # 100 KB
    with pytest.raises(CsnError, match="needs 1.8 MB; the limit is 100 KB"):
        synthetic(num_train=1000, num_test=100)
    monkeypatch.setenv(MAX_DATA_ENV, "0.01")
    assert len(synthetic(num_train=1000, num_test=100).train) == 1000


def test_train_config_synthetic_errors_are_one_line(tmp_path):
    with pytest.raises(CsnError, match="unknown synthetic key 'sise'"):
        load_data(tiny_config(synthetic={"sise": 8}))


# ----------------------------------------------------------------------------- subsets keep every class
def test_a_subset_that_loses_a_class_is_refused_at_load_time():
    with pytest.raises(CsnError, match=r"the test subset of test_samples=2 has no example of 2 classes .* \(of 4\); "
                                       r"raise test_samples"):
        load_data(tiny_config(test_samples=2))
    with pytest.raises(CsnError, match=r"the train subset of train_samples=3 has no example of \d classes? "):
        load_data(tiny_config(train_samples=3))
    data = load_data(tiny_config(train_samples=64, test_samples=32))
    assert (len(data.train), len(data.test)) == (64, 32)


# ----------------------------------------------------------------------------- fuzzed IDX bytes

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.sampled_from([b"", b"\x00\x00\x08\x01", b"\x00\x00\x0d\x02", b"\x00\x00\x0b\x03", b"\x00\x00\x08\xff"]),
       raw=st.binary(max_size=64), gz=st.booleans())
def test_fuzz_idx_bytes_give_an_array_or_a_csn_error(tmp_path, head, raw, gz):
    p = tmp_path / ("f.gz" if gz else "f")
    _raw(p, head + raw, gz)
    try:
        arr = read_idx(p)
    except CsnError as e:
        assert "\n" not in str(e)
    else:
        assert arr.dtype.isnative and (arr.size * arr.itemsize <= len(raw))


# ------------------------------------------------------------------------------------------------
# ImageFolder trees: checked before torchvision reads anything (so also where it is not installed)
# ------------------------------------------------------------------------------------------------

def _tree(root: pathlib.Path, spec: dict[str, dict[str, int]]) -> pathlib.Path:
    for split, classes in spec.items():
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (root / split / c / f"{i}.JPEG").write_bytes(b"")
    return root


@pytest.mark.parametrize("spec, match", [
    ({"train": {"a": 1, "b": 1}}, r"val is missing or has no class folders"),
    ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}}, r"different class folders \(b, c in one only\)"),
    ({"train": {"a": 1}, "val": {"a": 1}}, "at least 2 classes"),
    ({"train": {"a": 1, "b": 1}, "val": {"a": 1, "b": 0}}, r"val/b holds no image .*every class needs images"),
    ({"train": {"a": 0, "b": 1}, "val": {"a": 1, "b": 1}}, r"train/a holds no image"),
])
def test_imagefolder_trees_are_checked_naming_the_folder(tmp_path, spec, match):
    from csn.data.imagefolder import check_folders

    with pytest.raises(CsnError, match=match):
        check_folders(_tree(tmp_path / "img", spec))


def test_imagefolder_classes_in_nested_folders(tmp_path):
    from csn.data.imagefolder import check_folders

    root = _tree(tmp_path / "img", {"train": {"b": 2, "a": 1}, "val": {"a": 1, "b": 1}})
    (root / "val" / "b" / "0.JPEG").unlink()
    (root / "val" / "b" / "deep").mkdir()
    (root / "val" / "b" / "deep" / "x.png").write_bytes(b"")  # ImageFolder reads subfolders too
    assert check_folders(root) == ["a", "b"]
