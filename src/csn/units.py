"""Units and read points: resolve layer-name patterns to modules and read per-unit activations.

A *unit* is one channel of a conv feature map (its value for an image is the spatial mean), one
feature of a fully connected layer, or one hidden feature of a token layer (mean over tokens).
This file is the only place that definition lives.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from csn.errors import CsnError, closest


def unit_activations(output: Tensor) -> Tensor:
    """Reduce a layer output to one value per unit and example: [N, U].

    4-D [N, C, H, W] -> spatial mean per channel; 3-D [N, T, D] (batch-first tokens) -> mean over
    tokens per hidden feature; 2-D [N, F] -> unchanged.
    """
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor):
        raise CsnError(f"a read point returned {type(output).__name__}, not a tensor; choose a module that outputs a tensor.")
    if output.dim() == 4:
        return output.mean(dim=(2, 3))
    if output.dim() == 3:
        return output.mean(dim=1)
    if output.dim() == 2:
        return output
    raise CsnError(f"cannot read units from an output of shape {tuple(output.shape)}; choose a layer with 2-D, 3-D or 4-D output.")


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
            # 'layer2.*' should mean the blocks of layer2 (the read points), not every submodule.
            if declared and any(h in declared for h in hits):
                hits = [h for h in hits if h in declared]
            else:
                hits = [h for h in hits if "." not in h[len(pat.rstrip("*").rstrip(".")) + 1:]] or hits
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


@contextmanager
def hooks(model: nn.Module, fns: Mapping[str, Callable[[nn.Module, tuple, Tensor], Tensor | None]]) -> Iterator[None]:
    """Register forward hooks by module name; they are always removed, also on error.

    A hook returning a tensor replaces the module's output (used for ablation).
    """
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, fn in fns.items():
            if name not in modules:
                resolve_layers(model, [name])  # raises the standard unknown-layer error
            handles.append(modules[name].register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def trace_units(model: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Context manager yielding a dict filled, on every forward pass, with [N, U] unit activations per layer.

    Gradients flow through the stored tensors (the regularizer uses this in training mode).
    """
    cache: dict[str, Tensor] = {}

    def make(name: str):
        def fn(_m: nn.Module, _inp: tuple, out: Tensor) -> None:
            cache[name] = unit_activations(out)
        return fn

    with hooks(model, {name: make(name) for name in layers}):
        yield cache


def run_with_cache(model: nn.Module, x: Tensor, layers: Sequence[str] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Run the model once; return (output, {layer: [N, U] unit activations})."""
    names = resolve_layers(model, layers)
    with trace_units(model, names) as cache:
        out = model(x)
    return out, dict(cache)


def to_device(x, device: torch.device):
    """Move a tensor (or a tuple/list/dict of tensors) to device; anything else is returned as is."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def relu_modules(model: nn.Module) -> list[str]:
    """Names of nn.ReLU modules (used by linearity's ReLU-pattern measure)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]


__all__ = [
    "unit_activations", "stages", "default_layers", "resolve_layers", "stage_of", "hooks",
    "trace_units", "run_with_cache", "relu_modules", "to_device",
]
