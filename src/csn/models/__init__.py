"""Models by name: `create_model(name, num_classes, in_channels, width=...)` (timm-style registry).

Each csn model registers itself beside its factory (`@register_model("resnet20")`, csn.models.registry); a model
defined elsewhere registers the same way when its module is imported. Besides the registered names, create_model
takes 'package.module:factory' and 'timm:NAME' (csn.models.external).
"""

from __future__ import annotations

from torch import nn

from csn.errors import CsnError
from csn.models import external
from csn.models.base import CsnModel
from csn.models.external import require_trust, trusting_code
from csn.models.registry import MODELS, ModelEntry, model_help, register_model
from csn.models.resnet_cifar import CifarResNet
from csn.models.resnet_imagenet import ImageNetResNet
from csn.models.simple import MLP, VGG, SmallCNN
from csn.models.vit import ViT, ViTShape


def list_models() -> list[str]:
    """Names accepted by create_model (besides 'package.module:factory' and 'timm:NAME')."""
    return MODELS.names()


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, width: float = 1.0,
                 image_size: int | tuple[int, int] | list[int] | None = None, **kwargs) -> nn.Module:
    """Build a model by name; every csn model declares its read points in `csn_stages`.

    name: a registered name (list_models()), 'package.module:factory' (any importable callable returning
    an nn.Module; it gets those of num_classes, in_channels, image_size, width its signature names), or
    'timm:NAME' (a timm model, untrained; needs the optional timm package). image_size (an int for
    square images, else (H, W)) is passed to the models whose factory takes it (VGG, MLP, ViT)."""
    if not isinstance(width, (int, float)) or not width > 0:
        raise CsnError(f"model width must be positive, got {width}.")
    if isinstance(name, str) and name.startswith("timm:"):
        return external.check_output(external.timm_model(name[5:], num_classes, in_channels, width, image_size),
                                     name, num_classes, in_channels, image_size)
    if isinstance(name, str) and ":" in name:
        return external.factory_model(name, num_classes=num_classes, in_channels=in_channels, width=width,
                                      image_size=image_size, **kwargs)
    entry = MODELS.get(name)
    if entry.takes_image_size and image_size is not None:
        kwargs["image_size"] = image_size
    return entry.factory(num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)


__all__ = ["create_model", "list_models", "register_model", "model_help", "MODELS", "ModelEntry", "trusting_code",
           "require_trust", "CsnModel", "CifarResNet", "ImageNetResNet", "VGG", "SmallCNN", "MLP", "ViT", "ViTShape"]
