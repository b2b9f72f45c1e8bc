"""A CIFAR-style VGG-16, a small plain CNN and an MLP, each declaring its read points."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from csn.models.base import CsnModel
from csn.models.registry import register_model

VGG16_CFG = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]


def image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an image_size given as an int (square) or as (height, width) (run.json: [H, W])."""
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class VGG(CsnModel):
    """VGG-16 for small images (the study's second architecture): 5 blocks of 3x3 convs, BN optional.

    Read points: the ReLU after every conv, grouped by block (stages block1..block5). Spatial size
    is halved after each block while both sides are larger than 1 (image_size: int, or (H, W)).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, batchnorm: bool = True,
                 image_size: int | Sequence[int] = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        self.csn_stages = {}
        (h, w), cin, self._block_ends = image_hw(image_size), in_channels, []
        for b, cfg in enumerate(VGG16_CFG):
            names = []
            for c in cfg:
                c = max(1, int(round(c * width)))
                layers.append(nn.Conv2d(cin, c, 3, padding=1, bias=not batchnorm))
                if batchnorm:
                    layers.append(nn.BatchNorm2d(c))
                layers.append(nn.ReLU(inplace=True))
                names.append(f"features.{len(layers) - 1}")
                cin = c
            if min(h, w) > 1:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            self._block_ends.append(len(layers))
            self.csn_stages[f"block{b + 1}"] = names
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def segments(self):
        segs, start = [], 0
        for b, end in enumerate(self._block_ends):
            segs.append((f"block{b + 1}", self.features[start:end]))
            start = end
        segs.append(("head", lambda h: self.classifier(torch.flatten(self.avgpool(h), 1))))
        return segs


class SmallCNN(CsnModel):
    """Three conv-BN-ReLU blocks (widths 16/32/64 x width) with max-pooling; read points conv1..conv3."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> None:
        super().__init__()
        w = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        def block(cin: int, cout: int, pool: bool) -> nn.Sequential:
            mods = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            return nn.Sequential(*mods, *( [nn.MaxPool2d(2)] if pool else []))
        self.conv1 = block(in_channels, w[0], True)
        self.conv2 = block(w[0], w[1], True)
        self.conv3 = block(w[1], w[2], False)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[2], num_classes)
        self.csn_stages = {"conv1": ["conv1"], "conv2": ["conv2"], "conv3": ["conv3"]}

    def segments(self):
        return [("conv1", self.conv1), ("conv2", self.conv2), ("conv3", self.conv3),
                ("head", lambda h: self.fc(torch.flatten(self.avgpool(h), 1)))]


class MLP(CsnModel):
    """Flatten, then hidden Linear-ReLU layers (read points = each hidden ReLU), then a linear classifier.
    image_size: int (square images) or (H, W)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 image_size: int | Sequence[int] = 28, hidden: tuple[int, ...] = (256, 128)) -> None:
        super().__init__()
        ih, iw = image_hw(image_size)
        dims = [in_channels * ih * iw] + [max(1, int(round(h * width))) for h in hidden]
        self.csn_stages = {}
        for i in range(len(hidden)):
            setattr(self, f"fc{i + 1}", nn.Linear(dims[i], dims[i + 1]))
            setattr(self, f"relu{i + 1}", nn.ReLU())
            self.csn_stages[f"hidden{i + 1}"] = [f"relu{i + 1}"]
        self.n_hidden = len(hidden)
        self.out = nn.Linear(dims[-1], num_classes)

    def segments(self):
        segs = [("flatten", lambda x: torch.flatten(x, 1))]
        for i in range(self.n_hidden):
            fc, relu = getattr(self, f"fc{i + 1}"), getattr(self, f"relu{i + 1}")
            segs.append((f"hidden{i + 1}", lambda h, fc=fc, relu=relu: relu(fc(h))))
        segs.append(("head", self.out))
        return segs


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int | Sequence[int] = 32) -> VGG:
    """VGG-16 for small images, with BatchNorm (stages block1..block5)."""
    return VGG(num_classes, in_channels, width, batchnorm=True, image_size=image_size)


@register_model("vgg16-nobn")
def vgg16_nobn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
               image_size: int | Sequence[int] = 32) -> VGG:
    """VGG-16 for small images, without BatchNorm."""
    return VGG(num_classes, in_channels, width, batchnorm=False, image_size=image_size)


@register_model("cnn")
def cnn(num_classes: int = 10, in_channels: int = 1, width: float = 1.0) -> SmallCNN:
    """A small CNN: three conv-BN-ReLU blocks (widths 16/32/64 x width)."""
    return SmallCNN(num_classes, in_channels, width)


@register_model("mlp")
def mlp(num_classes: int = 10, in_channels: int = 1, width: float = 1.0, image_size: int | Sequence[int] = 28,
        hidden: tuple[int, ...] = (256, 128)) -> MLP:
    """An MLP: hidden Linear-ReLU layers (256/128 x width), read at each hidden ReLU."""
    return MLP(num_classes, in_channels, width, image_size, hidden)
