"""A learnable, seeded, class-conditional synthetic image dataset for tests and demos."""

from __future__ import annotations

import torch

from csn.data.tensors import DataSplits, TensorSplit


def synthetic(num_train: int = 512, num_test: int = 256, num_classes: int = 4, channels: int = 1,
              size: int = 12, seed: int = 0, noise: float = 0.6) -> DataSplits:
    """Each class has a fixed random smooth prototype; an image is its prototype, a random shift of
    brightness and contrast, and Gaussian noise. Balanced classes, float images, seeded."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, max(2, size // 3), max(2, size // 3), generator=g)
    protos = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def make(n: int) -> TensorSplit:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=g)]
        scale = 1.0 + 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        shift = 0.2 * torch.randn(n, 1, 1, 1, generator=g)
        x = protos[y] * scale + shift + noise * torch.randn(n, channels, size, size, generator=g)
        return TensorSplit(x.float(), y.long(), mean=(0.0,) * channels, std=(1.0,) * channels)

    return DataSplits("synthetic", make(num_train), make(num_test), num_classes, channels, size,
                      [f"class{k}" for k in range(num_classes)])
