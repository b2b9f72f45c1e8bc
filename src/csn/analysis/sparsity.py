"""Per-image sparsity of every unit, and the study's regularizer statistic, at a checkpoint (`Sparsity`).

The study's regularizer (its trainer_reg_v2.py / class_selectivity_v2.py; SPEC "Selectivity regularizer") took
each GPU's 32-64 images, summed each unit's activations per class over the classes present and computed
CSI = (u_max - u_rest) / (u_max + u_rest + 1e-6). With 1,000 classes nearly every class appears once in such a
group, so the statistic measures how sparse a unit's responses are across *images*. This analysis measures
both, in eval mode on an evaluation split:

- **sparsity** (the study's statistic with every image its own class): the split (or its seeded subset) is put
  in a seeded random order (SPARSITY_SEED) and cut into groups of G consecutive images (G = 32, the study's
  per-GPU batch; a shorter last group is used like the others). Within a group of n >= 2 images, with a_i the
  unit's activation (spatial mean) on image i:

      m = max_i a_i,   r = (sum_i a_i - m) / (n - 1)   (the mean of the other n - 1 images),
      s = (m - r) / (m + r + 1e-6)

  sparsity = the mean of s over the groups. 0: every image drives the unit alike; 1: one image per group
  drives it (post-ReLU units; a unit that is 0 on a whole group gets s = 0 there).
- **group_csi** (the study's regularizer statistic, true labels, in the same groups): per group the class
  sums over the classes present, CSI over them with eps 1e-6; a group with fewer than 2 classes present
  contributes nothing; the mean over the contributing groups (csn.core.stats.group_csi_nowait, the regularizer's
  own function, here in eval mode and float64).
- **group_csi_floor**: group_csi of a unit that responds alike to every image, i.e. from the class counts alone
  (with class sums, a class present twice in a group has twice the sum: with 10 classes in groups of 32, about
  3 images per class, this floor is about 0.35; with 100 classes about 0.3, where one class appears twice). The
  network cannot lower group_csi much below it (it does not see a group's counts), so the part a regularizer can
  cut is group_csi - group_csi_floor. The same value for every unit of a checkpoint and split.
- **batch_csi** (csn's regularizer statistic): the same with class *means* (eps 1e-7) in groups of B images, B the
  run's training batch size (`batch`), i.e. csn's batch CSI on eval-mode batches of the split. With 10 classes
  it is close to the dataset-level CSI; with 100 classes and about one image per class it is not.

The loader's batches hold whole groups of both sizes (a multiple of lcm(G, B)), so no group straddles two.

A unit whose activations are all exactly 0 is dead (sparsity and group_csi 0, counted in `dead`). Table:

    tables/sparsity.parquet  step, epoch, layer, stage, unit, sparsity, group_csi, group_csi_floor, batch_csi,
                             dead, n_groups, split, group, batch, n_images, bn_recalibrated

Under torchrun every process computes the whole (cheap) pass on the same seeded order; rank 0 writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor

from csn.analysis.base import SUBSET_SEED, Analysis, Context, Samples, Split, split_of, traced_batches
from csn.analysis.registry import register_analysis
from csn.core.schema import CommaList, Int, Schema
from csn.core.stats import EPS, STUDY_EPS, STUDY_GROUP, group_csi_nowait
from csn.core.units import resolve_layers, stage_of
from csn.data.loaders import split_loader, subset
from csn.errors import CsnError
from csn.runs.run import Checkpoint
from csn.runs.table import TableSpec

SPARSITY_SEED = 3232
"""Seed of the random order the evaluation split is cut into groups in (the same in every run and checkpoint)."""

SPARSITY = TableSpec(
    "sparsity",
    {"step": "int64", "epoch": "float64", "layer": "str", "stage": "str", "unit": "int64", "sparsity": "float64",
     "group_csi": "float64", "group_csi_floor": "float64", "batch_csi": "float64", "dead": "bool", "n_groups": "int64", "split": "str",
     "group": "int64", "batch": "int64", "n_images": "int64", "bn_recalibrated": "int64"},
    key=("step", "layer"), settings=("split", "group", "batch", "n_images"), row_settings=("bn_recalibrated",),
    same_set=("layer",), flags={"split": "--split", "group": "--group", "batch": "--batch", "n_images": "--samples"},
    row_scope={"bn_recalibrated": ("step",)},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/sparsity.parquet: one row per checkpoint and unit."""


