"""Unit ablation (SPEC "Ablation (C2)"): silence chosen units at read points and sweep how accuracy falls.

Three layers, each usable on its own:

* `ablate_units(model, {layer: units})` - a context manager that zeroes (or replaces by their dataset
  mean) the chosen channels/features of any model's layers; hooks are removed on exit and on error.
* `ablation_sweep(model, loader, stage_layers, csi, ...)` - the study's protocol for one checkpoint: per
  stage, rank each block's units by CSI and ablate the top-n units of every block of the stage at once,
  for n on a grid and for the orders `selective` (most selective first), `least` and `random` (seeded
  draws). Scores top-1, top-5 and mean cross-entropy over the whole split.
* `ablate_run(run, ...)` - the sweep over a run's checkpoints into tables/ablation.parquet (resumable).

Why the sweep is fast: ablating units inside a stage never changes what comes before that stage. For a
`CsnModel` the stage input `h = model.forward_until(segment, x)` is computed once per batch and reused
for every (order, n, draw) point; M masks share one forward of the suffix by repeating h M times along
the batch dimension ([M*B, ...]) with a per-sample mask applied in the hooks. In eval mode every layer
of these models (BatchNorm included) acts on each sample independently, so this is exact: the counts
of correct predictions equal those of the naive protocol (`naive=True`: one full forward pass per
point, through `ablate_units`), which stays available as the reference. M is capped by an element
budget (`max_elements` for the largest per-sample activation times M*B) and `max_batch_masks`, and
halved automatically when a forward runs out of memory. Models without `forward_until` run the whole
model per chunk of masks (no prefix reuse) but still batch masks.

Exactness was verified on CPU (bitwise-equal logits in the tests and the benchmark). On GPUs, cuDNN may
pick batch-size-dependent kernels, so losses then agree to float rounding and a prediction sitting
on a near-tie can in principle flip.

In both paths, points whose masks are identical (n = 0, and n = all units, where every order picks the
same set) are evaluated once and reported under every order and draw.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csn import units as _units
from csn.errors import CsnError, closest, unknown
from csn.models.base import CsnModel
from csn.selectivity import _split_batch, _to, check_labels, model_device

ORDERS = ("selective", "random", "least")
"""Unit orders: most selective first, a seeded random set, least selective first."""
MODES = ("zero", "mean")
"""Ablation modes: set the unit to 0 (the study's), or to its dataset mean (a variant)."""
DISTRIBUTE = ("split", "checkpoints")
"""Under torchrun: every rank scores its shard of each checkpoint's split (counts summed), or each
rank takes whole checkpoints (rank r gets the r-th of every `world size` checkpoints still to do)."""
DEFAULT_FRACTIONS = (0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 5 / 8, 3 / 4, 1.0)
"""Default grid: fractions of the block width, dense at the start, rounded to unique unit counts."""
DEFAULT_MAX_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 27}
"""Default cap on M*B*(largest per-sample activation of the suffix) in one batched forward, per device type.

On CPU a larger batch buys nothing once it outgrows the caches (measured on a ResNet-20: 4-16x the
elements made a sweep 20-80% slower), so masks are batched only while the largest activation stays
around 4 MiB (small loader batches); on accelerators up to 2^27 elements (512 MiB in float32)."""


def default_max_elements(device: torch.device | str) -> int:
    """DEFAULT_MAX_ELEMENTS for a device."""
    return DEFAULT_MAX_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "other"]

SWEEP_COLUMNS = ["step", "stage", "order", "n", "fraction", "draw", "top1", "top5", "loss", "correct", "total"]
ABLATION_COLUMNS = ["step", "epoch", "stage", "order", "n", "fraction", "draw", "top1", "top5", "loss", "correct",
                    "total", "rank_split", "score_split", "bn_recalibrated", "mode", "seed"]
"""tables/ablation.parquet: one row per (checkpoint, stage, order, n, draw). `correct` counts top-1 hits.
`mode` and `seed` extend DESIGN.md's schema so rows computed under other settings are never mixed up."""


# ------------------------------------------------------------------------------------------------
# masks and the ablation context manager
# ------------------------------------------------------------------------------------------------

def _first_tensor(out: Any) -> Tensor:
    """The tensor a module returned (first element of a tuple/list output)."""
    t = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(t, Tensor):
        raise CsnError(f"a read point returned {type(t).__name__}, not a tensor; choose a module that outputs a tensor.")
    return t


def _replace_first(out: Any, t: Tensor) -> Any:
    """The module output with its tensor replaced by t (keeps tuple/list structure)."""
    if isinstance(out, (tuple, list)):
        return type(out)([t, *out[1:]])
    return t


def unit_dim(t: Tensor) -> int:
    """Dimension that indexes units: 1 for [N, C, H, W] and [N, F]; the last one for [N, T, D] token outputs."""
    if t.dim() in (2, 4):
        return 1
    if t.dim() == 3:
        return 2
    raise CsnError(f"cannot ablate units of an output of shape {tuple(t.shape)}; choose a layer with 2-D, 3-D or 4-D output.")


def _bcast(mask: Tensor, t: Tensor) -> Tensor:
    """View a [rows, U] mask so it broadcasts against t along its unit dimension (rows = 1 or t's batch)."""
    rows, u = mask.shape
    if t.dim() == 4:
        return mask.view(rows, u, 1, 1)
    if t.dim() == 3:
        return mask.view(rows, 1, u)
    return mask


def _apply(t: Tensor, ablate: Tensor, keep: Tensor | None, mean: Tensor | None) -> Tensor:
    """Ablated copy of t: zero mode multiplies by `keep` (1/0), mean mode puts `mean` where `ablate` is True."""
    if mean is None:
        return t * _bcast(keep.to(t.dtype), t)
    return torch.where(_bcast(ablate, t), _bcast(mean.to(t.dtype).view(1, -1), t), t)


