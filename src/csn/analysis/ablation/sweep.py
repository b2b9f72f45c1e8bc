"""The study's ablation protocol for one model (SPEC "Ablation (C2)"): `ablation_sweep` and its two paths.

Per stage, each block's units are ranked by CSI and the top-n units of every block of the stage are
ablated at once, for n on a grid and for the orders `selective` (most selective first), `least` and
`random` (seeded draws). Scores: top-1, top-5 and mean cross-entropy over the whole loader.

Why the fast path is fast: ablating units inside a stage never changes what comes before that stage.
For a `CsnModel` the stage input `h = model.forward_until(segment, x)` is computed once per batch and
reused for every (order, n, draw) point; M masks share one forward of the suffix by repeating h M times
along the batch dimension ([M*B, ...]) with a per-sample mask applied in the hooks. In eval mode every
layer of these models (BatchNorm included) acts on each sample independently, so this is exact: the
counts of correct predictions equal those of the naive protocol (`naive=True`: one full forward pass
per point, through `ablate_units`), which stays available as the reference. M is capped by an element
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

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from csn.analysis.ablation.masks import (
    ORDERS,
    Grid,
    ablate_units,
    apply_ablation,
    check_mode,
    check_orders,
    parse_grid,
    random_units,
    rank_units,
    units_mask,
)
from csn.core.progress import bar as new_bar
from csn.core.resources import is_oom
from csn.core.stats import check_labels
from csn.core.trace import TraceDict
from csn.core.units import (
    eval_mode,
    model_device,
    resolve_layers,
    split_batch,
    to_device,
    unit_dim,
)
from csn.errors import CsnError
from csn.models.base import CsnModel

DEFAULT_MAX_ELEMENTS = {"cpu": 1 << 20, "other": 1 << 27}
"""Default cap on M*B*(largest per-sample activation of the suffix) in one batched forward, per device type.

