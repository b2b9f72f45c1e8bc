"""Units and read points: what a unit is (read side and write side), layer patterns, stages.

A *unit* is one channel of a conv feature map (its value for an image is the spatial mean), one
feature of a fully connected layer, or one hidden feature of a token layer (mean over tokens; never
a mean over hidden features, which would turn tokens into units). This file is the only place that
definition lives: `unit_activations` reads units, `unit_dim`/`broadcast_units` write them (ablation).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csn.errors import CsnError, closest

# ------------------------------------------------------------------------------------------------
# module outputs
# ------------------------------------------------------------------------------------------------

def first_tensor(output: Any) -> Tensor:
    """The tensor a module returned (the first element of a tuple/list output)."""
    t = output[0] if isinstance(output, (tuple, list)) and len(output) else output
    if not isinstance(t, Tensor):
        raise CsnError(f"a read point returned {type(t).__name__}, not a tensor; choose a module that outputs a tensor.")
    return t


def replace_first(output: Any, t: Tensor) -> Any:
    """The module output with its tensor replaced by t (tuple/list structure kept)."""
    if isinstance(output, (tuple, list)):
        return type(output)([t, *output[1:]])
    return t


# ------------------------------------------------------------------------------------------------
# read side and write side of a unit
# ------------------------------------------------------------------------------------------------

def unit_activations(output: Any) -> Tensor:
    """Reduce a layer output to one value per unit and example: [N, U].

    4-D [N, C, H, W] -> spatial mean per channel; 3-D [N, T, D] (batch-first tokens) -> mean over
    tokens per hidden feature; 2-D [N, F] -> unchanged.
    """
    t = first_tensor(output)
    if t.dim() == 4:
        if t.device.type != "cpu":  # one pooling kernel whose gradient keeps t's memory format (channels_last)
            return F.adaptive_avg_pool2d(t, 1).flatten(1)
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    raise CsnError(f"cannot read units from an output of shape {tuple(t.shape)}; choose a layer with 2-D, 3-D or 4-D output.")


def unit_dim(t: Tensor) -> int:
    """Dimension that indexes units: 1 for [N, C, H, W] and [N, F]; the last one for [N, T, D] token outputs."""
    if t.dim() in (2, 4):
        return 1
    if t.dim() == 3:
        return 2
    raise CsnError(f"cannot ablate units of an output of shape {tuple(t.shape)}; choose a layer with 2-D, 3-D or 4-D output.")


def broadcast_units(values: Tensor, t: Tensor) -> Tensor:
    """View [rows, U] per-unit values so they broadcast against t along its unit dimension (rows = 1 or t's batch)."""
    rows, u = values.shape
    if t.dim() == 4:
        return values.view(rows, u, 1, 1)
    if t.dim() == 3:
        return values.view(rows, 1, u)
    return values


# ------------------------------------------------------------------------------------------------
# read points and stages
# ------------------------------------------------------------------------------------------------

def stages_from_patterns(model: nn.Module, spec: Sequence[str] | dict[str, Sequence[str]]) -> dict[str, list[str]]:
    """{stage: [module names]} from layer patterns: a list gives one stage per pattern (named after the
    pattern without its trailing '.*', else stage1, stage2, ...), a mapping names the stages itself.

    What a run's `layers` key turns into (csn_stages of the model it builds), so the analyses and the
    regularizer of any model use the same read points.
    """
    if isinstance(spec, dict):
        named = {str(k): list(v) for k, v in spec.items()}
    else:
        names = [p[:-2] if p.endswith(".*") else p for p in spec]
        plain = all(n and not any(c in n for c in "*?[]") for n in names) and len(set(names)) == len(names)
        named = {(n if plain else f"stage{i + 1}"): [p] for i, (n, p) in enumerate(zip(names, spec))}
    if not named or any(not v for v in named.values()):
        raise CsnError("layers needs at least one pattern per stage, e.g. layers = ['layer1.*', 'layer2.*'] or "
                       "layers = {early = ['blocks.0', 'blocks.1'], late = ['blocks.5']}.")
    out = {stage: resolve_layers(model, pats) for stage, pats in named.items()}
    seen: dict[str, str] = {}
    for stage, layers in out.items():
        for layer in layers:
            if layer in seen:
                raise CsnError(f"layer {layer!r} is in stages {seen[layer]!r} and {stage!r}; give each read point one stage.")
            seen[layer] = stage
    return out


def stages(model: nn.Module) -> dict[str, list[str]]:
    """The model's declared read points grouped by stage: {stage: [module names]}.

    csn models declare `csn_stages`; torchvision-style ResNets (children layer1..layerN of blocks)
    are recognised; any other model needs explicit layer patterns.
    """
    declared = getattr(model, "csn_stages", None)
    if declared:
        return {k: list(v) for k, v in declared.items()}
    found: dict[str, list[str]] = {}
    for name, child in model.named_children():
        if name.startswith("layer") and name[5:].isdigit() and isinstance(child, nn.Sequential):
            found[name] = [f"{name}.{i}" for i in range(len(child))]
    if found:
        return found
    raise CsnError(
        f"{type(model).__name__} declares no read points; pass layer patterns explicitly "
        f"(e.g. --layers 'features.*'), or set model.csn_stages = {{'stage': ['module.name', ...]}}."
    )


def default_layers(model: nn.Module) -> list[str]:
    """All declared read points in forward order."""
    return [name for names in stages(model).values() for name in names]


def resolve_layers(model: nn.Module, patterns: Sequence[str] | str | None = None) -> list[str]:
    """Module names matching glob patterns (`layer2.*`, `features.3`), in model order.

    With no patterns, the model's declared read points. An unknown pattern raises a CsnError that
    lists the available module names, closest first.
    """
    if patterns is None:
        return default_layers(model)
    if isinstance(patterns, str):
        patterns = [patterns]
    if len(patterns) == 0:
        raise CsnError("no layer pattern given; pass at least one (e.g. 'layer2.*') or None for the model's read points.")
    names = [n for n, _ in model.named_modules() if n]
    declared = set()
    try:
        declared = set(default_layers(model))
    except CsnError:
        pass
    chosen: list[str] = []
    for pat in patterns:
        if not isinstance(pat, str) or not pat.strip():
            raise CsnError(f"layer pattern {pat!r} is empty; give a module name or glob such as 'layer2.*'.")
        if pat in names:
            hits = [pat]
        else:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
            # 'layer2.*' means the modules one level below layer2 (its blocks), not every submodule; among
            # those, the declared read points when some are (VGG's 'features.*': its ReLUs). 'blocks.*' of a
            # ViT whose read points sit deeper (blocks.0.mlp.act) therefore names the block outputs.
            top = [h for h in hits if "." not in h[len(pat.rstrip("*").rstrip(".")) + 1:]] or hits
            hits = [h for h in top if h in declared] or top
        if not hits:
            near = closest(pat, names, n=8)
            raise CsnError(f"layer pattern {pat!r} matches no module; available names (closest first): {', '.join(near)}.")
        chosen.extend(h for h in hits if h not in chosen)
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def stage_of(model: nn.Module, layer: str) -> str:
    """Stage name of a read point, or the layer name itself when it belongs to no declared stage."""
    try:
        for stage, names in stages(model).items():
            if layer in names:
                return stage
    except CsnError:
        pass
    return layer


def relu_modules(model: nn.Module) -> list[str]:
    """Names of nn.ReLU modules (used by linearity's ReLU-pattern measure)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]


# ------------------------------------------------------------------------------------------------
# batches, devices and modes
# ------------------------------------------------------------------------------------------------

def split_batch(batch: Any) -> tuple[Any, Any]:
    """(x, y) from a batch given as a tuple/list (extra items ignored)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CsnError(f"each batch must be an (inputs, labels) pair, got {type(batch).__name__}; use a labelled DataLoader.")


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: x of an (x, y, ...) tuple, or the batch itself."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def to_device(x: Any, device: torch.device) -> Any:
    """Move a tensor (or a tuple/list/dict of tensors) to device; anything else is returned as is."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Put models in eval mode, restoring every submodule's training flag afterwards (also on error)."""
    saved = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        for model in models:
            if model is not None:
                model.eval()
        yield
    finally:
        for m, flag in saved:
            m.training = flag


__all__ = [
    "first_tensor", "replace_first", "unit_activations", "unit_dim", "broadcast_units", "stages", "stages_from_patterns",
    "default_layers",
    "resolve_layers", "stage_of", "relu_modules", "split_batch", "batch_inputs", "to_device", "model_device",
    "eval_mode",
]
