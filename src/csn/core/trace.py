"""The one hook layer: retain or edit the outputs of named modules (the shape of baukit's TraceDict).

Every analysis, the regularizer and `run_with_cache` read or change layer outputs through
`TraceDict`; hooks are removed when the block exits, also on error.

    with TraceDict(model, ["layer1.0", "layer2.0"]) as tr:      # retain unit activations [N, U]
        model(x)
    tr["layer1.0"]                                               # [N, units] of the last forward

    def silence(name, out):                                      # edit: return the new output
        return out * keep[name]
    with TraceDict(model, ["layer2.0"], retain=None, edit=silence):
        model(x)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from torch import Tensor, nn

from csn.core.units import first_tensor, replace_first, resolve_layers, unit_activations

Retain = Literal["units", "output"] | None
Edit = Callable[[str, Tensor], Tensor | None]


class TraceDict(dict):
    """Forward hooks on named modules; a dict {name: what was retained by the last forward}.

    retain: "units" (csn's units of the output, [N, U]; see csn.core.units), "output" (the output
    tensor itself) or None (nothing). detach: retain detached tensors (default); the regularizer
    keeps the graph (detach=False). edit(name, tensor) runs first and may return a replacement for
    the module's output tensor (tuple outputs keep their structure; None keeps the output).
    strict=False skips modules whose output holds no tensor instead of raising.

    Use as a context manager, or open()/close() for hooks that stay on across many forward passes
    (both idempotent). An unknown module name raises csn's unknown-layer error listing the names.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, retain: Retain = "units", detach: bool = True,
                 edit: Edit | None = None, strict: bool = True) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            resolve_layers(model, [missing[0]])  # raises the standard unknown-layer error
        self.model, self.layers = model, list(layers)
        self.retain, self.detach, self.edit, self.strict = retain, detach, edit, strict
        self._modules = modules
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def fn(_module: nn.Module, _inputs: tuple, output: Any) -> Any:
            if not self.strict:
                t = output[0] if isinstance(output, (tuple, list)) and len(output) else output
                if not isinstance(t, Tensor):
                    return None
            t = first_tensor(output)
            new = self.edit(name, t) if self.edit is not None else None
            if new is not None:
                t = new
            if self.retain is not None:
                kept = unit_activations(t) if self.retain == "units" else t
                self[name] = kept.detach() if self.detach else kept
            return None if new is None else replace_first(output, new)
        return fn

    def open(self) -> TraceDict:
        """Register the hooks (idempotent)."""
        if not self._handles:
            try:
                for name in self.layers:
                    self._handles.append(self._modules[name].register_forward_hook(self._hook(name)))
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Remove the hooks and forget what was retained (idempotent)."""
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
        self.clear()

    def __enter__(self) -> TraceDict:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_with_cache(model: nn.Module, x: Any, layers: Sequence[str] | str | None = None) -> tuple[Any, dict[str, Tensor]]:
    """Run the model once; return (output, {layer: [N, U] unit activations}) (TransformerLens's verb).

    layers: module names or patterns (csn.core.units.resolve_layers; default: the declared read points).
    """
    with TraceDict(model, resolve_layers(model, layers)) as tr:
        out = model(x)
        cache = dict(tr)
    return out, cache


__all__ = ["TraceDict", "run_with_cache"]
