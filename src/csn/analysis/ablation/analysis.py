"""`csn ablate` as an Analysis: the sweep over a run's checkpoints into tables/ablation.parquet.

Per checkpoint: the analysis model (BN statistics re-estimated by the same policy as selectivity,
recorded in bn_recalibrated); the ranking CSI from tables/selectivity.parquet when it holds that
checkpoint on the rank split with the same BN statistics (variant mean), else computed here
(collect_class_stats on the rank split with that same model); then `ablation_sweep` on the score
split. mode="mean" replaces units by their mean over the rank split.

    tables/ablation.parquet  step, epoch, stage, order, n, fraction, draw, top1, top5, loss, correct,
                             total, rank_split, score_split, bn_recalibrated, mode, seed

One row per (checkpoint, stage, order, n, draw); `correct` counts top-1 hits, `total` the images
scored. `mode` and `seed` extend DESIGN.md's schema so rows computed under other settings are never
mixed up (the table holds one rank split, score split, mode, seed and number of images; `--tag NAME`
keeps another configuration beside it). Under torchrun every rank scores its shard of the split and
the counts are summed (`reduce_ablation`), so the rows equal one process's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BeforeValidator, Field
from torch import nn

from csn import dist
from csn.analysis.ablation.masks import ORDERS, Grid, check_orders, parse_grid
from csn.analysis.ablation.sweep import ablation_sweep, probe
from csn.analysis.base import (
    Analysis,
    AnalysisModel,
    Context,
    Samples,
    Split,
    eval_loader,
)
from csn.analysis.registry import register_analysis
from csn.analysis.selectivity import (
    collect_class_stats,
    reduce_class_stats,
    selectivity_frame,
)
from csn.core.resources import check_disk_space, check_limit, check_memory, env_limit, human_bytes
from csn.core.schema import CommaList, Int, Schema, Seed
from csn.core.units import resolve_layers, split_batch, stages
from csn.errors import CsnError, closest
from csn.runs.run import Checkpoint, Run
from csn.runs.table import TableSpec

ABLATION = TableSpec(
    "ablation",
    {"step": "int64", "epoch": "float64", "stage": "str", "order": "str", "n": "int64", "fraction": "float64",
     "draw": "int64", "top1": "float64", "top5": "float64", "loss": "float64", "correct": "int64", "total": "int64",
     "rank_split": "str", "score_split": "str", "bn_recalibrated": "int64", "mode": "str", "seed": "int64"},
    key=("step", "stage", "order", "n", "draw"), settings=("rank_split", "score_split", "mode", "seed", "total"),
    row_settings=("bn_recalibrated",), row_scope={"bn_recalibrated": ("step",)}, replace_by=("step", "stage"),
    flags={"rank_split": "--rank-split", "score_split": "--score-split", "mode": "--mode", "seed": "--seed",
           "total": "--samples"},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/ablation.parquet: one row per (checkpoint, stage, order, n, draw)."""
ABLATION_COLUMNS = list(ABLATION.columns)

MAX_POINTS_ENV = "CSN_MAX_ABLATION_POINTS"
DEFAULT_MAX_POINTS = 1_000_000
"""The most points (table rows) one ablation request may hold, unless --max-points or $CSN_MAX_ABLATION_POINTS
says more: the bound is checked in setup, before anything is allocated."""
ROW_BYTES = 700
"""Memory one point takes while a request runs (its key, its expected row and its table row: about 700 bytes,
measured with tracemalloc on 100,000 points), for the estimate in the refusal."""
TABLE_ROW_BYTES = 24
"""Disk one point takes in tables/ablation.parquet at the least (compressed; about 30-55 bytes measured): a
request whose rows surely cannot fit the disk is refused before it starts."""

_RANKING_COLUMNS = ("step", "layer", "unit", "csi", "split", "bn_recalibrated")
"""Columns of tables/selectivity.parquet the ranking needs (variant too, when the table has it)."""


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------

