"""fmnist-pairs (csn.data.pairs): the pairing rule, the built images, the checked cache, and a tiny training run.

Most tests run on a small synthetic IDX folder (10 classes of 6x6 images); the ones marked `fmnist` need the
Debian Fashion-MNIST files and are skipped without them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from csn.cli import main as cli
from csn.data import DATASETS, FASHION_MNIST_CLASSES, load_dataset, pairs, read_idx, write_idx
from csn.data.idx import IDX_FILES, idx_paths
from csn.data.pairs import (
    PAIRS_SEED,
    build_arrays,
    cache_path,
    fmnist_pairs,
    pair_class_names,
    pair_indices,
    pair_keys,
    read_cache,
    source_digests,
)
from csn.errors import CsnError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
fmnist = pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
M64 = (1 << 64) - 1


def _sm64(x: int) -> int:
    """splitmix64's output function in plain Python ints (the documented rule, written out independently)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _fake_fmnist(root: Path, train_per_class=30, test_per_class=10, size=6, seed=0) -> Path:
    """A 10-class IDX folder: labels in a shuffled order, random images (train and test drawn apart)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        counts = [per] * 10 if isinstance(per, int) else list(per)
        labels = rng.permutation(np.repeat(np.arange(10), counts)).astype(np.uint8)
        write_idx(root / IDX_FILES[f"{split}_labels"], labels)
        write_idx(root / IDX_FILES[f"{split}_images"], rng.integers(0, 256, (len(labels), size, size), dtype=np.uint8))
    return root


def _source(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    paths = idx_paths(root)
    return read_idx(paths[f"{split}_images"]), read_idx(paths[f"{split}_labels"])


def _check_pairs(arrays: dict, root: Path, per: tuple[int, int]) -> None:
    """Every pair's halves are the source images its indices name, of the classes its label says; each
    split's pairs come from that split's images; `per` pairs of each class."""
    for split, n in zip(("train", "test"), per):
        x, y = _source(root, split)
        left, right, labels = arrays[f"{split}_left"], arrays[f"{split}_right"], arrays[f"y_{split}"]
        w = x.shape[2]
        assert arrays[f"x_{split}"].shape == (100 * n, 1, x.shape[1], 2 * w)
        assert np.bincount(labels, minlength=100).tolist() == [n] * 100
        assert np.array_equal(y[left], labels // 10) and np.array_equal(y[right], labels % 10)
        assert np.array_equal(arrays[f"x_{split}"][:, 0, :, :w], x[left])
        assert np.array_equal(arrays[f"x_{split}"][:, 0, :, w:], x[right])


# ----------------------------------------------------------------------------- the rule
def test_pair_keys_are_the_documented_splitmix64_chain():
    for split, side, cls in ((0, 0, 0), (1, 1, 9), (0, 1, 4)):
        h = _sm64(PAIRS_SEED)
        for v in (split, side, cls):
            h = _sm64(h ^ v)
        want = [_sm64(h ^ j) for j in range(7)]
        assert pair_keys(split, side, cls, 7).tolist() == want
    assert len(pair_keys(0, 0, 0, 0)) == 0


def test_pairing_rule_deals_each_class_once_per_side():
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(10), 40))
    left, right, y = pair_indices(labels, "train")
    assert np.array_equal(y, np.repeat(np.arange(100), 4))
    # every image exactly once as a left and once as a right image
    assert np.array_equal(np.sort(left), np.arange(400)) and np.array_equal(np.sort(right), np.arange(400))
    for c in range(10):
        own = np.flatnonzero(labels == c)
        for side, idx in ((0, left), (1, right)):
            # class c's images in key order, dealt 4 at a time to its partner classes 0..9 in order
            dealt = own[np.argsort(pair_keys(0, side, c, len(own)), kind="stable")]
            partner = (y // 10 == c) if side == 0 else (y % 10 == c)
            order = np.argsort(y[partner] % 10 if side == 0 else y[partner] // 10, kind="stable")
            assert np.array_equal(idx[partner][order], dealt)
    # deterministic, and the split, seed and side matter
    again = pair_indices(labels, "train")
    assert all(np.array_equal(a, b) for a, b in zip((left, right, y), again))
    assert not np.array_equal(pair_indices(labels, "test")[0], left)
    assert not np.array_equal(pair_indices(labels, "train", seed=PAIRS_SEED + 1)[0], left)
    assert not np.array_equal(left, right)


def test_pairing_uses_the_smallest_class_count():
    labels = np.repeat(np.arange(10), [25, 30, 30, 30, 30, 30, 30, 30, 30, 41])
    left, right, y = pair_indices(labels, "test")
    assert np.bincount(y).tolist() == [2] * 100
    assert len(set(left.tolist())) == len(left) == 200 and len(set(right.tolist())) == 200
    with pytest.raises(CsnError, match="at least 10 train images of each class.*class 3 has 9"):
        pair_indices(np.repeat(np.arange(10), [10, 10, 10, 9, 10, 10, 10, 10, 10, 10]), "train")
    with pytest.raises(CsnError, match="10 classes"):
        pair_indices(np.repeat(np.arange(11), 10), "train")


def test_class_names():
    names = pair_class_names()
    assert len(names) == 100 and names[0] == "T-shirt/top | T-shirt/top"
    assert names[1] == "T-shirt/top | Trouser" and names[98] == "Ankle boot | Bag"
    assert names[10 * 3 + 7] == f"{FASHION_MNIST_CLASSES[3]} | {FASHION_MNIST_CLASSES[7]}"


# ----------------------------------------------------------------------------- built data and the cache
def test_built_pairs_match_their_sources(tmp_path):
    root = _fake_fmnist(tmp_path / "src")
    arrays = build_arrays(root)
    _check_pairs(arrays, root, (3, 1))
    # the train pairs hold no test image and the test pairs no training image
    xt, _ = _source(root, "train")
    xs, _ = _source(root, "test")
    train_set = {a.tobytes() for a in xt}
    assert all(a.tobytes() in train_set for a in arrays["x_train"][:, 0, :, :6])
    assert not any(a.tobytes() in train_set for a in arrays["x_test"][:, 0, :, :6])
    assert arrays["class_names"].tolist() == pair_class_names()
    data = fmnist_pairs(root, cache=tmp_path / "cache")
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("fmnist-pairs", 100, 1, (6, 12))
    assert data.class_names == pair_class_names() and data.train.images.dtype == torch.uint8
    assert torch.equal(data.train.images, torch.from_numpy(arrays["x_train"]))
    assert torch.equal(data.test.labels, torch.from_numpy(arrays["y_test"]))


def test_cache_is_written_once_then_read(tmp_path, monkeypatch, capsys):
    root = _fake_fmnist(tmp_path / "src")
    cache = tmp_path / "cache"
    first = fmnist_pairs(root, cache=cache)
    assert "built and cached in" in capsys.readouterr().err
    path = cache_path(source_digests(idx_paths(root)), cache)
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".sha256"]
    side = (cache / (path.name + ".sha256")).read_text()
    assert side == f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"  # sha256sum -c format
    with np.load(path, allow_pickle=False) as z:
        assert int(z["format"]) == pairs.PAIRS_FORMAT and int(z["seed"]) == PAIRS_SEED
        assert z["x_train"].dtype == np.uint8 and z["sources"].shape == (4,)

    def no_build(*a, **k):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(pairs, "build_arrays", no_build)
    second = fmnist_pairs(root, cache=cache)
    assert capsys.readouterr().err == ""
    assert torch.equal(first.train.images, second.train.images) and first.class_names == second.class_names
    monkeypatch.setenv("CSN_CACHE", str(cache))  # the default directory comes from $CSN_CACHE
    assert torch.equal(load_dataset("fmnist-pairs", str(root)).test.images, first.test.images)


def test_cache_file_bytes_are_deterministic(tmp_path):
    root = _fake_fmnist(tmp_path / "src")
    fmnist_pairs(root, cache=tmp_path / "a")
    fmnist_pairs(root, cache=tmp_path / "b")
    (a,), (b,) = (sorted((tmp_path / d).glob("*.npz")) for d in ("a", "b"))
    assert a.name == b.name and a.read_bytes() == b.read_bytes()


def test_cache_key_follows_the_source_files(tmp_path):
    root = _fake_fmnist(tmp_path / "src")
    before = cache_path(source_digests(idx_paths(root)), tmp_path)
    _fake_fmnist(root, seed=1)  # other images: another cache file, never the old one
    after = cache_path(source_digests(idx_paths(root)), tmp_path)
    assert before != after and after.name.startswith(f"fmnist-pairs-v{pairs.PAIRS_FORMAT}-")


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar", "no-sidecar", "garbage"])
def test_damaged_cache_is_rebuilt_with_a_note(tmp_path, capsys, damage):
    root = _fake_fmnist(tmp_path / "src")
    cache = tmp_path / "cache"
    good = fmnist_pairs(root, cache=cache)
    path = next(cache.glob("*.npz"))
    original, side = path.read_bytes(), path.with_name(path.name + ".sha256")
    capsys.readouterr()
    if damage == "flip":
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(original[:-100])
    elif damage == "sidecar":
        side.write_text("0" * 64 + f"  {path.name}\n")
    elif damage == "no-sidecar":
        side.unlink()
    else:  # bytes that match a forged sidecar but are no .npz: checked, then refused as unreadable
        path.write_bytes(b"not a zip file")
        side.write_text(f"{hashlib.sha256(b'not a zip file').hexdigest()}  {path.name}\n")
    assert read_cache(path)[0] is None
    again = fmnist_pairs(root, cache=cache)
    err = capsys.readouterr().err.strip().splitlines()
    want = {"flip": "is corrupt", "truncate": "is corrupt", "sidecar": "is corrupt", "no-sidecar": "has no valid checksum",
            "garbage": "cannot be read"}[damage]
    assert len(err) == 1 and err[0].startswith(f"note: the cached fmnist-pairs file {path} {want}")
    assert err[0].endswith("not used: rebuilding it.")
    assert torch.equal(again.train.images, good.train.images)
    assert path.read_bytes() == original and read_cache(path)[0] is not None  # rebuilt in place


def test_unwritable_cache_builds_in_memory(tmp_path, monkeypatch, capsys):
    root = _fake_fmnist(tmp_path / "src")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CSN_CACHE", str(blocker / "cache"))  # cannot be created, even by root
    data = load_dataset("fmnist-pairs", str(root))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("note: cannot write the fmnist-pairs cache") and "in memory" in err[0]
    assert data.num_classes == 100 and len(data.train) == 300
    assert list(tmp_path.glob("**/*.tmp")) == []


def test_registered_and_checked(tmp_path, monkeypatch):
    assert "fmnist-pairs" in DATASETS
    with pytest.raises(CsnError, match="takes no options"):
        load_dataset("fmnist-pairs", layout="NHWC")
    with pytest.raises(CsnError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fmnist-pairs", str(tmp_path))  # no IDX files there
    root = _fake_fmnist(tmp_path / "src", train_per_class=[30] * 9 + [5])
    monkeypatch.setenv("CSN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CsnError, match="class 9 has 5"):
        load_dataset("fmnist-pairs", str(root))
    monkeypatch.setenv("CSN_FASHION_MNIST", str(_fake_fmnist(tmp_path / "env")))  # data_root optional
    assert load_dataset("fmnist-pairs").num_classes == 100


# ----------------------------------------------------------------------------- the Debian files
@pytest.fixture(scope="module")
def fmnist_cache(tmp_path_factory) -> Path:
    """A cache directory holding the pairs of the Debian Fashion-MNIST files (built once per module)."""
    cache = tmp_path_factory.mktemp("pairs-cache")
    fmnist_pairs(FMNIST, cache=cache)
    return cache


@fmnist
def test_fashion_mnist_pairs(fmnist_cache):
    path = next(fmnist_cache.glob("*.npz"))
    arrays, problem = read_cache(path)
    assert problem is None
    _check_pairs(arrays, FMNIST, (600, 100))  # every pair against its source images, pixel by pixel
    for split, n in (("train", 60000), ("test", 10000)):  # each image once as a left and once as a right image
        assert np.array_equal(np.sort(arrays[f"{split}_left"]), np.arange(n))
        assert np.array_equal(np.sort(arrays[f"{split}_right"]), np.arange(n))
    data = fmnist_pairs(FMNIST, cache=fmnist_cache)
    assert (data.num_classes, data.in_channels, data.image_size) == (100, 1, (28, 56))
    assert (len(data.train), len(data.test)) == (60000, 10000)
    assert torch.bincount(data.train.labels).tolist() == [600] * 100
    assert torch.bincount(data.test.labels).tolist() == [100] * 100
    assert data.class_names[1] == "T-shirt/top | Trouser" and data.class_names[99] == "Ankle boot | Ankle boot"
    # same bytes when built again
    again = build_arrays(FMNIST)
    assert all(np.array_equal(again[k], arrays[k]) for k in ("x_train", "x_test", "train_left", "test_right"))


@fmnist
def test_train_a_tiny_run_on_fmnist_pairs(fmnist_cache, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("CSN_CACHE", str(fmnist_cache))
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--dataset", "fmnist-pairs", "--model", "resnet8", "--out", str(out),
                                   "--quiet", "epochs=0.1", "train_samples=3000", "test_samples=1000"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "run.json").read_text())["data"]
    assert data["name"] == "fmnist-pairs" and data["num_classes"] == 100 and data["image_size"] == [28, 56]
    assert len(data["class_names"]) == 100 and (data["num_train"], data["num_test"]) == (3000, 1000)