def units_mask(layer: str, selection: Any, num_units: int) -> Tensor:
    """Bool [num_units] mask (True = ablate) from unit indices or a bool mask of that length."""
    sel = selection
    if isinstance(sel, np.ndarray):
        sel = torch.from_numpy(sel)
    if isinstance(sel, Tensor) and sel.dtype == torch.bool:
        if sel.shape != (num_units,):
            raise CsnError(f"the ablation mask for layer {layer!r} has shape {tuple(sel.shape)} but the layer has {num_units} units; pass one bool per unit.")
        return sel.detach().cpu().clone()
    idx = torch.as_tensor(list(sel) if not isinstance(sel, Tensor) else sel, dtype=torch.long).flatten()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_units):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise CsnError(f"unit index {bad} is out of range for layer {layer!r}, which has {num_units} units (0..{num_units - 1}).")
    mask = torch.zeros(num_units, dtype=torch.bool)
    mask[idx] = True
    return mask


def _check_mode(mode: str, means: Mapping[str, Any] | None, layers: Iterable[str]) -> None:
    if mode not in MODES:
        raise unknown("ablation mode", mode, MODES)
    if mode == "mean":
        missing = [name for name in layers if means is None or name not in means]
        if missing:
            raise CsnError(f"mode='mean' needs each unit's dataset mean, but none was given for layer {missing[0]!r}; pass means={{layer: Tensor[units]}}.")