def _grid_text(v: Any) -> Any:
    """A grid given as a Grid or a list (ints = counts, floats = fractions) in its text form ('0,1,2', 'f:0,0.5,1.0'),
    checked when the options are made (a study file's bad grid is refused before any run trains)."""
    if isinstance(v, Grid):
        v = list(v.values) if v.kind == "fraction" else [int(x) for x in v.values]
    if isinstance(v, (list, tuple)):
        v = ("f:" + ",".join(repr(float(x)) for x in v) if any(isinstance(x, float) for x in v)
             else ",".join(str(x) for x in v))
    if v is not None:
        try:
            parse_grid(v)
        except CsnError as e:
            raise ValueError(str(e).rstrip(".")) from None
    return v


class AblationOptions(Schema):
    """Options of `csn ablate` (and of the Ablation analysis)."""

    stages: Annotated[tuple[str, ...], CommaList] | None = Field(
        None, description="Comma-separated stages to ablate (e.g. layer1,layer2), or layer patterns ('layer2.*', "
        "'layer2.1') for a custom group. Default: every stage of the model.", json_schema_extra={"metavar": "LIST"})
    orders: Annotated[tuple[str, ...], CommaList] = Field(
        ORDERS, description="Which units go first: selective (highest CSI), random (seeded draws, the control), "
        "least (lowest CSI).", json_schema_extra={"metavar": "LIST"})
    draws: Int = Field(3, ge=1, description="Random draws per (checkpoint, stage, n); their spread is the band around "
                       "the control.", json_schema_extra={"metavar": "N"})
    grid: Annotated[str | None, BeforeValidator(_grid_text)] = Field(
        None, description="Units ablated per block: counts '0,1,2,4,8' or fractions of the block width "
        "'f:0,0.1,0.5,1' (increasing; n=0 is always added). Default: 12 fractions from 0 to 1, dense at the start.",
        json_schema_extra={"metavar": "SPEC"})
    rank_split: Split = Field("test", description="Split whose CSI ranks the units (taken from "
                              "tables/selectivity.parquet when it has it, else computed).")
    score_split: Split = Field("test", description="Split the ablated network is scored on (top-1, top-5, loss).")
    mode: Literal["zero", "mean"] = Field("zero", description="zero: set ablated units to 0 (the study). mean: set "
                                          "them to their mean over the rank split.")
    seed: Seed = Field(0, description="Seed of the random draws (recorded in the table).", json_schema_extra={"metavar": "N"})
    samples: Samples = Field(None, description="Score on a fixed seeded subset of N images of the score split "
                             "[default: all].", json_schema_extra={"metavar": "N|all"})
    naive: bool = Field(False, description="Reference protocol: a full forward pass per point (slow; gives the same "
                        "numbers as the default).")
    max_batch_masks: Int | None = Field(None, ge=1, description="At most M masks share one forward pass (default: as "
                                        "many as a memory budget allows).", json_schema_extra={"metavar": "M"})
    max_elements: Int | None = Field(None, ge=1, description="Memory budget of one batched forward: masks x batch x "
                                     "largest per-image activation (default: 2^20 on CPU, 2^27 on accelerators).",
                                     json_schema_extra={"metavar": "N"})
    max_points: Int | None = Field(None, ge=1, description="Refuse a request of more points (checkpoints x stages x "
                                   f"grid x orders and draws) than this [default: ${MAX_POINTS_ENV} or "
                                   f"{DEFAULT_MAX_POINTS:,}].", json_schema_extra={"metavar": "N"})


# ------------------------------------------------------------------------------------------------
# stages, the ranking CSI and the reduction across ranks
# ------------------------------------------------------------------------------------------------