class SparsityOptions(Schema):
    """Options of the Sparsity analysis."""

    split: Split = Field("test", description="Evaluation split (no augmentation).")
    layers: Annotated[tuple[str, ...], CommaList] | None = Field(
        None, description="Read points (module names or globs); default: the model's declared read points.",
        json_schema_extra={"metavar": "PATTERN", "multiple": True})
    group: Int = Field(STUDY_GROUP, ge=2, description="Images per group of sparsity and group_csi (the study's "
                       "per-GPU batch: 32).")
    batch: Int | None = Field(None, ge=2, description="Images per group of batch_csi [default: the run's training "
                              "batch size].")
    samples: Samples = Field(None, description="A fixed random subset of N images of the split [default: all].",
                             json_schema_extra={"metavar": "N|all"})


def image_sparsity(acts: Tensor, group: int, eps: float = STUDY_EPS) -> tuple[Tensor, Tensor]:
    """Per unit, the sum over groups of (max - mean of the others) / (max + mean of the others + eps), and the
    number of groups with >= 2 images: acts [N, U] cut into groups of `group` consecutive rows (float64)."""
    a = acts.double()
    n = a.shape[0]
    g = -(-n // group)
    pad = g * group - n
    size = torch.full((g,), group, dtype=torch.float64, device=a.device)
    size[-1] -= pad
    x = torch.cat([a, a.new_full((pad, a.shape[1]), -torch.inf)]).view(g, group, -1)
    m = x.max(dim=1).values  # [G, U]
    total = torch.where(torch.isfinite(x), x, 0.0).sum(dim=1)
    ok = size >= 2
    rest = (total - m) / (size - 1).clamp_min(1)[:, None]
    s = (m - rest) / (m + rest + eps)
    return torch.where(ok[:, None], s, 0.0).sum(0), ok.sum()


def group_csi_sum(acts: Tensor, labels: Tensor, num_classes: int, group: int, class_sums: bool) -> tuple[Tensor, Tensor]:
    """Per unit, the sum over contributing groups of the regularizer's group CSI (class sums, eps 1e-6: the study's;
    class means, eps 1e-7: csn's), and how many groups contributed (>= 2 classes present); float64."""
    eps = STUDY_EPS if class_sums else EPS
    mean, n = group_csi_nowait(acts.double(), labels, num_classes, group, eps, class_sums)
    return mean * n, n


def shuffled_loader(ctx: Context, split: str, samples: int | None, batch_size: int) -> Any:
    """The split (or its seeded subset) in the fixed random order SPARSITY_SEED, unaugmented; the whole split on
    every rank (not sharded)."""
    cfg = ctx.run.config
    return split_loader(subset(split_of(ctx.data, split), samples, SUBSET_SEED), batch_size, ctx.device,
                       seed=SPARSITY_SEED, run_seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last)


class _Sums:
    """Running per-unit sums over groups of one layer (float64): sparsity, group_csi, batch_csi, and liveness."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts = {"sparsity": 0, "group_csi": 0, "group_csi_floor": 0, "batch_csi": 0}
        self.live: Tensor | None = None

    def add(self, acts: Tensor, labels: Tensor, num_classes: int, group: int, batch: int) -> None:
        parts = {"sparsity": image_sparsity(acts, group),
                 "group_csi": group_csi_sum(acts, labels, num_classes, group, class_sums=True),
                 "group_csi_floor": group_csi_sum(torch.ones_like(acts[:, :1]), labels, num_classes, group, class_sums=True),
                 "batch_csi": group_csi_sum(acts, labels, num_classes, batch, class_sums=False)}
        for k, (total, n) in parts.items():
            self.sums[k] = self.sums[k] + total if k in self.sums else total
            self.counts[k] += int(n)
        live = (acts != 0).any(0)
        self.live = live if self.live is None else self.live | live

    def mean(self, what: str) -> np.ndarray:
        """The mean over groups of one measure (NaN where no group counted)."""
        total = self.sums[what].cpu().numpy()
        return total / self.counts[what] if self.counts[what] else np.full(total.shape, np.nan)


def collect_sparsity(model: torch.nn.Module, loader: Iterable[Any], layers: list[str], num_classes: int, group: int,
                     batch: int, device: torch.device | str = "cpu") -> dict[str, _Sums]:
    """One eval-mode, no-grad pass: per layer the running sums of sparsity and group_csi (groups of `group`) and
    batch_csi (groups of `batch`); the loader's batches must hold whole groups (a multiple of both sizes)."""
    sums = {name: _Sums() for name in layers}
    for out, y in traced_batches(model, loader, layers, device):
        for name in layers:
            sums[name].add(out[name], y.to(out[name].device), num_classes, group, batch)
    if any(s.live is None for s in sums.values()):
        raise CsnError("the evaluation data yielded no examples; measure on a non-empty split.")
    return sums


def sparsity_frame(sums: Mapping[str, _Sums], stage_map: Mapping[str, str]) -> pd.DataFrame:
    """One row per unit: layer, stage, unit, sparsity, group_csi, group_csi_floor, batch_csi, dead, n_groups (dead
    units: 0, the floor as for every unit)."""
    frames = []
    for layer, s in sums.items():
        dead = ~s.live.cpu().numpy()
        u = len(dead)
        frames.append(pd.DataFrame({
            "layer": [layer] * u, "stage": [stage_map.get(layer, layer)] * u, "unit": np.arange(u, dtype=np.int64),
            "sparsity": np.where(dead, 0.0, s.mean("sparsity")), "group_csi": np.where(dead, 0.0, s.mean("group_csi")),
            "group_csi_floor": float(s.mean("group_csi_floor")[0]), "batch_csi": np.where(dead, 0.0, s.mean("batch_csi")),
            "dead": dead,
            "n_groups": np.int64(s.counts["sparsity"])}))
    return pd.concat(frames, ignore_index=True)


@register_analysis()
class Sparsity(Analysis):
    """Per-image sparsity and the study's group CSI of every unit at every checkpoint: ONE eval-mode pass."""

    name = "sparsity"
    Options = SparsityOptions
    tables = (SPARSITY,)

    def setup(self, ctx: Context) -> None:
        ctx.own["layers"] = resolve_layers(ctx.run.build_model(), self.options.layers)  # unknown pattern: CsnError
        ctx.own["n_images"] = ctx.split_size(self.options.split, self.options.samples)
        ctx.own["batch"] = self.options.batch or int(ctx.run.config.batch_size)
        if ctx.own["batch"] < 2:
            raise CsnError(f"run {ctx.run.name} trained with batches of {ctx.own['batch']}; give --batch >= 2.")
        if ctx.num_classes is None:
            raise CsnError(f"run {ctx.run.name} records no number of classes (run.json data.num_classes); "
                           "train it with csn to measure sparsity.")

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        o = self.options
        return {"sparsity": {"split": o.split, "group": o.group, "batch": ctx.own["batch"], "n_images": ctx.own["n_images"]}}

    def sets(self, ctx: Context) -> dict[str, dict[str, Iterable[Any]]]:
        return {"sparsity": {"layer": ctx.own["layers"]}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        keys = pd.DataFrame({"step": np.int64(ckpt.step), "layer": ctx.own["layers"]})
        return {"sparsity": keys.assign(bn_recalibrated=np.int64(ctx.bn[ckpt.step]))}

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        o = self.options
        am = ctx.model(ckpt)
        b = ctx.own["batch"]
        whole = math.lcm(o.group, b)
        loader = shuffled_loader(ctx, o.split, o.samples, whole * max(1, ctx.run.config.eval_batch_size // whole))
        sums = collect_sparsity(am.model, loader, ctx.own["layers"], int(ctx.num_classes), o.group, b, ctx.device)
        df = sparsity_frame(sums, {n: stage_of(am.model, n) for n in ctx.own["layers"]})
        df.insert(0, "step", np.int64(ckpt.step))
        df.insert(1, "epoch", float(ckpt.epoch))
        return {"sparsity": df.assign(split=o.split, group=np.int64(o.group), batch=np.int64(b),
                                      n_images=np.int64(ctx.own["n_images"]), bn_recalibrated=np.int64(am.bn_recalibrated))}


def summarize_sparsity(table: pd.DataFrame, stages: Iterable[str] | None = None) -> pd.DataFrame:
    """Per (step, epoch, stage): the mean sparsity, group_csi and batch_csi over the live units, n_units, n_dead."""
    d = table if stages is None else table[table["stage"].isin(list(stages))]
    keys = ["step", "epoch", "stage"]
    live = d[~d["dead"].astype(bool)]
    out = live.groupby(keys, sort=False)[["sparsity", "group_csi", "batch_csi"]].mean().add_suffix("_mean").reset_index()
    counts = d.groupby(keys, sort=False).agg(n_units=("unit", "size"), n_dead=("dead", "sum")).reset_index()
    return counts.merge(out, on=keys, how="left")


__all__ = ["SPARSITY_SEED", "SPARSITY", "SparsityOptions", "image_sparsity", "group_csi_sum", "shuffled_loader",
           "collect_sparsity", "sparsity_frame", "Sparsity", "summarize_sparsity"]