@contextmanager
def ablate_units(model: nn.Module, units: Mapping[str, Any], mode: str = "zero",
                 means: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Ablate chosen units of any model while the context is open: `with ablate_units(m, {"layer2.0": [3, 7]}): m(x)`.

    units maps module names to unit indices or a bool mask over the layer's units. The layer output is
    multiplied by a 0/1 mask along its unit dimension (dim 1 of [N, C, H, W] and [N, F]; last dim of
    [N, T, D]), so the next layer sees 0 in those channels; mode="mean" puts the unit's dataset mean
    (means[layer], Tensor [units]) there instead. Hooks are removed on exit and on error.
    """
    _check_mode(mode, means, units)
    names = list(units)

    def make(name: str):
        cache: dict[tuple, tuple[Tensor, Tensor | None, Tensor | None]] = {}

        def fn(_m: nn.Module, _inp: tuple, out: Any) -> Any:
            t = _first_tensor(out)
            u = t.shape[unit_dim(t)]
            key = (u, t.dtype, t.device)
            if key not in cache:
                abl = units_mask(name, units[name], u).to(t.device).view(1, u)
                keep = (~abl).to(t.dtype) if mode == "zero" else None
                mean = None
                if mode == "mean":
                    mean = torch.as_tensor(means[name]).detach().to(device=t.device, dtype=t.dtype).flatten()  # type: ignore[index]
                    if mean.numel() != u:
                        raise CsnError(f"means for layer {name!r} have {mean.numel()} values but the layer has {u} units; pass one mean per unit.")
                cache[key] = (abl, keep, mean)
            abl, keep, mean = cache[key]
            return _replace_first(out, _apply(t, abl, keep, mean))
        return fn

    with _units.hooks(model, {name: make(name) for name in names}):
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
                n = int(math.floor(f * num_units + 0.5))
                if n not in ns:
                    ns.append(n)
        if not ns or ns[0] != 0:
            ns = [0] + ns
        return ns


def parse_grid(spec: Any = None) -> Grid:
    """Grid from None (default fractions), 'f:0,0.1,0.5,1' (fractions), '0,1,2,4' (counts), or a list
    (ints = counts, floats = fractions). Values must be strictly increasing and non-negative."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "default")):
        return Grid("fraction", tuple(DEFAULT_FRACTIONS))
    if isinstance(spec, Grid):
        return spec
    if isinstance(spec, str):
        s = spec.strip()
        kind = "count"
        if s.lower().startswith("f:"):
            kind, s = "fraction", s[2:]
        toks = [t.strip() for t in s.split(",") if t.strip()]
        try:
            vals = [float(t) if kind == "fraction" else int(t) for t in toks]
        except ValueError:
            raise CsnError(f"bad grid {spec!r}; give unit counts such as '0,1,2,4,8' or fractions of the block width such as 'f:0,0.1,0.5,1'.") from None
    else:
        vals = list(spec)
        kind = "fraction" if any(isinstance(v, float) for v in vals) else "count"
        if kind == "count" and not all(isinstance(v, (int, np.integer)) for v in vals):
            raise CsnError(f"bad grid {spec!r}; pass integer unit counts or float fractions.")
    if not vals:
        raise CsnError(f"grid {spec!r} is empty; give unit counts such as '0,1,2,4' or fractions such as 'f:0,0.5,1'.")
    if any(not math.isfinite(v) or v < 0 for v in vals):
        raise CsnError(f"grid {spec!r} has a negative or non-finite value; counts and fractions must be >= 0.")
    if kind == "fraction" and max(vals) > 1:
        raise CsnError(f"fraction grid {spec!r} has a value above 1; fractions of the block width lie in [0, 1].")
    if any(b <= a for a, b in zip(vals, vals[1:])):
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


# ------------------------------------------------------------------------------------------------
# probing a model: units per layer, segment of each layer, largest activation per sample
# ------------------------------------------------------------------------------------------------

@dataclass
class _Probe:
    units: dict[str, int]             # layer -> number of units
    segment: dict[str, str | None]    # layer -> CsnModel segment it runs in (None: not a CsnModel)
    seg_order: list[str]              # segment names in forward order
    seg_max: dict[str | None, int]    # segment -> largest per-sample output numel of any module in it


def _probe(model: nn.Module, x1: Any, layers: Sequence[str]) -> _Probe:
    """One forward of a single example (eval mode, no grad) recording where and how wide each layer is."""
    cur: list[str | None] = [None]
    units: dict[str, int] = {}
    segment: dict[str, str | None] = {}
    seg_max: dict[str | None, int] = {}
    wanted = set(layers)

    def make(name: str):
        def fn(_m: nn.Module, _inp: tuple, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) and out else out
            if not isinstance(t, Tensor):
                return
            if t.dim() > 0:
                seg_max[cur[0]] = max(seg_max.get(cur[0], 0), t[0].numel() if t.shape[0] else 0)
            if name in wanted and name not in units:
                t = _first_tensor(out)
                units[name] = int(t.shape[unit_dim(t)])
                segment[name] = cur[0]
        return fn

    names = [n for n, _ in model.named_modules() if n]
    missing = [layer for layer in layers if layer not in set(names)]
    if missing:
        _units.resolve_layers(model, [missing[0]])  # raises the standard unknown-layer error
    seg_order: list[str] = []
    with torch.no_grad(), _units.hooks(model, {n: make(n) for n in names}):
        if isinstance(model, CsnModel):
            h = x1
            for seg, fn in model.segments():
                cur[0] = seg
                seg_order.append(seg)
                h = fn(h)
        else:
            model(x1)
    for layer in layers:
        if layer not in units:
            raise CsnError(f"layer {layer!r} did not run in the model's forward pass; choose a layer the forward uses.")
    return _Probe(units, segment, seg_order, seg_max)


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------

@dataclass
class _StagePlan:
    stage: str
    layers: list[str]
    width: int                                   # units per block (narrowest block)
    counts: list[int]
    points: list[tuple[str, int, int, int]]      # (order, n, draw, distinct-mask index)
    masks: list[dict[str, Tensor]]               # distinct masks: layer -> bool [U] (True = ablate)
    segment: str | None                          # fast path: run from this segment (None: whole model)
    per_sample: int                              # largest per-sample activation numel of the suffix
    cap: int = 1 << 30                           # current masks-per-forward cap (halved on OOM)
    used: int = 0                                # most masks that shared one forward pass


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _score(logits: Tensor, y: Tensor, m: int, top5: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-mask (correct top-1 [m], correct top-5 [m] or None, summed loss [m] float64) for logits [m*B, K]."""
    logits = logits.float()
    b = y.shape[0]
    yr = y.repeat(m) if m > 1 else y
    loss = F.cross_entropy(logits, yr, reduction="none").double().view(m, b).sum(1)
    c1 = (logits.argmax(1) == yr).view(m, b).sum(1)
    c5 = (logits.topk(5, dim=1).indices == yr[:, None]).any(1).view(m, b).sum(1) if top5 else None
    return c1, c5, loss


def _stage_plans(model: nn.Module, probe: _Probe, stage_layers: Mapping[str, Sequence[str]],
                 csi: Mapping[str, Any], grid: Grid, orders: tuple[str, ...], draws: int, seed: int, step: int,
                 naive: bool) -> list[_StagePlan]:
    plans = []
    for stage, layers in stage_layers.items():
        layers = list(layers)
        if not layers:
            raise CsnError(f"stage {stage!r} has no layers; give it at least one module name.")
        widths = {layer: probe.units[layer] for layer in layers}
        width = min(widths.values())
        counts = grid.counts(width, stage)
        ranks: dict[tuple[str, str], np.ndarray] = {}
        for layer in layers:
            if any(o in ("selective", "least") for o in orders):
                if layer not in csi:
                    raise CsnError(f"no CSI given for layer {layer!r} of stage {stage!r}; compute selectivity for it first (csn selectivity) or pass csi[{layer!r}].")
                v = torch.as_tensor(csi[layer]).detach().flatten()
                if v.numel() != widths[layer]:
                    raise CsnError(f"CSI for layer {layer!r} has {v.numel()} values but the layer has {widths[layer]} units; recompute selectivity for this checkpoint.")
                if not torch.isfinite(v.double()).all():
                    raise CsnError(f"CSI for layer {layer!r} has NaN or infinite values; recompute selectivity (is the checkpoint diverged?).")
                for o in orders:
                    if o != "random":
                        ranks[(layer, o)] = rank_units(v, o)
        masks: list[dict[str, Tensor]] = []
        index: dict[tuple, int] = {}
        points = []
        for order in orders:
            for n in counts:
                for draw in range(draws if order == "random" else 1):
                    m = {}
                    for layer in layers:
                        u = widths[layer]
                        if order == "random":
                            sel = random_units(u, n, seed=seed, step=step, stage=stage, layer=layer, draw=draw)
                        else:
                            sel = ranks[(layer, order)][:n]
                        m[layer] = units_mask(layer, sel, u)
                    key = tuple(m[layer].numpy().tobytes() for layer in layers)
                    if key not in index:
                        index[key] = len(masks)
                        masks.append(m)
                    points.append((order, n, draw, index[key]))
        segment = None
        if isinstance(model, CsnModel) and not naive:
            segs = [probe.segment[layer] for layer in layers]
            segment = min(segs, key=probe.seg_order.index)
        if segment is not None:
            suffix = probe.seg_order[probe.seg_order.index(segment):]
            per_sample = max([probe.seg_max.get(s, 0) for s in suffix] + [1])
        else:
            per_sample = max(list(probe.seg_max.values()) + [1])
        plans.append(_StagePlan(stage, layers, width, counts, points, masks, segment, per_sample))
    return plans


@contextmanager
def _per_sample_hooks(model: nn.Module, layers: Sequence[str], state: dict[str, tuple]) -> Iterator[None]:
    """Hooks that apply state[layer] = (ablate [M*B, U], keep [M*B, U] | None, mean [U] | None) per sample."""
    def make(name: str):
        def fn(_m: nn.Module, _inp: tuple, out: Any) -> Any:
            entry = state.get(name)
            if entry is None:
                return None
            abl, keep, mean = entry
            t = _first_tensor(out)
            if t.shape[0] != abl.shape[0]:
                raise CsnError(f"layer {name!r} returned {t.shape[0]} rows for a batch of {abl.shape[0]}; "
                               "batched ablation needs layers whose first dimension is the batch (use naive=True).")
            return _replace_first(out, _apply(t, abl, keep, mean))
        return fn

    with _units.hooks(model, {name: make(name) for name in layers}):
        yield


def _progress_enabled(progress: bool) -> bool:
    return bool(progress) and not os.environ.get("CSN_NO_PROGRESS")


def _new_bar(total: float, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not _progress_enabled(progress), unit="point",
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} points [{elapsed}<{remaining}]")


def ablation_sweep(
    model: nn.Module,
    loader: Iterable[Any],
    stage_layers: Mapping[str, Sequence[str]],
    csi: Mapping[str, Any],
    *,
    grid: Any = None,
    orders: Sequence[str] | str = ORDERS,
    draws: int = 3,
    seed: int = 0,
    naive: bool = False,
    num_classes: int,
    max_batch_masks: int | None = None,
    max_elements: int | None = None,
    mode: str = "zero",
    means: Mapping[str, Any] | None = None,
    step: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    bar: Any = None,
) -> pd.DataFrame:
    """Ablation curves of one model: a row per (stage, order, n, draw) with top1, top5, loss, correct, total.

    stage_layers: {stage: [block module names]}; all blocks of a stage are ablated at once, n units each.
    csi: {layer: Tensor[units]} ranking the units (needed for 'selective'/'least'). grid: see parse_grid
    (counts or fractions of the narrowest block's width; n = 0 always included; `fraction` = n / width).
    Random draws are seeded per (seed, step, stage, block, n, draw) (`random_seed`). top5 is NaN when
    num_classes <= 5; loss is the mean cross-entropy. naive=True runs the full model once per distinct
    mask (the reference); otherwise the fast path described in the module docstring, with at most
    max_batch_masks masks per forward and M*B*(largest per-sample activation) <= max_elements (None:
    default_max_elements(device)). `bar`: an external tqdm to advance by one per point (ablate_run's
    bar over the whole sweep). df.attrs records masks_per_pass and distinct_masks per stage.
    """
    orders = check_orders(orders, draws)
    g = parse_grid(grid)
    if not isinstance(num_classes, int) or num_classes < 2:
        raise CsnError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    if max_batch_masks is not None and max_batch_masks < 1:
        raise CsnError(f"max_batch_masks must be >= 1, got {max_batch_masks}.")
    if not stage_layers:
        raise CsnError("no stage to ablate; pass {stage: [layer names]} with at least one stage.")
    all_layers = [layer for layers in stage_layers.values() for layer in layers]
    _check_mode(mode, means, all_layers)
    dev = torch.device(device) if device is not None else model_device(model)
    if max_elements is None:
        max_elements = default_max_elements(dev)
    top5 = num_classes > 5
    modes = {m: m.training for m in model.modules()}
    own_bar = None
    try:
        model.eval()
        if iter(loader) is loader:  # type: ignore[call-overload]
            raise CsnError("the sweep reads the data several times; pass a re-iterable loader (a list of batches or a "
                           "DataLoader), not a one-shot iterator or generator.")
        first = None
        for batch in loader:
            first = batch
            break
        if first is None:
            raise CsnError("the evaluation data yielded no examples; pass a non-empty loader of (inputs, labels) batches.")
        x0, _ = _split_batch(first)
        x0 = _to(x0, dev)
        probe = _probe(model, x0[:1] if isinstance(x0, Tensor) else x0, all_layers)
        plans = _stage_plans(model, probe, stage_layers, csi, g, orders, draws, seed, step, naive)
        mean_t = {}
        if mode == "mean":
            for layer in all_layers:
                mean_t[layer] = torch.as_tensor(means[layer]).detach().to(dev).flatten()  # type: ignore[index]
                if mean_t[layer].numel() != probe.units[layer]:
                    raise CsnError(f"means for layer {layer!r} have {mean_t[layer].numel()} values but the layer has {probe.units[layer]} units; pass one mean per unit.")
        if bar is None:
            own_bar = bar = _new_bar(sum(len(p.points) for p in plans), "ablation", progress)
        stats = {p.stage: (np.zeros(len(p.masks), np.int64), np.zeros(len(p.masks), np.int64),
                           np.zeros(len(p.masks), np.float64)) for p in plans}
        total = 0
        n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        with torch.no_grad():
            if naive:
                total = _naive(model, loader, plans, stats, mode, mean_t, num_classes, dev, top5, bar)
            else:
                total = _fast(model, loader, plans, stats, mode, mean_t, num_classes, dev, top5, bar, n_batches,
                              max_batch_masks, max_elements)
        if total == 0:
            raise CsnError("the evaluation data yielded no examples; pass a non-empty loader of (inputs, labels) batches.")
        rows = []
        for p in plans:
            c1, c5, ls = stats[p.stage]
            for order, n, draw, d in p.points:
                rows.append({"step": int(step), "stage": p.stage, "order": order, "n": int(n),
                             "fraction": n / p.width, "draw": int(draw), "top1": c1[d] / total,
                             "top5": c5[d] / total if top5 else float("nan"), "loss": ls[d] / total,
                             "correct": int(c1[d]), "total": int(total)})
        df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
        df = df.astype({"step": "int64", "n": "int64", "draw": "int64", "correct": "int64", "total": "int64",
                          "fraction": "float64", "top1": "float64", "top5": "float64", "loss": "float64"})
        df.attrs["masks_per_pass"] = {p.stage: (1 if naive else p.used) for p in plans}
        df.attrs["distinct_masks"] = {p.stage: len(p.masks) for p in plans}
        return df
    finally:
        for m, flag in modes.items():
            m.training = flag
        if own_bar is not None:
            own_bar.close()


def _batches(loader: Iterable[Any], num_classes: int, dev: torch.device) -> Iterator[tuple[Any, Tensor]]:
    for batch in loader:
        x, y = _split_batch(batch)
        y = check_labels(y, num_classes).to(dev)
        yield _to(x, dev), y


def _naive(model, loader, plans, stats, mode, mean_t, num_classes, dev, top5, bar) -> int:
    """The reference: one full forward pass over the split per distinct mask, through ablate_units."""
    total = 0
    for p in plans:
        reps = np.bincount([d for *_, d in p.points], minlength=len(p.masks))
        c1, c5, ls = stats[p.stage]
        for d, masks in enumerate(p.masks):
            total = 0
            with ablate_units(model, masks, mode, mean_t if mode == "mean" else None):
                for x, y in _batches(loader, num_classes, dev):
                    a, b, c = _score(model(x), y, 1, top5)
                    c1[d] += int(a[0])
                    if b is not None:
                        c5[d] += int(b[0])
                    ls[d] += float(c[0])
                    total += int(y.shape[0])
            bar.update(int(reps[d]))
    return total


def _fast(model, loader, plans, stats, mode, mean_t, num_classes, dev, top5, bar, n_batches,
          max_batch_masks, max_elements) -> int:
    """Stage input once per batch, then chunks of M masks per forward of the suffix ([M*B, ...])."""
    total = 0
    reps = {p.stage: np.bincount([d for *_, d in p.points], minlength=len(p.masks)) for p in plans}
    state: dict[str, tuple] = {}
    all_layers = [layer for p in plans for layer in p.layers]
    cache: dict[tuple, dict[str, tuple]] = {}
    with _per_sample_hooks(model, all_layers, state):
        for x, y in _batches(loader, num_classes, dev):
            b = int(y.shape[0])
            total += b
            for p in plans:
                c1, c5, ls = stats[p.stage]
                state.clear()
                if p.segment is not None:
                    h = model.forward_until(p.segment, x)
                    run = lambda inp, seg=p.segment: model.forward_from(seg, inp)  # noqa: E731
                else:
                    h = x
                    run = model
                batchable = isinstance(h, Tensor)
                cap = min(p.cap, max_batch_masks or p.cap, max(1, int(max_elements) // max(1, b * p.per_sample)))
                if not batchable:
                    cap = 1
                i = 0
                while i < len(p.masks):
                    m = min(cap, len(p.masks) - i)
                    key = (p.stage, i, m, b)
                    if key not in cache:
                        entry = {}
                        for layer in p.layers:
                            abl = torch.stack([p.masks[d][layer] for d in range(i, i + m)]).to(dev)
                            abl = abl.repeat_interleave(b, dim=0)
                            keep = (~abl).to(h.dtype if batchable and h.is_floating_point() else torch.float32) if mode == "zero" else None
                            entry[layer] = (abl, keep, mean_t.get(layer))
                        cache[key] = entry
                    state.clear()
                    state.update(cache[key])
                    try:
                        inp = torch.cat([h] * m) if batchable else h
                        logits = run(inp)
                        del inp
                    except Exception as e:  # noqa: BLE001 - only memory errors are handled
                        if not _is_oom(e) or m == 1:
                            raise
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        cap = p.cap = max(1, m // 2)
                        continue
                    state.clear()
                    p.used = max(p.used, m)
                    a, bb, c = _score(logits, y, m, top5)
                    del logits
                    c1[i:i + m] += a.cpu().numpy()
                    if bb is not None:
                        c5[i:i + m] += bb.cpu().numpy()
                    ls[i:i + m] += c.cpu().numpy()
                    if n_batches:
                        bar.update(float(reps[p.stage][i:i + m].sum()) / n_batches)
                    i += m
    if n_batches is None:
        bar.update(sum(len(p.points) for p in plans))
    return total


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

@dataclass
class AblationSummary:
    """curves: the rows plus top1_norm/top5_norm (accuracy / unablated accuracy); areas: trapezoid area
    under top1_norm vs fraction per (step, stage, order, draw); gaps: per (step, stage) the
    selective-minus-random area (negative = ablating selective units hurts more) with its spread over draws."""

    curves: pd.DataFrame
    areas: pd.DataFrame
    gaps: pd.DataFrame


_KEY_CANDIDATES = ("run", "step", "epoch", "stage", "mode", "rank_split", "score_split", "bn_recalibrated", "seed")


def summarize_ablation(df: pd.DataFrame) -> AblationSummary:
    """Normalized curves, areas under them (numpy.trapezoid over fraction ablated) and selective-vs-random gaps."""
    need = {"step", "stage", "order", "n", "fraction", "draw", "top1"}
    if not need <= set(df.columns):
        raise CsnError(f"ablation table lacks columns {sorted(need - set(df.columns))}; pass a table written by ablation_sweep or ablate_run.")
    keys = [c for c in _KEY_CANDIDATES if c in df.columns]
    curves = df.copy()
    base = curves[curves["n"] == 0].groupby(keys, dropna=False)[["top1"] + (["top5"] if "top5" in df else [])].mean()
    if base.empty and not curves.empty:
        raise CsnError("the ablation table has no n=0 (unablated) rows to normalize by; include 0 in the grid.")
    base = base.rename(columns={"top1": "_b1", "top5": "_b5"}).reset_index()
    curves = curves.merge(base, on=keys, how="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        curves["top1_norm"] = curves["top1"] / curves["_b1"].where(curves["_b1"] > 0)
        if "top5" in curves:
            curves["top5_norm"] = curves["top5"] / curves["_b5"].where(curves["_b5"] > 0)
    curves = curves.drop(columns=[c for c in ("_b1", "_b5") if c in curves])
    area_rows = []
    for k, g in curves.groupby(keys + ["order", "draw"], dropna=False, sort=True):
        g = g.sort_values("fraction")
        f = g["fraction"].to_numpy(float)
        area = float(np.trapezoid(g["top1_norm"].to_numpy(float), f)) if len(g) > 1 else 0.0
        row = dict(zip(keys + ["order", "draw"], k))
        row.update(area=area, max_fraction=float(f.max()), points=len(g))
        area_rows.append(row)
    areas = pd.DataFrame(area_rows, columns=keys + ["order", "draw", "area", "max_fraction", "points"])
    gap_rows = []
    for k, g in areas.groupby(keys, dropna=False, sort=True):
        sel = g.loc[g["order"] == "selective", "area"]
        rnd = g.loc[g["order"] == "random", "area"].to_numpy(float)
        lst = g.loc[g["order"] == "least", "area"]
        s = float(sel.iloc[0]) if len(sel) else float("nan")
        r_mean = float(rnd.mean()) if len(rnd) else float("nan")
        r_std = float(rnd.std(ddof=1)) if len(rnd) > 1 else float("nan")
        row = dict(zip(keys, k if isinstance(k, tuple) else (k,)))
        row.update(selective_area=s, random_area=r_mean, random_area_std=r_std,
                   least_area=float(lst.iloc[0]) if len(lst) else float("nan"),
                   gap=s - r_mean, gap_std=r_std, gap_se=r_std / math.sqrt(len(rnd)) if len(rnd) > 1 else float("nan"),
                   draws=len(rnd))
        gap_rows.append(row)
    gaps = pd.DataFrame(gap_rows, columns=keys + ["selective_area", "random_area", "random_area_std", "least_area",
                                                 "gap", "gap_std", "gap_se", "draws"])
    return AblationSummary(curves, areas, gaps)


# ------------------------------------------------------------------------------------------------
# a run's checkpoints -> tables/ablation.parquet
# ------------------------------------------------------------------------------------------------

def resolve_stages(model: nn.Module, stages: Sequence[str] | str | None = None) -> dict[str, list[str]]:
    """{stage: [layers]} from stage names of the model (default: all) or layer patterns ('layer2.*', 'layer2.1')."""
    try:
        declared = _units.stages(model)
    except CsnError:
        declared = {}
    if stages is None:
        if not declared:
            _units.stages(model)  # raises the "declares no read points" error
        return {k: list(v) for k, v in declared.items()}
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    if not stages:
        raise CsnError("no stage given; pass stage names such as 'layer1,layer2' or layer patterns such as 'layer2.*'.")
    out: dict[str, list[str]] = {}
    names = [n for n, _ in model.named_modules() if n]
    for s in stages:
        if s in declared:
            out[s] = list(declared[s])
            continue
        try:
            out[s] = _units.resolve_layers(model, [s])
        except CsnError:
            near = closest(s, list(declared) + names, n=5)
            have = ", ".join(declared) if declared else "none declared"
            raise CsnError(f"unknown stage or layer {s!r}; the model's stages are {have}, or pass a layer pattern "
                           f"such as 'layer2.*' (closest names: {', '.join(near)}).") from None
    return out


def _means_and_csi(stats: Mapping[str, Any]) -> tuple[dict, dict]:
    """CSI (csn's definition, via selectivity_frame) and each unit's dataset mean, from class statistics."""
    from csn.selectivity import selectivity_frame

    frame = selectivity_frame(stats)
    csi = {layer: torch.tensor(g.sort_values("unit")["csi"].to_numpy(np.float64)) for layer, g in frame.groupby("layer")}
    means = {layer: (st.sums.sum(0) / st.counts.sum().clamp_min(1)).float().cpu() for layer, st in stats.items()}
    return csi, means


def _selectivity_table(run) -> pd.DataFrame | None:
    """tables/selectivity.parquet when it exists, is readable and has the columns the ranking needs."""
    try:
        table = run.read("selectivity")
    except CsnError:
        return None
    if table is None or table.empty or not {"step", "layer", "unit", "csi", "split", "bn_recalibrated"} <= set(table.columns):
        return None
    return table


def _csi_from_table(table: pd.DataFrame | None, step: int, layers: list[str], widths: dict[str, int], split: str,
                    bn: int) -> dict | None:
    """CSI per layer from the selectivity table when it holds this checkpoint, split and BN statistics; else None."""
    if table is None:
        return None
    t = table[(table["step"] == step) & (table["split"] == split) & (table["bn_recalibrated"] == bn)]
    if "variant" in t.columns:
        t = t[t["variant"] == "mean"]
    out = {}
    for layer in layers:
        g = t[t["layer"] == layer].sort_values("unit")
        if len(g) != widths[layer] or not (g["unit"].to_numpy() == np.arange(widths[layer])).all():
            return None
        out[layer] = torch.tensor(g["csi"].to_numpy(np.float64))
    return out


@dataclass
class AblationPlan:
    """A validated ablation request for one run (built by plan_ablation, carried out by execute_plan)."""

    run: Any
    data: Any
    ckpts: list
    stage_layers: dict[str, list[str]]
    units: dict[str, int]
    counts: dict[str, list[int]]
    bn_plan: dict[int, int]
    num_classes: int
    grid: Grid
    orders: tuple[str, ...]
    draws: int
    rank_split: str
    score_split: str
    bn_recalibrate: int | None
    naive: bool
    device: Any
    progress: bool
    seed: int
    mode: str
    max_batch_masks: int | None
    max_elements: int | None
    score_samples: int | None = None  # score on a fixed seeded subset of the score split (None = all of it)
    distribute: str = "split"  # under torchrun: shard each checkpoint's evaluation, or spread the checkpoints

    @property
    def expected(self) -> set[tuple[str, str, int, int]]:
        """(stage, order, n, draw) keys one checkpoint must hold to count as done."""
        return {(s, o, n, d) for s in self.stage_layers for o in self.orders for n in self.counts[s]
                for d in range(self.draws if o == "random" else 1)}


def plan_ablation(
    run: Any,
    *,
    stages: Sequence[str] | str | None = None,
    orders: Sequence[str] | str = ORDERS,
    draws: int = 3,
    grid: Any = None,
    checkpoints: str | None = None,
    rank_split: str = "test",
    score_split: str = "test",
    bn_recalibrate: int | None = None,
    naive: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    mode: str = "zero",
    max_batch_masks: int | None = None,
    max_elements: int | None = None,
    score_samples: int | None = None,
    distribute: str = "split",
) -> AblationPlan:
    """Validate an ablate_run request against the run (stages, grid vs block widths, orders, draws, splits,
    checkpoints) without computing or writing anything; raises one CsnError naming the problem."""
    from csn.analysis.common import bn_batches_for, bn_loader, eval_loader, split_of
    from csn.bn import has_batchnorm
    from csn.runs import Run

    run = run if isinstance(run, Run) else Run(Path(run))
    orders = check_orders(orders, draws)
    g = parse_grid(grid)
    if mode not in MODES:
        raise unknown("ablation mode", mode, MODES)
    if distribute not in DISTRIBUTE:
        raise unknown("way to distribute the ablation", distribute, DISTRIBUTE)
    for s in (rank_split, score_split):
        if s not in ("train", "test"):
            raise CsnError(f"unknown split {s!r}; use 'train' or 'test'.")
    if bn_recalibrate is not None and (isinstance(bn_recalibrate, bool) or not isinstance(bn_recalibrate, int)
                                       or bn_recalibrate < 0):
        raise CsnError(f"--bn-recalibrate must be an integer >= 0 (0 = off), got {bn_recalibrate!r}.")
    if max_batch_masks is not None and max_batch_masks < 1:
        raise CsnError(f"max_batch_masks must be >= 1, got {max_batch_masks}.")
    if score_samples is not None and score_samples < 1:
        raise CsnError(f"--samples must be a positive number of images, got {score_samples}.")
    ckpts = run.select(checkpoints)
    data = run.dataset()
    split_of(data, score_split)
    num_classes = int(run.info["data"]["num_classes"])
    skeleton = run.build_model().eval()
    stage_layers = resolve_stages(skeleton, stages)
    all_layers = [layer for layers in stage_layers.values() for layer in layers]
    x0, _ = _split_batch(next(iter(eval_loader(run, data, score_split, batch_size=1))))
    probe = _probe(skeleton, x0, all_layers)
    counts = {s: g.counts(min(probe.units[layer] for layer in layers), s) for s, layers in stage_layers.items()}
    has_bn = has_batchnorm(skeleton)
    bn_plan = {c.step: bn_batches_for(c, bn_recalibrate) if has_bn else 0 for c in ckpts}
    if any(bn_plan.values()):  # re-estimation uses at most the batches the training split has
        bl = bn_loader(run, data)
        avail = len(bl) if hasattr(bl, "__len__") else None
        if avail is not None:
            bn_plan = {s: min(n, avail) for s, n in bn_plan.items()}
    return AblationPlan(run, data, ckpts, stage_layers, probe.units, counts, bn_plan, num_classes, g, orders, int(draws),
                        rank_split, score_split, bn_recalibrate, bool(naive), device, bool(progress), int(seed), mode,
                        max_batch_masks, max_elements, score_samples, distribute)


def _checkpoint_done(plan: AblationPlan, existing: pd.DataFrame | None, c) -> bool:
    """True when the table holds every row of checkpoint c for the plan's stages, with the plan's settings."""
    from csn.analysis.common import split_of

    if existing is None or existing.empty or not set(ABLATION_COLUMNS) <= set(existing.columns):
        return False
    e = existing[(existing["step"] == c.step) & existing["stage"].isin(list(plan.stage_layers))]
    if e.empty or (e["bn_recalibrated"] != plan.bn_plan[c.step]).any():
        return False
    settings = {"rank_split": plan.rank_split, "score_split": plan.score_split, "mode": plan.mode, "seed": plan.seed}
    if any((e[k] != v).any() for k, v in settings.items()):
        return False
    n_score = len(split_of(plan.data, plan.score_split))
    if (e["total"] != min(plan.score_samples or n_score, n_score)).any():  # scored on another subset size
        return False
    expected = plan.expected
    have = set(zip(e["stage"], e["order"], e["n"].astype(int), e["draw"].astype(int)))
    return have == expected and len(e) == len(expected)


def _checkpoint_rows(plan: AblationPlan, c, sel_table: pd.DataFrame | None, bar, shared: bool) -> pd.DataFrame:
    """The ablation rows of one checkpoint (table columns). shared=True under torchrun: every rank works on
    this checkpoint, scores its shard of the split, and the counts are summed (every rank gets all rows);
    shared=False: this rank alone does the whole checkpoint (no collective)."""
    from csn.analysis.common import analysis_model, class_stats_of_split, eval_loader
    from csn.distributed import reduce_ablation, same_outcome

    run, data, device = plan.run, plan.data, plan.device
    all_layers = [layer for layers in plan.stage_layers.values() for layer in layers]
    ranked = any(o != "random" for o in plan.orders)
    try:
        am = analysis_model(run, c, data, bn_recalibrate=plan.bn_recalibrate, device=device, shared=shared)
        n_bn = am.bn_recalibrated  # batches actually used, as selectivity records it
        csi, means = None, None
        if plan.mode == "zero" and ranked:
            csi = _csi_from_table(sel_table, c.step, all_layers, plan.units, plan.rank_split, n_bn)
        if (csi is None and ranked) or plan.mode == "mean":
            csi, means = _means_and_csi(class_stats_of_split(run, data, am.model, plan.rank_split, all_layers,
                                                             plan.num_classes, device=device, shard=shared))
        loader = eval_loader(run, data, plan.score_split, device=device, samples=plan.score_samples, shard=shared)
        with same_outcome(enabled=shared):
            rows = ablation_sweep(
                am.model, loader, plan.stage_layers, csi or {}, grid=plan.grid, orders=plan.orders, draws=plan.draws,
                seed=plan.seed, naive=plan.naive, num_classes=plan.num_classes, max_batch_masks=plan.max_batch_masks,
                max_elements=plan.max_elements, mode=plan.mode, means=means, step=c.step, device=device, bar=bar)
        if shared:
            rows = reduce_ablation(rows)
    except CsnError as e:
        raise CsnError(f"run {run.name}, checkpoint step {c.step} (epoch {c.epoch:g}): {e}") from None
    rows.insert(1, "epoch", float(c.epoch))
    rows["rank_split"] = plan.rank_split
    rows["score_split"] = plan.score_split
    rows["bn_recalibrated"] = np.int64(n_bn)
    rows["mode"] = plan.mode
    rows["seed"] = np.int64(plan.seed)
    return rows[ABLATION_COLUMNS]


def execute_plan(plan: AblationPlan) -> pd.DataFrame:
    """Carry out a plan: skip finished checkpoints, compute the rest, one atomic table rewrite per checkpoint.

    Under torchrun rank 0 alone reads and writes the table; with plan.distribute "split" every rank
    scores its shard of each checkpoint, with "checkpoints" the checkpoints still to do are dealt out
    in rounds of one per rank and rank 0 writes each round's rows. Both give the single-process rows.
    """
    from csn import distributed
    from csn.runs import append_rows

    run = plan.run
    ranked = any(o != "random" for o in plan.orders)
    per_ckpt = len(plan.expected)
    table: dict[str, pd.DataFrame | None] = {}  # rank 0's copy of the ablation table

    def prepare() -> tuple[list[int], pd.DataFrame | None]:
        """(steps still to do, the selectivity rows that can rank their units), read on rank 0."""
        table["df"] = existing = run.read("ablation")
        todo = [c.step for c in plan.ckpts if not _checkpoint_done(plan, existing, c)]
        sel = _selectivity_table(run) if todo and ranked and plan.mode == "zero" else None
        if sel is not None:
            sel = sel[sel["step"].isin(todo)][[c for c in ("step", "layer", "unit", "csi", "split", "bn_recalibrated",
                                                            "variant") if c in sel.columns]].reset_index(drop=True)
        return todo, sel

    def write(*frames: pd.DataFrame | None) -> None:
        for rows in frames:
            if rows is not None:
                table["df"] = append_rows(run, "ablation", table["df"], rows, key_cols=["step", "stage"])

    with distributed.main_lock(run.path, "ablation"):
        todo_steps, sel_table = distributed.on_main(prepare)
        todo = [c for c in plan.ckpts if c.step in set(todo_steps)]
        by_checkpoint = plan.distribute == "checkpoints" and distributed.is_dist()
        world, rank = distributed.world_size(), distributed.rank()
        mine = len(todo[rank::world]) if by_checkpoint else len(todo)
        bar = _new_bar(mine * per_ckpt, f"ablation {run.name}", plan.progress and distributed.is_main())
        try:
            if by_checkpoint:
                for i in range(0, len(todo), world):
                    rows = None
                    with distributed.same_outcome():
                        if i + rank < len(todo):
                            rows = _checkpoint_rows(plan, todo[i + rank], sel_table, bar, shared=False)
                    distributed.on_main(write, *distributed.all_gather_objects(rows))
            else:
                for c in todo:
                    distributed.on_main(write, _checkpoint_rows(plan, c, sel_table, bar, shared=True))
        finally:
            bar.close()
    existing = table["df"] if table else run.read("ablation")
    if existing is None or existing.empty:
        return pd.DataFrame(columns=ABLATION_COLUMNS)
    steps = {c.step for c in plan.ckpts}
    out = existing[existing["step"].isin(steps) & existing["stage"].isin(list(plan.stage_layers))]
    return out.sort_values(["step", "stage", "order", "draw", "n"], kind="stable").reset_index(drop=True)


def ablate_run(
    run: Any,
    *,
    stages: Sequence[str] | str | None = None,
    orders: Sequence[str] | str = ORDERS,
    draws: int = 3,
    grid: Any = None,
    checkpoints: str | None = None,
    rank_split: str = "test",
    score_split: str = "test",
    bn_recalibrate: int | None = None,
    naive: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
    seed: int = 0,
    mode: str = "zero",
    max_batch_masks: int | None = None,
    max_elements: int | None = None,
    score_samples: int | None = None,
    distribute: str = "split",
) -> pd.DataFrame:
    """Ablation sweeps over a run's checkpoints into tables/ablation.parquet; returns this call's rows.

    Per checkpoint: the model from analysis_model (BN statistics re-estimated by the same policy as
    selectivity, recorded in bn_recalibrated); the ranking CSI from tables/selectivity.parquet when it
    holds that checkpoint on rank_split with the same BN statistics, else computed here
    (collect_class_stats on rank_split with that same model); then ablation_sweep on score_split (one
    progress bar over checkpoints x stages x points). mode="mean" replaces units by their mean over
    rank_split. Resumable: a checkpoint counts as done only when the table holds all its rows for these
    stages and settings; a checkpoint's rows are written in one atomic rewrite (under run_lock), replacing
    older rows of the same (step, stage). All input is validated before anything is computed or written.
    Under torchrun, distribute="split" shards each checkpoint's evaluation over the ranks and
    "checkpoints" gives each rank whole checkpoints (DISTRIBUTE); the rows equal one process's.
    """
    return execute_plan(plan_ablation(
        run, stages=stages, orders=orders, draws=draws, grid=grid, checkpoints=checkpoints, rank_split=rank_split,
        score_split=score_split, bn_recalibrate=bn_recalibrate, naive=naive, device=device, progress=progress,
        seed=seed, mode=mode, max_batch_masks=max_batch_masks, max_elements=max_elements,
        score_samples=score_samples, distribute=distribute))


__all__ = [
    "ORDERS", "MODES", "DEFAULT_FRACTIONS", "ABLATION_COLUMNS", "ablate_units", "units_mask", "unit_dim", "Grid",
    "parse_grid", "check_orders", "DISTRIBUTE", "rank_units", "random_seed", "random_units", "ablation_sweep", "AblationSummary",
    "summarize_ablation", "resolve_stages", "AblationPlan", "plan_ablation", "execute_plan", "ablate_run",
]