def resolve_stages(model: nn.Module, names: Sequence[str] | str | None = None) -> dict[str, list[str]]:
    """{stage: [layers]} from stage names of the model (default: all) or layer patterns ('layer2.*', 'layer2.1')."""
    try:
        declared = stages(model)
    except CsnError:
        declared = {}
    if names is None:
        if not declared:
            stages(model)  # raises the "declares no read points" error
        return {k: list(v) for k, v in declared.items()}
    if isinstance(names, str):
        names = [s.strip() for s in names.split(",") if s.strip()]
    if not names:
        raise CsnError("no stage given; pass stage names such as 'layer1,layer2' or layer patterns such as 'layer2.*'.")
    twice = next((s for i, s in enumerate(names) if s in names[:i]), None)
    if twice is not None:
        raise CsnError(f"stage {twice!r} is given twice in --stages; name each stage once.")
    out: dict[str, list[str]] = {}
    modules = [n for n, _ in model.named_modules() if n]
    for s in names:
        if s in declared:
            out[s] = list(declared[s])
            continue
        try:
            out[s] = resolve_layers(model, [s])
        except CsnError:
            near = closest(s, list(dict.fromkeys([*declared, *modules])), n=5)
            have = ", ".join(declared) if declared else "none declared"
            raise CsnError(f"unknown stage or layer {s!r}; the model's stages are {have}, or pass a layer pattern "
                           f"such as 'layer2.*' (closest names: {', '.join(near)}).") from None
    return out


