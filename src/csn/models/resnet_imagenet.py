"""ImageNet ResNet-18/34/50 with torchvision's module names and state-dict keys, without torchvision."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from csn.models.base import CsnModel
from csn.models.registry import register_model


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (same parameter names); one ReLU module per use so each can be hooked."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu_out = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu_out(out + idt)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv, v1.5), same parameter names."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.relu2 = nn.ReLU(inplace=True)
        self.relu_out = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(out + idt)


class ImageNetResNet(CsnModel):
    """ResNet for 224x224 inputs; stages layer1..layer4 (the study's 'modules 4-7')."""

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, in_channels: int = 3,
                 width: float = 1.0, zero_init_residual: bool = False) -> None:
        super().__init__()
        planes = [max(1, int(round(p * width))) for p in (64, 128, 256, 512)]
        self.inplanes = planes[0]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = planes[0]
        self.csn_stages = {}
        for s, (p, n) in enumerate(zip(planes, layers)):
            blocks = []
            for b in range(n):
                blocks.append(block(cin, p, 2 if (s > 0 and b == 0) else 1))
                cin = p * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
            self.csn_stages[f"layer{s + 1}"] = [f"layer{s + 1}.{b}" for b in range(n)]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None
                if last is not None:
                    nn.init.zeros_(last.weight)

    def segments(self):
        return [
            ("stem", lambda x: self.maxpool(self.relu(self.bn1(self.conv1(x))))),
            ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3), ("layer4", self.layer4),
            ("head", lambda h: self.fc(torch.flatten(self.avgpool(h), 1))),
        ]


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-18 (basic blocks 2/2/2/2), torchvision's module names."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels, width, **kwargs)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-34 (basic blocks 3/4/6/3), torchvision's module names."""
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels, width, **kwargs)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, width: float = 1.0, **kwargs) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottleneck blocks 3/4/6/3), torchvision's module names."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels, width, **kwargs)
