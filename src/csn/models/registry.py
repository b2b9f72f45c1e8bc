"""The model registry: `@register_model(NAME)` beside each model's factory; create_model and list_models read it.

A factory takes num_classes, in_channels and width, and image_size where the model's layers depend on the image
size (VGG, MLP, ViT: its signature names it, so create_model passes it); any other keyword a caller gives
create_model reaches it unchanged. A model defined outside csn registers the same way when its module is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from csn.registry import Registry

EXTERNAL_FORMS = ("package.module:factory", "timm:NAME")
"""Model names create_model takes besides the registered ones (csn.models.external)."""


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its name, its factory, whether the factory takes image_size, a one-line summary."""

    name: str
    factory: Callable[..., nn.Module]
    takes_image_size: bool
    summary: str


MODELS: Registry[ModelEntry] = Registry("model", "csn.models", extra=EXTERNAL_FORMS)
"""Every csn model by name (filled by register_model where each factory is defined)."""


def register_model(name: str, summary: str | None = None) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register the decorated factory as model `name` (summary: default the first line of its docstring)."""
    def entry(factory: Callable[..., nn.Module]) -> ModelEntry:
        params = inspect.signature(factory).parameters
        text = summary if summary is not None else (inspect.getdoc(factory) or "").split("\n")[0]
        return ModelEntry(name, factory, "image_size" in params, text)
    return MODELS.decorator(name, wrap=entry)


def model_help() -> str:
    """The registered names, for help texts: 'resnet20, resnet56, ..., vit-tiny'."""
    return ", ".join(MODELS.names())


__all__ = ["EXTERNAL_FORMS", "MODELS", "ModelEntry", "register_model", "model_help"]