def means_and_csi(stats: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CSI (csn's definition, via selectivity_frame) and each unit's dataset mean, from class statistics."""
    frame = selectivity_frame(stats)
    csi = {layer: torch.tensor(g.sort_values("unit")["csi"].to_numpy(np.float64)) for layer, g in frame.groupby("layer")}
    means = {layer: (st.sums.sum(0) / st.counts.sum().clamp_min(1)).float().cpu() for layer, st in stats.items()}
    return csi, means


def ranking_rows(run: Run, steps: Sequence[int], split: str) -> pd.DataFrame | None:
    """The rows of tables/selectivity.parquet that can rank units at these steps (split, variant mean); None if none."""
    try:
        table = run.read("selectivity")
    except CsnError:
        return None
    if table is None or table.empty or not set(_RANKING_COLUMNS) <= set(table.columns):
        return None
    keep = table["step"].isin(set(steps)) & (table["split"] == split)
    if "variant" in table.columns:
        keep &= table["variant"] == "mean"
    rows = table.loc[keep, list(_RANKING_COLUMNS)].reset_index(drop=True)
    return rows if not rows.empty else None


def csi_from_table(table: pd.DataFrame | None, step: int, layers: Sequence[str], widths: Mapping[str, int],
                   bn: int) -> dict[str, torch.Tensor] | None:
    """CSI per layer from ranking_rows when they hold this checkpoint with the same BN statistics; else None."""
    if table is None:
        return None
    t = table[(table["step"] == step) & (table["bn_recalibrated"] == bn)]
    out = {}
    for layer in layers:
        g = t[t["layer"] == layer].sort_values("unit")
        if len(g) != widths[layer] or not (g["unit"].to_numpy() == np.arange(widths[layer])).all():
            return None
        out[layer] = torch.tensor(g["csi"].to_numpy(np.float64))
    return out


def reduce_ablation(df: pd.DataFrame) -> pd.DataFrame:
    """Sum an ablation_sweep frame over torchrun ranks (each rank scored its shard) and recompute top1/top5/loss.

    Rows must align across ranks (same plan, grid, orders, draws and seeds: they do, as the sweep is
    deterministic). Counts (correct, top-5 correct, total) are exact; the loss is a float sum.
    Returns a new frame on every rank (the frame itself in a single process).
    """
    if not dist.is_dist():
        return df
    total = df["total"].to_numpy(np.float64)
    top5 = df["top5"].to_numpy(np.float64)
    has5 = ~np.isnan(top5)
    cols = np.stack([df["correct"].to_numpy(np.float64), np.where(has5, np.rint(top5 * total), 0.0),
                     df["loss"].to_numpy(np.float64) * total, total], axis=1)
    t = dist.all_reduce_(torch.from_numpy(np.ascontiguousarray(cols))).numpy()
    out = df.copy()
    out["correct"] = np.rint(t[:, 0]).astype(np.int64)
    out["total"] = np.rint(t[:, 3]).astype(np.int64)
    out["top1"] = t[:, 0] / t[:, 3]
    out["top5"] = np.where(has5, t[:, 1] / t[:, 3], np.nan)
    out["loss"] = t[:, 2] / t[:, 3]
    return out


# ------------------------------------------------------------------------------------------------
# the analysis
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """What setup resolved for one run: the stages, their widths and grid counts, and the images scored."""

    stage_layers: dict[str, list[str]]
    units: dict[str, int]
    counts: dict[str, list[int]]
    grid: Grid
    orders: tuple[str, ...]
    total: int

    def keys(self, draws: int) -> list[tuple[str, str, int, int]]:
        """(stage, order, n, draw) of every point one checkpoint holds."""
        return [(s, o, n, d) for s in self.stage_layers for o in self.orders for n in self.counts[s]
                for d in range(draws if o == "random" else 1)]


@register_analysis("ablate")
class Ablation(Analysis):
    """Selective, random and least selective units ablated stage by stage, at every checkpoint (SPEC C2).

    One row per (checkpoint, stage, order, n, draw); the progress bar counts these points.
    """

    name = "ablation"
    Options = AblationOptions
    tables = (ABLATION,)
    unit = "point"

    def __init__(self, options: AblationOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._plans: dict[str, _Plan] = {}

    def _plan(self, ctx: Context) -> _Plan:
        return self._plans[str(ctx.run.path.resolve())]

    @property
    def ranked(self) -> bool:
        """Whether an order needs the CSI ranking (selective or least)."""
        return any(o != "random" for o in self.options.orders)

    def setup(self, ctx: Context) -> None:
        """Validate orders, draws, grid and stages against the run's model (grid vs block widths), before any work."""
        o = self.options
        orders = check_orders(o.orders, o.draws)
        grid = parse_grid(o.grid)
        if ctx.num_classes is None:
            raise CsnError(f"{ctx.run.path / 'run.json'} records no number of classes; re-create the run with `csn train`.")
        skeleton = ctx.run.build_model().eval()
        stage_layers = resolve_stages(skeleton, o.stages)
        layers = [layer for names in stage_layers.values() for layer in names]
        x0, _ = split_batch(next(iter(eval_loader(ctx.run, ctx.data, o.score_split, batch_size=1))))
        units = probe(skeleton, x0, layers).units
        counts = {s: grid.counts(min(units[layer] for layer in names), s) for s, names in stage_layers.items()}
        self._check_size(ctx, counts, orders)
        self._plans[str(ctx.run.path.resolve())] = _Plan(stage_layers, units, counts, grid, orders,
                                                         ctx.split_size(o.score_split, o.samples))

    def _check_size(self, ctx: Context, counts: dict[str, list[int]], orders: tuple[str, ...]) -> None:
        """Refuse a request of more points than the bound (--max-points, $CSN_MAX_ABLATION_POINTS), with its
        size, memory and work, before anything is allocated."""
        o = self.options
        per_order = {order: o.draws if order == "random" else 1 for order in orders}
        per_ckpt = sum(len(c) * sum(per_order.values()) for c in counts.values())
        points = per_ckpt * len(ctx.checkpoints)
        limit = o.max_points or int(env_limit(MAX_POINTS_ENV, DEFAULT_MAX_POINTS, example="e.g. 5000000"))
        images = ctx.split_size(o.score_split, o.samples)
        shape = " + ".join(f"{k} x {len(c)} grid points" for k, c in counts.items())
        request = (f"this ablation request ({len(ctx.checkpoints)} checkpoints x ({shape}) x "
                   f"{sum(per_order.values()):,} orders and draws")
        check_limit(points, limit, show=lambda n: f"{n:,.0f} points",
                    what=f"{request}; about {human_bytes(points * ROW_BYTES)} of rows and {points * images:.3g} image "
                         "evaluations)",
                    raise_it=f"fewer --draws, --checkpoints or --stages, a coarser --grid, or --max-points N or "
                             f"{MAX_POINTS_ENV} to raise it")
        # a raised count limit never switches off what memory and disk can hold
        fix = "fewer --draws, --checkpoints or --stages, or a coarser --grid (--max-points raises the count limit only)"
        check_memory(points * ROW_BYTES, what=f"{request} = {points:,} points)", fix=fix)
        check_disk_space(ctx.run.path / "tables", points * TABLE_ROW_BYTES, what=f"the rows of {request} = {points:,} "
                         "points)", fix=fix)

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        o = self.options
        return {"ablation": {"rank_split": o.rank_split, "score_split": o.score_split, "mode": o.mode, "seed": o.seed,
                             "total": self._plan(ctx).total}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        keys = pd.DataFrame(self._plan(ctx).keys(self.options.draws), columns=["stage", "order", "n", "draw"])
        keys = keys.astype({"n": "int64", "draw": "int64"})
        keys.insert(0, "step", np.int64(ckpt.step))
        return {"ablation": keys.assign(bn_recalibrated=np.int64(ctx.bn[ckpt.step]))}

    def work(self, ctx: Context, ckpt: Checkpoint) -> float:
        """The checkpoint's points (a whole number, so the bar shows whole points)."""
        return len(self._plan(ctx).keys(self.options.draws))

    def prepare(self, ctx: Context, todo: Sequence[Checkpoint]) -> pd.DataFrame | None:
        """Rank 0: the selectivity rows that can rank the units of the checkpoints to do (zero mode only)."""
        if not todo or not self.ranked or self.options.mode != "zero":
            return None
        return ranking_rows(ctx.run, [c.step for c in todo], self.options.rank_split)

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The rows of the stages this checkpoint lacks; under torchrun (ctx.shared) the counts summed over ranks."""
        o, plan = self.options, self._plan(ctx)
        todo = set(missing["ablation"]["stage"])
        stage_layers = {s: names for s, names in plan.stage_layers.items() if s in todo}
        am = ctx.model(ckpt)
        csi, means = self._ranking(ctx, ckpt, am, [layer for names in stage_layers.values() for layer in names])
        loader = ctx.loader(o.score_split, o.samples)
        with dist.same_outcome(enabled=ctx.shared):
            rows = ablation_sweep(
                am.model, loader, stage_layers, csi or {}, grid=plan.grid, orders=plan.orders, draws=o.draws,
                seed=o.seed, naive=o.naive, num_classes=ctx.num_classes, max_batch_masks=o.max_batch_masks,
                max_elements=o.max_elements, mode=o.mode, means=means, step=ckpt.step, device=ctx.device,
                bar=ctx.progress)
        if ctx.shared:
            rows = reduce_ablation(rows)
        rows.insert(1, "epoch", float(ckpt.epoch))
        rows["rank_split"] = o.rank_split
        rows["score_split"] = o.score_split
        rows["bn_recalibrated"] = np.int64(am.bn_recalibrated)
        rows["mode"] = o.mode
        rows["seed"] = np.int64(o.seed)
        return {"ablation": ABLATION.frame(rows)}

    def _ranking(self, ctx: Context, ckpt: Checkpoint, am: AnalysisModel,
                 layers: list[str]) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
        """(CSI, per-unit means) of the layers: CSI from the selectivity table when it matches, else both computed
        on the rank split with this model (means only in mean mode; nothing when no order is ranked)."""
        o = self.options
        csi = None
        if o.mode == "zero" and self.ranked:
            csi = csi_from_table(ctx.state, ckpt.step, layers, self._plan(ctx).units, am.bn_recalibrated)
        if (csi is None and self.ranked) or o.mode == "mean":
            loader = ctx.loader(o.rank_split)
            with dist.same_outcome(enabled=ctx.shared):  # a bad batch on one rank stops every rank before the reduction
                stats = collect_class_stats(am.model, loader, layers, ctx.num_classes, device=ctx.device, progress=False)
            if ctx.shared:
                reduce_class_stats(stats)
            return means_and_csi(stats)
        return csi, None


__all__ = [
    "ABLATION",
    "ABLATION_COLUMNS",
    "Ablation",
    "AblationOptions",
    "csi_from_table",
    "means_and_csi",
    "ranking_rows",
    "reduce_ablation",
    "resolve_stages",
]
