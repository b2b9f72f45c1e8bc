"""What gets ablated: unit masks, the `ablate_units` context manager, grids, unit orders and seeded draws.

`ablate_units(model, {layer: units})` silences chosen channels/features of any model's layers while
it is open (zero, or the unit's dataset mean); the write side of a unit (which dimension, how a
per-unit value broadcasts) comes from csn.core.units and the hooks from csn.core.trace.TraceDict,
so they are removed on exit and on error.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from csn.core.trace import TraceDict
from csn.core.units import broadcast_units, unit_dim
from csn.errors import CsnError, unknown

ORDERS = ("selective", "random", "least")
"""Unit orders: most selective first, a seeded random set, least selective first."""
MODES = ("zero", "mean")
"""Ablation modes: set the unit to 0 (the study's), or to its dataset mean (a variant)."""
DEFAULT_FRACTIONS = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 1.0)
"""Default grid: fractions of the block width, dense at the start, rounded to unique unit counts."""


# ------------------------------------------------------------------------------------------------
# masks and the ablation context manager
# ------------------------------------------------------------------------------------------------

def apply_ablation(t: Tensor, ablate: Tensor, keep: Tensor | None, mean: Tensor | None) -> Tensor:
    """Ablated copy of t: zero mode multiplies by `keep` (1/0), mean mode puts `mean` where `ablate` is True.

    ablate/keep are [rows, U] (rows = 1 or t's batch), mean is [U]; they broadcast along t's unit dimension.
    """
    if mean is None:
        return t * broadcast_units(keep.to(t.dtype), t)
    return torch.where(broadcast_units(ablate, t), broadcast_units(mean.to(t.dtype).view(1, -1), t), t)


def units_mask(layer: str, selection: Any, num_units: int) -> Tensor:
    """Bool [num_units] mask (True = ablate) from unit indices or a bool mask of that length."""
    sel = selection
    if isinstance(sel, np.ndarray):
        sel = torch.from_numpy(sel)
    if isinstance(sel, Tensor) and sel.dtype == torch.bool:
        if sel.shape != (num_units,):
            raise CsnError(f"the ablation mask for layer {layer!r} has shape {tuple(sel.shape)} but the layer has "
                           f"{num_units} units; pass one bool per unit.")
        return sel.detach().cpu().clone()
    idx = torch.as_tensor(list(sel) if not isinstance(sel, Tensor) else sel, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_units):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise CsnError(f"unit index {bad} is out of range for layer {layer!r}, which has {num_units} units "
                       f"(0..{num_units - 1}).")
    mask = torch.zeros(num_units, dtype=torch.bool)
    mask[idx] = True
    return mask


def check_mode(mode: str, means: Mapping[str, Any] | None, layers: Iterable[str]) -> None:
    """A known mode, and for mode='mean' a per-unit mean for every layer."""
    if mode not in MODES:
        raise unknown("ablation mode", mode, MODES)
    if mode == "mean":
        missing = [name for name in layers if means is None or name not in means]
        if missing:
            raise CsnError(f"mode='mean' needs each unit's dataset mean, but none was given for layer {missing[0]!r}; "
                           "pass means={layer: Tensor[units]}.")


