"""Models that are not csn's: any importable factory ('package.module:factory') and timm models ('timm:NAME').

Their read points come from the run's `layers` patterns, from a `csn_stages` attribute the model sets
itself, or (torchvision/timm ResNets) from their layer1..layerN children (csn.core.units.stages).
Before a model is used, one forward pass of two blank images checks that it takes the dataset's images
and returns one logit per class, so a mismatch is one sentence at start-up rather than a shape error
deep inside training.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from csn.errors import CsnError

FACTORY_ARGS = ("num_classes", "in_channels", "image_size", "width")
"""What a factory may take (by these parameter names); it gets those its signature names."""


def _load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by 'package.module:attr' (attr may be dotted: 'mod:Class.build')."""
    module_name, _, attr = spec.partition(":")
    fix = "write the model as 'package.module:factory' with the module importable (on PYTHONPATH or installed)"
    if not module_name or not attr or any(not p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise CsnError(f"model {spec!r} is neither a csn model name nor 'package.module:factory'; {fix}.")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise CsnError(f"model {spec!r}: module {module_name!r} cannot be imported ({e}); {fix}.") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CsnError(f"model {spec!r}: {module_name} has no attribute {attr!r}; {fix}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CsnError(f"model {spec!r}: {module_name}.{attr} is not callable; name a function or class that returns "
                       "an nn.Module.")
    return obj


def factory_model(spec: str, *, num_classes: int, in_channels: int, width: float,
                  image_size: int | tuple[int, int] | list[int] | None, **extra: Any) -> nn.Module:
    """Call the factory of 'package.module:factory' with the arguments its signature names."""
    fn = _load_factory(spec)
    offered = {"num_classes": num_classes, "in_channels": in_channels, "width": width, "image_size": image_size, **extra}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: pass nothing it might refuse
        params = {}
    kwargs = {k: v for k, v in offered.items() if k in params and v is not None}
    if width != 1.0 and "width" not in params:
        raise CsnError(f"model {spec!r} takes no width argument, so width={width:g} cannot apply; use width=1 or add "
                       "a width parameter to the factory.")
    try:
        model = fn(**kwargs)
    except CsnError:
        raise
    except Exception as e:
        raise CsnError(f"model {spec!r} failed to build with {kwargs} ({type(e).__name__}: {e}); fix the factory or "
                       "its arguments.") from None
    if not isinstance(model, nn.Module):
        raise CsnError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module; return the model.")
    return model


def timm_model(name: str, num_classes: int, in_channels: int, width: float,
               image_size: int | tuple[int, int] | list[int] | None) -> nn.Module:
    """timm.create_model(name) untrained, for the dataset's classes, channels and (where it takes one) image size."""
    try:
        import timm
    except ImportError:
        raise CsnError(f"model 'timm:{name}' needs timm, which is not installed; install it with "
                       "`pip install 'csn[timm]'` (or use a csn model such as resnet20 or vit-tiny).") from None
    if width != 1.0:
        raise CsnError(f"width={width:g} applies to csn's own models only; timm:{name} is built as timm defines it "
                       "(use width=1).")
    if not name or name not in timm.list_models():
        raise CsnError(f"timm has no model {name!r}; `python -c \"import timm; print(timm.list_models('*vit*'))\"` "
                       "lists its names.")
    kw: dict[str, Any] = {"pretrained": False, "num_classes": num_classes, "in_chans": in_channels}
    if image_size is not None:  # ViT-like timm models are built for an image size; others refuse the argument
        try:
            return timm.create_model(name, img_size=image_size if isinstance(image_size, int) else tuple(image_size), **kw)
        except TypeError:
            pass
    return timm.create_model(name, **kw)


def check_output(model: nn.Module, name: str, num_classes: int, in_channels: int,
                 image_size: int | tuple[int, int] | list[int] | None) -> nn.Module:
    """One eval-mode forward of two blank images: the model must return [2, num_classes] logits."""
    if image_size is None or any(t.is_meta for t in model.parameters()):
        return model  # a skeleton on the meta device (the size check before training): checked when really built
    h, w = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    x = torch.zeros(2, in_channels, h, w)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise CsnError(f"model {name!r} fails on a batch of {in_channels}-channel {h}x{w} images ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); build it for the dataset's images.") from None
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise CsnError(f"model {name!r} returns {got} for 2 images, not logits of shape (2, {num_classes}); it must "
                       f"output one logit per class ({num_classes} classes).")
    return model


__all__ = ["FACTORY_ARGS", "factory_model", "timm_model", "check_output"]