On CPU a larger batch buys nothing once it outgrows the caches (measured on a ResNet-20: 4-16x the
elements made a sweep 20-80% slower), so masks are batched only while the largest activation stays
around 4 MiB (small loader batches); on accelerators up to 2^27 elements (512 MiB in float32)."""

SWEEP_COLUMNS = ["step", "stage", "order", "n", "fraction", "draw", "top1", "top5", "loss", "correct", "total"]
"""Columns of an ablation_sweep frame (the run's table adds epoch and the settings columns)."""


def default_max_elements(device: torch.device | str) -> int:
    """DEFAULT_MAX_ELEMENTS for a device."""
    return DEFAULT_MAX_ELEMENTS["cpu" if torch.device(device).type == "cpu" else "other"]


@dataclass(frozen=True, kw_only=True)
class SweepOptions:
    """What an ablation sweep measures and how: the keyword arguments of `ablation_sweep` (see there)."""

    num_classes: int
    grid: Any = None
    orders: Sequence[str] | str = ORDERS
    draws: int = 3
    seed: int = 0
    naive: bool = False
    max_batch_masks: int | None = None
    max_elements: int | None = None
    mode: str = "zero"
    means: Mapping[str, Any] | None = None
    step: int = 0
    device: torch.device | str | None = None
    progress: bool = False


@dataclass(frozen=True)
class SweepRequest:
    """What every stage of a sweep plans its points from, checked: the grid and orders resolved (`_check_request`)."""

    grid: Grid
    orders: tuple[str, ...]
    draws: int = 3
    seed: int = 0
    step: int = 0
    naive: bool = False


# ------------------------------------------------------------------------------------------------
# probing a model: units per layer, segment of each layer, largest activation per sample
# ------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    """Where and how wide each ablated layer is, from one forward pass of a single example."""

    units: dict[str, int]             # layer -> number of units
    segment: dict[str, str | None]    # layer -> CsnModel segment it runs in (None: not a CsnModel)
    seg_order: list[str]              # segment names in forward order
    seg_max: dict[str | None, int]    # segment -> largest per-sample output numel of any module in it


def probe(model: nn.Module, x1: Any, layers: Sequence[str]) -> Probe:
    """One forward of a single example (eval mode, no grad) recording where and how wide each layer is."""
    cur: list[str | None] = [None]
    units: dict[str, int] = {}
    segment: dict[str, str | None] = {}
    seg_max: dict[str | None, int] = {}
    wanted = set(layers)

    def watch(name: str, t: Tensor) -> None:
        if t.dim() > 0:
            seg_max[cur[0]] = max(seg_max.get(cur[0], 0), t[0].numel() if t.shape[0] else 0)
        if name in wanted and name not in units:
            units[name] = int(t.shape[unit_dim(t)])
            segment[name] = cur[0]

    names = [n for n, _ in model.named_modules() if n]
    missing = [layer for layer in layers if layer not in set(names)]
    if missing:
        resolve_layers(model, [missing[0]])  # raises the standard unknown-layer error
    seg_order: list[str] = []
    with torch.no_grad(), TraceDict(model, names, retain=None, edit=watch, strict=False):
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
    return Probe(units, segment, seg_order, seg_max)


# ------------------------------------------------------------------------------------------------
# what one stage sweeps: its points and their distinct masks
# ------------------------------------------------------------------------------------------------

@dataclass
class StagePlan:
    """One stage's sweep: its points, the distinct masks they need, and where the fast path starts."""

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


def _rankings(stage: str, layers: list[str], widths: Mapping[str, int], csi: Mapping[str, Any],
              orders: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray]:
    """{(layer, order): unit indices in ablation order} for the CSI-ranked orders (CSI validated)."""
    ranks: dict[tuple[str, str], np.ndarray] = {}
    if not any(o in ("selective", "least") for o in orders):
        return ranks
    for layer in layers:
        if layer not in csi:
            raise CsnError(f"no CSI given for layer {layer!r} of stage {stage!r}; compute selectivity for it first "
                           f"(csn selectivity) or pass csi[{layer!r}].")
        v = torch.as_tensor(csi[layer]).detach().flatten()
        if v.numel() != widths[layer]:
            raise CsnError(f"CSI for layer {layer!r} has {v.numel()} values but the layer has {widths[layer]} units; "
                           "recompute selectivity for this checkpoint.")
        if not torch.isfinite(v.double()).all():
            raise CsnError(f"CSI for layer {layer!r} has NaN or infinite values; recompute selectivity (is the "
                           "checkpoint diverged?).")
        for o in orders:
            if o != "random":
                ranks[(layer, o)] = rank_units(v, o)
    return ranks


def _points(stage: str, layers: list[str], widths: Mapping[str, int], counts: list[int],
            ranks: Mapping[tuple[str, str], np.ndarray],
            req: SweepRequest) -> tuple[list[tuple[str, int, int, int]], list[dict[str, Tensor]]]:
    """(points (order, n, draw, mask index), distinct masks) of one stage; identical masks are shared."""
    masks: list[dict[str, Tensor]] = []
    index: dict[tuple, int] = {}
    points = []
    for order in req.orders:
        for n in counts:
            for draw in range(req.draws if order == "random" else 1):
                m = {}
                for layer in layers:
                    u = widths[layer]
                    if order == "random":
                        sel = random_units(u, n, seed=req.seed, step=req.step, stage=stage, layer=layer, draw=draw)
                    else:
                        sel = ranks[(layer, order)][:n]
                    m[layer] = units_mask(layer, sel, u)
                key = tuple(m[layer].numpy().tobytes() for layer in layers)
                if key not in index:
                    index[key] = len(masks)
                    masks.append(m)
                points.append((order, n, draw, index[key]))
    return points, masks


def stage_plans(model: nn.Module, pr: Probe, stage_layers: Mapping[str, Sequence[str]], csi: Mapping[str, Any],
                req: SweepRequest) -> list[StagePlan]:
    """The StagePlan of every stage (CSI checked, grid resolved against the narrowest block)."""
    plans = []
    for stage, layers in stage_layers.items():
        layers = list(layers)
        if not layers:
            raise CsnError(f"stage {stage!r} has no layers; give it at least one module name.")
        widths = {layer: pr.units[layer] for layer in layers}
        width = min(widths.values())
        counts = req.grid.counts(width, stage)
        ranks = _rankings(stage, layers, widths, csi, req.orders)
        points, masks = _points(stage, layers, widths, counts, ranks, req)
        segment = None
        if isinstance(model, CsnModel) and not req.naive:
            segment = min((pr.segment[layer] for layer in layers), key=pr.seg_order.index)
        if segment is not None:
            suffix = pr.seg_order[pr.seg_order.index(segment):]
            per_sample = max([pr.seg_max.get(s, 0) for s in suffix] + [1])
        else:
            per_sample = max(list(pr.seg_max.values()) + [1])
        plans.append(StagePlan(stage, layers, width, counts, points, masks, segment, per_sample))
    return plans


# ------------------------------------------------------------------------------------------------
# scoring and progress
# ------------------------------------------------------------------------------------------------

def score(logits: Tensor, y: Tensor, m: int, top5: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Per-mask (correct top-1 [m], correct top-5 [m] or None, summed loss [m] float64) for logits [m*B, K]."""
    logits = logits.float()
    b = y.shape[0]
    yr = y.repeat(m) if m > 1 else y
    loss = F.cross_entropy(logits, yr, reduction="none").double().view(m, b).sum(1)
    c1 = (logits.argmax(1) == yr).view(m, b).sum(1)
    c5 = (logits.topk(5, dim=1).indices == yr[:, None]).any(1).view(m, b).sum(1) if top5 else None
    return c1, c5, loss


class _Ticker:
    """Advances a progress bar by fractions of a point, showing whole points (the bar counts points)."""

    def __init__(self, pbar: Any) -> None:
        self.pbar, self.done, self.shown = pbar, 0.0, 0

    def add(self, points: float) -> None:
        self.done += points
        whole = round(self.done) if abs(self.done - round(self.done)) < 1e-6 else int(self.done)
        if whole > self.shown:
            self.pbar.update(whole - self.shown)
            self.shown = whole


@dataclass
class _Counts:
    """Per distinct mask of one stage: correct top-1, correct top-5, summed loss."""

    c1: np.ndarray
    c5: np.ndarray
    loss: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> _Counts:
        return cls(np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.float64))

    def add(self, i: int, scored: tuple[Tensor, Tensor | None, Tensor]) -> None:
        """Add the scores of masks i, i+1, ... (one forward's worth)."""
        a, b, c = scored
        m = a.shape[0]
        self.c1[i:i + m] += a.cpu().numpy()
        if b is not None:
            self.c5[i:i + m] += b.cpu().numpy()
        self.loss[i:i + m] += c.cpu().numpy()


def _batches(loader: Iterable[Any], num_classes: int, dev: torch.device) -> Iterator[tuple[Any, Tensor]]:
    for batch in loader:
        x, y = split_batch(batch)
        y = check_labels(y, num_classes).to(dev)
        yield to_device(x, dev), y


# ------------------------------------------------------------------------------------------------
# the naive reference and the fast path
# ------------------------------------------------------------------------------------------------

@dataclass
class _Pass:
    """What the forward passes of one sweep share: the model and data, the stage plans, the counts they fill."""

    model: nn.Module
    loader: Iterable[Any]
    plans: list[StagePlan]
    counts: dict[str, _Counts]
    mean_t: dict[str, Tensor]
    tick: _Ticker
    dev: torch.device
    o: SweepOptions                # mode, num_classes, max_batch_masks
    max_elements: int
    top5: bool

    def batches(self) -> Iterator[tuple[Any, Tensor]]:
        return _batches(self.loader, self.o.num_classes, self.dev)


def _naive(s: _Pass) -> int:
    """The reference: one full forward pass over the split per distinct mask, through ablate_units."""
    total = 0
    mode = s.o.mode
    for p in s.plans:
        reps = np.bincount([d for *_, d in p.points], minlength=len(p.masks))
        for d, masks in enumerate(p.masks):
            total = 0
            with ablate_units(s.model, masks, mode, s.mean_t if mode == "mean" else None):
                for x, y in s.batches():
                    a, b, c = score(s.model(x), y, 1, s.top5)
                    s.counts[p.stage].add(d, (a, b, c))
                    total += int(y.shape[0])
            s.tick.add(int(reps[d]))
    return total


def _per_sample_edit(state: Mapping[str, tuple]) -> Callable[[str, Tensor], Tensor | None]:
    """TraceDict edit applying state[layer] = (ablate [M*B, U], keep [M*B, U] | None, mean [U] | None) per sample."""
    def edit(name: str, t: Tensor) -> Tensor | None:
        entry = state.get(name)
        if entry is None:
            return None
        abl, keep, mean = entry
        if t.shape[0] != abl.shape[0]:
            raise CsnError(f"layer {name!r} returned {t.shape[0]} rows for a batch of {abl.shape[0]}; "
                           "batched ablation needs layers whose first dimension is the batch (use naive=True).")
        return apply_ablation(t, abl, keep, mean)
    return edit


def _stage_input(model: nn.Module, p: StagePlan, x: Any) -> tuple[Any, Callable[[Any], Tensor]]:
    """(the stage's input, the function from it to the logits): the prefix runs once per batch."""
    if p.segment is None:
        return x, model
    return model.forward_until(p.segment, x), lambda inp, seg=p.segment: model.forward_from(seg, inp)


def _chunk_state(p: StagePlan, i: int, m: int, b: int, h: Any, mode: str, mean_t: Mapping[str, Tensor],
                 dev: torch.device) -> dict[str, tuple]:
    """Per-sample masks of masks i..i+m-1 of a stage for a batch of b examples repeated m times."""
    batchable = isinstance(h, Tensor)
    entry = {}
    for layer in p.layers:
        abl = torch.stack([p.masks[d][layer] for d in range(i, i + m)]).to(dev)
        abl = abl.repeat_interleave(b, dim=0)
        dtype = h.dtype if batchable and h.is_floating_point() else torch.float32
        keep = (~abl).to(dtype) if mode == "zero" else None
        entry[layer] = (abl, keep, mean_t.get(layer))
    return entry


def _forward_chunk(run: Callable[[Any], Tensor], h: Any, m: int, dev: torch.device) -> Tensor | None:
    """Logits of m copies of the stage input (one forward); None when it ran out of memory (m > 1)."""
    try:
        inp = torch.cat([h] * m) if isinstance(h, Tensor) else h
        return run(inp)
    except Exception as e:
        if not is_oom(e) or m == 1:
            raise
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return None


def _fast(s: _Pass, n_batches: int | None) -> int:
    """Stage input once per batch, then chunks of M masks per forward of the suffix ([M*B, ...])."""
    total = 0
    plans, model, dev = s.plans, s.model, s.dev
    reps = {p.stage: np.bincount([d for *_, d in p.points], minlength=len(p.masks)) for p in plans}
    state: dict[str, tuple] = {}
    cache: dict[tuple, dict[str, tuple]] = {}
    layers = [layer for p in plans for layer in p.layers]
    with TraceDict(model, layers, retain=None, edit=_per_sample_edit(state)):
        for x, y in s.batches():
            b = int(y.shape[0])
            total += b
            for p in plans:
                state.clear()
                h, run = _stage_input(model, p, x)
                cap = min(p.cap, s.o.max_batch_masks or p.cap, max(1, int(s.max_elements) // max(1, b * p.per_sample)))
                if not isinstance(h, Tensor):
                    cap = 1
                i = 0
                while i < len(p.masks):
                    m = min(cap, len(p.masks) - i)
                    key = (p.stage, i, m, b)
                    if key not in cache:
                        cache[key] = _chunk_state(p, i, m, b, h, s.o.mode, s.mean_t, dev)
                    state.clear()
                    state.update(cache[key])
                    logits = _forward_chunk(run, h, m, dev)
                    state.clear()
                    if logits is None:
                        cap = p.cap = max(1, m // 2)
                        continue
                    p.used = max(p.used, m)
                    s.counts[p.stage].add(i, score(logits, y, m, s.top5))
                    del logits
                    if n_batches:
                        s.tick.add(float(reps[p.stage][i:i + m].sum()) / n_batches)
                    i += m
    if n_batches is None:
        s.tick.add(sum(len(p.points) for p in plans))
    return total


# ------------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------------

def _check_request(stage_layers: Mapping[str, Sequence[str]], o: SweepOptions) -> SweepRequest:
    """Validate a sweep request before any forward pass; returns it with the orders and the grid resolved."""
    orders = check_orders(o.orders, o.draws)
    g = parse_grid(o.grid)
    if not isinstance(o.num_classes, int) or o.num_classes < 2:
        raise CsnError(f"num_classes must be an integer >= 2, got {o.num_classes!r}.")
    if o.max_batch_masks is not None and o.max_batch_masks < 1:
        raise CsnError(f"max_batch_masks must be >= 1, got {o.max_batch_masks}.")
    if not stage_layers:
        raise CsnError("no stage to ablate; pass {stage: [layer names]} with at least one stage.")
    check_mode(o.mode, o.means, [layer for layers in stage_layers.values() for layer in layers])
    return SweepRequest(g, orders, o.draws, o.seed, o.step, o.naive)


def _plan_sweep(model: nn.Module, loader: Iterable[Any], stage_layers: Mapping[str, Sequence[str]],
                csi: Mapping[str, Any], req: SweepRequest, mode: str, means: Mapping[str, Any] | None,
                dev: torch.device) -> tuple[list[StagePlan], dict[str, Tensor]]:
    """Probe the model on the loader's first example, plan every stage, and put the per-unit means on the device."""
    if iter(loader) is loader:  # type: ignore[call-overload]
        raise CsnError("the sweep reads the data several times; pass a re-iterable loader (a list of batches or a "
                       "DataLoader), not a one-shot iterator or generator.")
    first = next(iter(loader), None)
    if first is None:
        raise CsnError("the evaluation data yielded no examples; pass a non-empty loader of (inputs, labels) batches.")
    x0, _ = split_batch(first)
    x0 = to_device(x0, dev)
    all_layers = [layer for layers in stage_layers.values() for layer in layers]
    pr = probe(model, x0[:1] if isinstance(x0, Tensor) else x0, all_layers)
    plans = stage_plans(model, pr, stage_layers, csi, req)
    mean_t = {}
    if mode == "mean":
        for layer in all_layers:
            mean_t[layer] = torch.as_tensor(means[layer]).detach().to(dev).flatten()  # type: ignore[index]
            if mean_t[layer].numel() != pr.units[layer]:
                raise CsnError(f"means for layer {layer!r} have {mean_t[layer].numel()} values but the layer has "
                               f"{pr.units[layer]} units; pass one mean per unit.")
    return plans, mean_t


def _sweep_frame(plans: list[StagePlan], counts: Mapping[str, _Counts], total: int, step: int, top5: bool,
                 naive: bool) -> pd.DataFrame:
    """The sweep's rows (SWEEP_COLUMNS), one per point; attrs: masks_per_pass and distinct_masks per stage."""
    rows = []
    for p in plans:
        c = counts[p.stage]
        for order, n, draw, d in p.points:
            rows.append({"step": int(step), "stage": p.stage, "order": order, "n": int(n),
                         "fraction": n / p.width, "draw": int(draw), "top1": c.c1[d] / total,
                         "top5": c.c5[d] / total if top5 else float("nan"), "loss": c.loss[d] / total,
                         "correct": int(c.c1[d]), "total": int(total)})
    df = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    df = df.astype({"step": "int64", "n": "int64", "draw": "int64", "correct": "int64", "total": "int64",
                    "fraction": "float64", "top1": "float64", "top5": "float64", "loss": "float64"})
    df.attrs["masks_per_pass"] = {p.stage: (1 if naive else p.used) for p in plans}
    df.attrs["distinct_masks"] = {p.stage: len(p.masks) for p in plans}
    return df


def ablation_sweep(model: nn.Module, loader: Iterable[Any], stage_layers: Mapping[str, Sequence[str]],
                   csi: Mapping[str, Any], options: SweepOptions | None = None, *, bar: Any = None,
                   **settings: Any) -> pd.DataFrame:
    """Ablation curves of one model: a row per (stage, order, n, draw) with top1, top5, loss, correct, total.

    stage_layers: {stage: [block module names]}; all blocks of a stage are ablated at once, n units each.
    csi: {layer: Tensor[units]} ranking the units (needed for 'selective'/'least'). grid: see parse_grid
    (counts or fractions of the narrowest block's width; n = 0 always included; `fraction` = n / width).
    Random draws are seeded per (seed, step, stage, block, n, draw) (`random_seed`). top5 is NaN when
    num_classes <= 5; loss is the mean cross-entropy. naive=True runs the full model once per distinct
    mask (the reference); otherwise the fast path described in the module docstring, with at most
    max_batch_masks masks per forward and M*B*(largest per-sample activation) <= max_elements (None:
    default_max_elements(device)). `bar`: an external progress bar to advance by one per point (the
    Ablation analysis's bar over the whole run). df.attrs records masks_per_pass and distinct_masks per stage.

    The settings (num_classes, grid, orders, draws, seed, naive, max_batch_masks, max_elements, mode, means, step,
    device, progress) are the fields of SweepOptions, given as `options` and/or as keywords (which win).
    """
    o = SweepOptions(**settings) if options is None else replace(options, **settings)
    req = _check_request(stage_layers, o)
    dev = torch.device(o.device) if o.device is not None else model_device(model)
    max_elements = default_max_elements(dev) if o.max_elements is None else o.max_elements
    top5 = o.num_classes > 5
    with eval_mode(model):
        plans, mean_t = _plan_sweep(model, loader, stage_layers, csi, req, o.mode, o.means, dev)
        own = new_bar(total=sum(len(p.points) for p in plans), desc="ablation", progress=o.progress, unit="point") \
            if bar is None else None
        tick = _Ticker(own if own is not None else bar)
        counts = {p.stage: _Counts.zeros(len(p.masks)) for p in plans}
        n_batches = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        sweep = _Pass(model, loader, plans, counts, mean_t, tick, dev, o, max_elements, top5)
        try:
            with torch.no_grad():
                total = _naive(sweep) if o.naive else _fast(sweep, n_batches)
        finally:
            if own is not None:
                own.close()
    if total == 0:
        raise CsnError("the evaluation data yielded no examples; pass a non-empty loader of (inputs, labels) batches.")
    return _sweep_frame(plans, counts, total, o.step, top5, o.naive)


__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "SWEEP_COLUMNS",
    "Probe",
    "StagePlan",
    "SweepOptions",
    "SweepRequest",
    "ablation_sweep",
    "default_max_elements",
    "probe",
    "score",
    "stage_plans",
]