def _layer_ablation(name: str, selection: Any, t: Tensor, mode: str,
                    means: Mapping[str, Any] | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(ablate [1, U], keep [1, U] | None, mean [U] | None) of one layer for an output like t."""
    u = t.shape[unit_dim(t)]
    abl = units_mask(name, selection, u).to(t.device).view(1, u)
    keep = (~abl).to(t.dtype) if mode == "zero" else None
    mean = None
    if mode == "mean":
        mean = torch.as_tensor(means[name]).detach().to(device=t.device, dtype=t.dtype).flatten()  # type: ignore[index]
        if mean.numel() != u:
            raise CsnError(f"means for layer {name!r} have {mean.numel()} values but the layer has {u} units; "
                           "pass one mean per unit.")
    return abl, keep, mean


@contextmanager
def ablate_units(model: nn.Module, units: Mapping[str, Any], mode: str = "zero",
                 means: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ablate chosen units of any model while the context is open: `with ablate_units(m, {"layer2.0": [3, 7]}): m(x)`.

    units maps module names to unit indices or a bool mask over the layer's units. The layer output is
    multiplied by a 0/1 mask along its unit dimension (dim 1 of [N, C, H, W] and [N, F]; last dim of
    [N, T, D]), so the next layer sees 0 in those channels; mode="mean" puts the unit's dataset mean
    (means[layer], Tensor [units]) there instead. Hooks are removed on exit and on error.
    """
    check_mode(mode, means, units)
    cache: dict[tuple, tuple[Tensor, Tensor | None, Tensor | None]] = {}

    def edit(name: str, t: Tensor) -> Tensor:
        key = (name, t.shape[unit_dim(t)], t.dtype, t.device)
        if key not in cache:
            cache[key] = _layer_ablation(name, units[name], t, mode, means)
        return apply_ablation(t, *cache[key])

    with TraceDict(model, list(units), retain=None, edit=edit):
        yield


# ------------------------------------------------------------------------------------------------
# grids, orders and seeded random draws
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A grid of ablation sizes: unit counts (kind 'count') or fractions of the block width (kind 'fraction')."""

    kind: str
    values: tuple[float, ...]

    def counts(self, num_units: int, stage: str = "") -> list[int]:
        """Unit counts per block for blocks of num_units units (0 always included; fractions rounded half up, deduplicated)."""
        where = f" in stage {stage!r}" if stage else ""
        if self.kind == "count":
            ns = [int(v) for v in self.values]
            if ns and ns[-1] > num_units:
                raise CsnError(f"n={ns[-1]} is larger than the {num_units} units available per block{where}; "
                               f"use counts up to {num_units} or a fraction grid such as 'f:0,0.25,0.5,1'.")
        else:
            ns = []
            for f in self.values:
                n = math.floor(f * num_units + 0.5)
                if n not in ns:
                    ns.append(n)
        if not ns or ns[0] != 0:
            ns = [0] + ns
        return ns


def _grid_values(spec: Any) -> tuple[str, list[float]]:
    """(kind, values) of a grid given as text ('f:0,0.5,1', '0,1,2') or a list (ints = counts, floats = fractions)."""
    if isinstance(spec, str):
        s = spec.strip()
        kind = "count"
        if s.lower().startswith("f:"):
            kind, s = "fraction", s[2:]
        toks = [t.strip() for t in s.split(",") if t.strip()]
        try:
            return kind, [float(t) if kind == "fraction" else int(t) for t in toks]
        except ValueError:
            raise CsnError(f"bad grid {spec!r}; give unit counts such as '0,1,2,4,8' or fractions of the block width "
                           "such as 'f:0,0.1,0.5,1'.") from None
    vals = list(spec)
    kind = "fraction" if any(isinstance(v, float) for v in vals) else "count"
    if kind == "count" and not all(isinstance(v, (int, np.integer)) for v in vals):
        raise CsnError(f"bad grid {spec!r}; pass integer unit counts or float fractions.")
    return kind, vals


def parse_grid(spec: Any = None) -> Grid:
    """Grid from None (default fractions), 'f:0,0.1,0.5,1' (fractions), '0,1,2,4' (counts), or a list
    (ints = counts, floats = fractions). Values must be strictly increasing and non-negative."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "default")):
        return Grid("fraction", tuple(DEFAULT_FRACTIONS))
    if isinstance(spec, Grid):
        return spec
    kind, vals = _grid_values(spec)
    if not vals:
        raise CsnError(f"grid {spec!r} is empty; give unit counts such as '0,1,2,4' or fractions such as 'f:0,0.5,1'.")
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise CsnError(f"grid {spec!r} has a negative or non-finite value; counts and fractions must be >= 0.")
    if kind == "fraction" and max(vals) > 1:
        raise CsnError(f"fraction grid {spec!r} has a value above 1; fractions of the block width lie in [0, 1].")
    if any(b <= a for a, b in itertools.pairwise(vals)):
        raise CsnError(f"grid {spec!r} is not increasing; list each n once, in increasing order (e.g. '0,1,2,4').")
    return Grid(kind, tuple(float(v) if kind == "fraction" else int(v) for v in vals))


def check_orders(orders: Sequence[str] | str, draws: int) -> tuple[str, ...]:
    """Validate order names (comma-separated string or sequence) and the number of random draws."""
    if isinstance(orders, str):
        orders = [o.strip() for o in orders.split(",") if o.strip()]
    orders = tuple(orders)
    if not orders:
        raise CsnError(f"no ablation order given; choose from {', '.join(ORDERS)}.")
    for o in orders:
        if o not in ORDERS:
            raise unknown("order", o, ORDERS)
    if len(set(orders)) != len(orders):
        raise CsnError(f"order list {','.join(orders)} repeats a name; list each order once.")
    if not isinstance(draws, (int, np.integer)) or isinstance(draws, bool) or draws < 1:
        raise CsnError(f"draws must be an integer >= 1 (random draws per point), got {draws!r}.")
    return orders


def rank_units(csi: Tensor | np.ndarray, order: str) -> np.ndarray:
    """Unit indices in ablation order: selective = CSI descending, least = ascending; ties by unit index."""
    v = np.asarray(torch.as_tensor(csi).detach().cpu().double().numpy(), dtype=np.float64)
    idx = np.arange(v.shape[0])
    if order == "selective":
        return np.lexsort((idx, -v))
    if order == "least":
        return np.lexsort((idx, v))
    raise unknown("order", order, ("selective", "least"))


def random_seed(seed: int, step: int, stage: str, layer: str, n: int, draw: int) -> int:
    """63-bit seed of one random draw: blake2b of 'csn-ablation|seed|step|stage|layer|n|draw'.

    Derived from the values only (not Python's per-process salted hash), so the same draw comes back in
    any process, on any machine; each block (layer) of a stage gets its own draw.
    """
    key = f"csn-ablation|{int(seed)}|{int(step)}|{stage}|{layer}|{int(n)}|{int(draw)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def random_units(num_units: int, n: int, *, seed: int, step: int, stage: str, layer: str, draw: int) -> np.ndarray:
    """The n units of draw `draw`: the first n of a torch.randperm seeded by `random_seed(...)`."""
    g = torch.Generator().manual_seed(random_seed(seed, step, stage, layer, n, draw))
    return torch.randperm(num_units, generator=g)[:n].numpy()


__all__ = [
    "DEFAULT_FRACTIONS",
    "MODES",
    "ORDERS",
    "Grid",
    "ablate_units",
    "apply_ablation",
    "check_mode",
    "check_orders",
    "parse_grid",
    "random_seed",
    "random_units",
    "rank_units",
    "units_mask",
]
