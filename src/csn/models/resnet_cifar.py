"""CIFAR-style ResNets (He et al. 2016, section 4.2): 3 stages of basic blocks, widths 16/32/64 x width."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csn.models.base import CsnModel
from csn.models.registry import register_model


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus shortcut (1x1 conv + BN when the shape changes), then ReLU.

    The block's output (after the addition and the final ReLU) is the unit read point.
    """

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(CsnModel):
    """ResNet-(6n+2) for small images; stages layer1..layer3, read points = every block output."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        widths = [max(1, int(round(w * width))) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for s, w in enumerate(widths):
            layers = []
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(cin, w, 2 if (s > 0 and b == 0) else 1))
                cin = w
            setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.csn_stages = {f"layer{s + 1}": [f"layer{s + 1}.{b}" for b in range(blocks_per_stage)] for s in range(3)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def segments(self):
        return [
            ("stem", lambda x: self.relu(self.bn1(self.conv1(x)))),
            ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3),
            ("head", lambda h: self.fc(torch.flatten(self.avgpool(h), 1))),
        ]



@register_model("resnet8")
def resnet8(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-8: 1 basic block per stage, widths 16/32/64 x width."""
    return CifarResNet(1, num_classes, in_channels, width)


@register_model("resnet14")
def resnet14(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-14: 2 basic blocks per stage, widths 16/32/64 x width."""
    return CifarResNet(2, num_classes, in_channels, width)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-20: 3 basic blocks per stage, widths 16/32/64 x width."""
    return CifarResNet(3, num_classes, in_channels, width)


@register_model("resnet32")
def resnet32(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-32: 5 basic blocks per stage, widths 16/32/64 x width."""
    return CifarResNet(5, num_classes, in_channels, width)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> CifarResNet:
    """CIFAR ResNet-56: 9 basic blocks per stage, widths 16/32/64 x width."""
    return CifarResNet(9, num_classes, in_channels, width)
