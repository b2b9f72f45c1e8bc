"""A learnable, seeded, class-conditional synthetic image dataset for tests and demos."""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from csn.data.registry import register_dataset
from csn.data.tensors import DataSplits, TensorSplit
from csn.data.validate import check_memory, validate_splits
from csn.errors import CsnError

SYNTHETIC_KEYS = ("num_train", "num_test", "num_classes", "channels", "size", "seed", "noise")


def _integer(key: str, value, minimum: int, what: str) -> int:
    """An integer parameter: ints, or floats that are whole numbers (1e9 from JSON); at least `minimum`."""
    ok = isinstance(value, Integral) or (isinstance(value, Real) and math.isfinite(value) and float(value).is_integer())
    if isinstance(value, bool) or not ok or int(value) < minimum:
        raise CsnError(f"synthetic key {key!r} must be {what}, got {value!r}.")
    return int(value)


def synthetic_params(num_train=512, num_test=256, num_classes=4, channels=1, size=12, seed=0, noise=0.6) -> dict:
    """The checked parameters of `synthetic`: types and ranges, then the memory generating them needs
    (bounded by $CSN_MAX_DATA_GB, default 8 GB), then every class in each split; each problem is a
    one-line CsnError, raised before anything is allocated."""
    p = {"num_classes": _integer("num_classes", num_classes, 2, "an integer of at least 2 (selectivity compares classes)"),
         "num_train": _integer("num_train", num_train, 1, "a positive integer"),
         "num_test": _integer("num_test", num_test, 1, "a positive integer"),
         "channels": _integer("channels", channels, 1, "a positive integer"),
         "size": _integer("size", size, 1, "a positive integer (the image height and width)"),
         "seed": _integer("seed", seed, -(2**63), "an integer")}
    if p["seed"] >= 2**64:
        raise CsnError(f"synthetic key 'seed' must be below 2**64, got {seed!r}.")
    if isinstance(noise, bool) or not isinstance(noise, Real) or not (math.isfinite(noise) and noise >= 0):
        raise CsnError(f"synthetic key 'noise' must be a finite number >= 0, got {noise!r}.")
    p["noise"] = float(noise)
    k, n, c, s = p["num_classes"], p["num_train"] + p["num_test"], p["channels"], p["size"]
    # stored images, the largest split's temporaries (prototype copies and noise), the prototypes, the labels
    need = 4 * c * s * s * (n + 2 * max(p["num_train"], p["num_test"]) + k) + 8 * n
    check_memory(need, f"generating synthetic data of {n:,} x {c} x {s} x {s} float32 images ({p['num_train']:,} "
                       f"train + {p['num_test']:,} test) and {k:,} class prototypes")
    for key in ("num_train", "num_test"):
        if p[key] < k:
            raise CsnError(f"synthetic key {key!r} ({p[key]:,}) must be at least num_classes ({k:,}), so that every "
                           "class has an example in each split.")
    return p


def synthetic(num_train: int = 512, num_test: int = 256, num_classes: int = 4, channels: int = 1,
              size: int = 12, seed: int = 0, noise: float = 0.6) -> DataSplits:
    """Each class has a fixed random smooth prototype; an image is its prototype, a random shift of
    brightness and contrast, and Gaussian noise. Balanced classes, float images, seeded.

    The parameters are checked first (`synthetic_params`: types, num_classes >= 2, every class in
    both splits, memory bounded by $CSN_MAX_DATA_GB) and the result goes through
    `csn.data.validate.validate_splits` like every reader's."""
    p = synthetic_params(num_train, num_test, num_classes, channels, size, seed, noise)
    num_train, num_test, num_classes = p["num_train"], p["num_test"], p["num_classes"]
    channels, size, noise = p["channels"], p["size"], p["noise"]
    g = torch.Generator().manual_seed(p["seed"])
    coarse = torch.randn(num_classes, channels, max(2, size // 3), max(2, size // 3), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> TensorSplit:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        scale = 1.0 + 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        shift = 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        x = protos[y] * scale + shift + noise * torch.randn(n, channels, size, size, generator=g)
        return TensorSplit(x.float(), y.long())

    train, test = make(num_train), make(num_test)
    where = f"synthetic data (seed {p['seed']})"
    sources = {k: f"{where}, {k.replace('_', ' ')}" for k in ("train_images", "train_labels", "test_images", "test_labels")}
    return validate_splits(train.images, train.labels, test.images, test.labels, name="synthetic", sources=sources,
                           class_names=[f"class{k}" for k in range(num_classes)],
                           norm=((0.0,) * channels, (1.0,) * channels))


@register_dataset("synthetic", options=SYNTHETIC_KEYS, option_kind="key")
def synthetic_dataset(data_root: str | None = None, **params) -> DataSplits:
    """Seeded class prototypes plus noise, no files (options: SYNTHETIC_KEYS); data_root is not read."""
    return synthetic(**params)
