"""Models by name: `create_model(name, num_classes, in_channels, width=...)` (timm-style registry)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from csn.errors import CsnError, unknown
from csn.models import external
from csn.models.base import CsnModel
from csn.models.external import require_trust, trusting_code
from csn.models.resnet_cifar import CifarResNet
from csn.models.resnet_imagenet import BasicBlock, Bottleneck, ImageNetResNet
from csn.models.simple import MLP, VGG, SmallCNN
from csn.models.vit import ViT

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "resnet8": lambda **kw: CifarResNet(1, **kw),
    "resnet14": lambda **kw: CifarResNet(2, **kw),
    "resnet20": lambda **kw: CifarResNet(3, **kw),
    "resnet32": lambda **kw: CifarResNet(5, **kw),
    "resnet56": lambda **kw: CifarResNet(9, **kw),
    "resnet18": lambda **kw: ImageNetResNet(BasicBlock, [2, 2, 2, 2], **kw),
    "resnet34": lambda **kw: ImageNetResNet(BasicBlock, [3, 4, 6, 3], **kw),
    "resnet50": lambda **kw: ImageNetResNet(Bottleneck, [3, 4, 6, 3], **kw),
    "vgg16": lambda **kw: VGG(batchnorm=True, **kw),
    "vgg16-nobn": lambda **kw: VGG(batchnorm=False, **kw),
    "cnn": lambda **kw: SmallCNN(**kw),
    "mlp": lambda **kw: MLP(**kw),
    "vit-tiny": lambda **kw: ViT(**kw),
}
_NEEDS_SIZE = {"vgg16", "vgg16-nobn", "mlp", "vit-tiny"}


def list_models() -> list[str]:
    """Names accepted by create_model (besides 'package.module:factory' and 'timm:NAME')."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int | tuple[int, int] | list[int] | None = None, **kwargs) -> nn.Module:
    """Build a model by name; every csn model declares its read points in `csn_stages`.

    name: a registered name (list_models()), 'package.module:factory' (any importable callable returning
    an nn.Module; it gets those of num_classes, in_channels, image_size, width its signature names), or
    'timm:NAME' (a timm model, untrained; needs the optional timm package). image_size (an int for
    square images, else (H, W)) is passed to the models that need it (VGG, MLP, ViT)."""
    if not isinstance(width, (int, float)) or not width > 0:
        raise CsnError(f"model width must be positive, got {width}.")
    if isinstance(name, str) and name.startswith("timm:"):
        return external.check_output(external.timm_model(name[5:], num_classes, in_channels, width, image_size),
                                     name, num_classes, in_channels, image_size)
    if isinstance(name, str) and ":" in name:
        return external.factory_model(name, num_classes=num_classes, in_channels=in_channels, width=width,
                                      image_size=image_size, **kwargs)
    if name not in _REGISTRY:
        raise unknown("model", name, list(_REGISTRY) + ["package.module:factory", "timm:NAME"])
    if name in _NEEDS_SIZE and image_size is not None:
        kwargs["image_size"] = image_size
    return _REGISTRY[name](num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


__all__ = ["create_model", "list_models", "trusting_code", "require_trust", "CsnModel", "CifarResNet", "ImageNetResNet", "VGG", "SmallCNN", "MLP", "ViT"]
