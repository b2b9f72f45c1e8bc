"""Class selectivity of every unit: the streaming pass, the tables, and `csn selectivity` as an Analysis.

The formulas (CSI, eta²) live in csn.core.stats. Here: `collect_class_stats` (ONE eval-mode,
no-grad pass over a loader keeping per-class sums, sums of squares and counts per unit, never
per-image activations), the per-unit tables, CSI over class subsets, `class_selectivity` (a model
and a loader -> a table), and `Selectivity`, the analysis of a run's checkpoints:

    tables/selectivity.parquet  step, epoch, layer, stage, unit, csi, pref_class, mu_max, mu_rest,
                                dead, eta2, split, bn_recalibrated, variant, n_images
    tables/class_means.parquet  step, layer, unit, class, mean

A table holds one configuration (split, variant, layers, subset size; BN statistics per checkpoint);
to keep another beside it give a tag: tables/selectivity-TAG.parquet.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor, nn

from csn.analysis.base import Analysis, Context, Samples, Split, nonfinite_error, stage_summary
from csn.analysis.registry import register_analysis
from csn.core.progress import bar
from csn.core.schema import CommaList, Schema
from csn.core.stats import (
    EPS,
    STUDY_EPS,
    VARIANTS,
    ClassNames,
    ClassStats,
    DeferredLabelCheck,
    csi_from_means,
)
from csn.core.trace import TraceDict
from csn.core.units import eval_mode, model_device, resolve_layers, split_batch, stage_of, to_device
from csn.dist import all_reduce_tensors, is_main, same_outcome
from csn.errors import CsnError, unknown
from csn.runs.run import Checkpoint
from csn.runs.table import TableSpec

SELECTIVITY_COLUMNS = ["layer", "stage", "unit", "csi", "pref_class", "mu_max", "mu_rest", "dead", "eta2"]
CLASS_MEANS_COLUMNS = ["layer", "unit", "class", "mean"]


# ------------------------------------------------------------------------------------------------
# one streaming pass over a loader
# ------------------------------------------------------------------------------------------------

def collect_class_stats(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str] | str | None,
    num_classes: int | None,
    *,
    device: torch.device | str | None = None,
    reduce: Callable[[Tensor], Any] | None = None,
    desc: str | None = None,
    progress: bool = True,
) -> dict[str, ClassStats]:
    """One eval-mode, no-grad pass over (x, y) batches: per-layer ClassStats of the units' activations.

    layers are module names or patterns (csn.core.units.resolve_layers). num_classes=None infers it as
    max label + 1. `reduce` is applied in place to every tensor of every ClassStats.tensors() after
    the pass (e.g. torch.distributed.all_reduce). Hooks are removed and train/eval modes restored,
    also on error. Non-finite activations raise a CsnError naming the layer.
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise CsnError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    names = resolve_layers(model, layers)
    dev = torch.device(device) if device is not None else model_device(model)
    stats = {name: ClassStats(num_classes) for name in names}
    n_batches = 0
    labels = DeferredLabelCheck(num_classes)
    k_seen = 0
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    with eval_mode(model), torch.no_grad(), TraceDict(model, names) as cache, \
            bar(total=total, desc=desc or "class statistics", leave=False, unit="batch", progress=progress) as pbar:
        for batch in loader:
            x, y = split_batch(batch)
            y = labels.take(y)  # no GPU sync per batch: labels out of range are reported after the pass
            if num_classes is None and y.numel():
                k_seen = max(k_seen, int(y.max()) + 1)
            cache.clear()
            model(to_device(x, dev))
            for name in names:
                if name not in cache:
                    raise CsnError(f"layer {name!r} did not run in the model's forward pass; choose a layer the forward uses.")
                acts = cache[name]
                if acts.shape[0] != y.shape[0]:
                    raise CsnError(
                        f"layer {name!r} gave {acts.shape[0]} rows for a batch of {y.shape[0]} labels; "
                        "read a layer whose first dimension is the batch."
                    )
                stats[name].update(acts, y.to(acts.device), validate=False)
            n_batches += 1
            pbar.update(1)
    labels.check()
    if n_batches == 0 or any(s.sums is None for s in stats.values()):
        raise CsnError("the evaluation data yielded no examples; pass a non-empty loader of (inputs, labels) batches.")
    if num_classes is None:
        for s in stats.values():
            s.ensure_classes(k_seen)
    if reduce is not None:
        for s in stats.values():
            for t in s.tensors():
                out = reduce(t)
                if isinstance(out, Tensor) and out is not t:
                    t.copy_(out)
    for name, s in stats.items():
        if not (torch.isfinite(s.sums).all() and torch.isfinite(s.sumsq).all()):
            raise nonfinite_error(f"layer {name!r}")
    return stats


def reduce_class_stats(stats: Mapping[str, ClassStats]) -> Mapping[str, ClassStats]:
    """Sum every ClassStats (sums, sumsq, counts) across torchrun ranks in place; returns `stats`.

    Every rank needs the same layers in the same order and a fixed num_classes (so the shapes agree).
    """
    for name in sorted(stats):
        all_reduce_tensors(stats[name].tensors())
    return stats


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------

def selectivity_frame(
    stats: Mapping[str, ClassStats],
    stage_of: Mapping[str, str] | None = None,
    variant: str = "mean",
    *,
    class_names: ClassNames = None,
) -> pd.DataFrame:
    """One row per unit: layer, stage, unit, csi, pref_class, mu_max, mu_rest, dead, eta2.

    variant="mean" is csn's CSI (class means, eps=1e-7). variant="study" reproduces the original
    study's code: class SUMS in place of means and eps=1e-6 (mu_max/mu_rest are then sums); on a
    balanced split this only changes eps, on an unbalanced one it weights classes by their size.
    Dead units (all activations exactly 0) get csi 0, pref_class -1 and dead=True.
    """
    if variant not in VARIANTS:
        raise unknown("variant", variant, VARIANTS)
    frames = []
    for layer, st in stats.items():
        st.check(class_names)
        vals, eps = (st.means(), EPS) if variant == "mean" else (st.sums, STUDY_EPS)
        r = csi_from_means(vals, eps)
        dead = st.dead()
        u = st.num_units
        frames.append(pd.DataFrame({
            "layer": [layer] * u,
            "stage": [(stage_of or {}).get(layer, layer)] * u,
            "unit": np.arange(u, dtype=np.int64),
            "csi": torch.where(dead, 0.0, r.csi).cpu().numpy(),
            "pref_class": torch.where(dead, -1, r.pref_class).cpu().numpy().astype(np.int64),
            "mu_max": r.mu_max.cpu().numpy(),
            "mu_rest": r.mu_rest.cpu().numpy(),
            "dead": dead.cpu().numpy(),
            "eta2": st.eta2().cpu().numpy(),
        }))
    if not frames:
        return _empty(SELECTIVITY_COLUMNS)
    return pd.concat(frames, ignore_index=True)[SELECTIVITY_COLUMNS]


def class_means_frame(stats: Mapping[str, ClassStats], *, class_names: ClassNames = None) -> pd.DataFrame:
    """Long-form per-class means (layer, unit, class, mean), kept so CSI over class subsets can be recomputed."""
    frames = []
    for layer, st in stats.items():
        st.check(class_names)
        means = st.means().cpu().numpy()  # [K, U]
        k, u = means.shape
        frames.append(pd.DataFrame({
            "layer": [layer] * (k * u),
            "unit": np.repeat(np.arange(u, dtype=np.int64), k),
            "class": np.tile(np.arange(k, dtype=np.int64), u),
            "mean": means.T.reshape(-1),
        }))
    if not frames:
        return _empty(CLASS_MEANS_COLUMNS)
    return pd.concat(frames, ignore_index=True)[CLASS_MEANS_COLUMNS]


def csi_for_classes(class_means: pd.DataFrame, classes: Sequence[int], *, eps: float = EPS) -> pd.DataFrame:
    """CSI over a subset of classes from stored class means, without a model.

    Groups by every column other than unit/class/mean (e.g. step, layer). Returns those columns plus
    unit, csi, pref_class (an original class index), mu_max, mu_rest, dead (all selected means are
    exactly 0: csi 0, pref_class -1).
    """
    need = {"unit", "class", "mean"}
    if not need <= set(class_means.columns):
        raise CsnError(f"class means table lacks columns {sorted(need - set(class_means.columns))}; pass a class_means table (layer, unit, class, mean).")
    chosen = sorted({int(c) for c in classes})
    if len(chosen) < 2:
        raise CsnError(f"CSI needs at least 2 classes, got {chosen}; choose 2 or more classes.")
    available = set(class_means["class"].unique().tolist())
    absent = [c for c in chosen if c not in available]
    if absent:
        raise CsnError(f"class {absent[0]} is not in the class means table; available classes are {sorted(available)}.")
    keys = [c for c in class_means.columns if c not in need]
    sub = class_means[class_means["class"].isin(chosen)].sort_values(keys + ["unit", "class"], kind="stable")
    k = len(chosen)
    groups = sub[keys + ["unit"]].drop_duplicates(ignore_index=True)
    if len(sub) != len(groups) * k or not (sub["class"].to_numpy().reshape(-1, k) == np.array(chosen)).all():
        raise CsnError("the class means table must hold exactly one mean per (layer, unit, class) for every chosen class; remove duplicates or missing rows.")
    vals = torch.tensor(sub["mean"].to_numpy(dtype=np.float64)).reshape(-1, k, 1)
    r = csi_from_means(vals, eps)
    dead = (vals == 0).all(dim=1).squeeze(1)
    out = groups.copy()
    out["csi"] = torch.where(dead, 0.0, r.csi.squeeze(1)).numpy()
    out["pref_class"] = np.where(dead.numpy(), -1, np.array(chosen, dtype=np.int64)[r.pref_class.squeeze(1).numpy()])
    out["mu_max"] = r.mu_max.squeeze(1).numpy()
    out["mu_rest"] = r.mu_rest.squeeze(1).numpy()
    out["dead"] = dead.numpy()
    return out


def _empty(columns: list[str]) -> pd.DataFrame:
    """An empty frame with the given columns."""
    return pd.DataFrame({c: [] for c in columns})


def class_selectivity(
    model: nn.Module,
    loader: Iterable[Any],
    layers: Sequence[str] | str | None = None,
    num_classes: int | None = None,
    *,
    variant: str = "mean",
    device: torch.device | str | None = None,
    class_names: ClassNames = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per-unit CSI table of a model over an evaluation loader (one streaming eval-mode pass).

    layers: patterns for csn.core.units.resolve_layers (default: the model's declared read points).
    The model's train/eval mode is restored afterwards. See selectivity_frame for the columns.
    """
    if variant not in VARIANTS:
        raise unknown("variant", variant, VARIANTS)
    names = resolve_layers(model, layers)
    stats = collect_class_stats(model, loader, names, num_classes, device=device, progress=progress)
    stage_map = {n: stage_of(model, n) for n in names}
    return selectivity_frame(stats, stage_map, variant, class_names=class_names)


# ------------------------------------------------------------------------------------------------
# the analysis of a run's checkpoints
# ------------------------------------------------------------------------------------------------

SELECTIVITY = TableSpec(
    "selectivity",
    {"step": "int64", "epoch": "float64", "layer": "str", "stage": "str", "unit": "int64", "csi": "float64",
     "pref_class": "int64", "mu_max": "float64", "mu_rest": "float64", "dead": "bool", "eta2": "float64",
     "split": "str", "bn_recalibrated": "int64", "variant": "str", "n_images": "int64"},
    key=("step", "layer"), settings=("split", "variant", "n_images"), row_settings=("bn_recalibrated",),
    same_set=("layer",), flags={"split": "--split", "variant": "--variant", "n_images": "--samples"},
    row_scope={"bn_recalibrated": ("step",)},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/selectivity.parquet: one row per checkpoint and unit."""
CLASS_MEANS = TableSpec("class_means", {"step": "int64", "layer": "str", "unit": "int64", "class": "int64",
                                        "mean": "float64"}, key=("step", "layer"))
"""tables/class_means.parquet: one row per checkpoint, unit and class."""


class SelectivityOptions(Schema):
    """Options of `csn selectivity` (and of the Selectivity analysis)."""

    split: Split = Field("test", description="Evaluation split the class means are taken over (no augmentation).")
    layers: Annotated[tuple[str, ...], CommaList] | None = Field(
        None, description="Read points: module names or globs ('layer2.*', 'features.3'); repeat or comma-separate. "
        "Default: the model's declared read points (every residual block's output).",
        json_schema_extra={"metavar": "PATTERN", "multiple": True})
    variant: Literal["mean", "study"] = Field("mean", description="'mean': csn's CSI (class means, eps 1e-7). "
                                              "'study': the original study's code (class sums, eps 1e-6), for comparison.")
    samples: Samples = Field(None, description="Measure on a fixed random subset of N images of the split (faster, "
                             "noisier) [default: all].", json_schema_extra={"metavar": "N|all"})


@register_analysis()
class Selectivity(Analysis):
    """CSI, eta² and per-class means of every unit at every checkpoint: ONE streaming pass per checkpoint.

    Under torchrun every rank streams its shard of the split and the class statistics are summed, so
    the rows equal one process's.
    """

    name = "selectivity"
    Options = SelectivityOptions
    tables = (SELECTIVITY, CLASS_MEANS)

    def setup(self, ctx: Context) -> None:
        ctx.own["layers"] = resolve_layers(ctx.run.build_model(), self.options.layers)  # unknown pattern: CsnError
        ctx.own["n_images"] = ctx.split_size(self.options.split, self.options.samples)

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        o = self.options
        return {"selectivity": {"split": o.split, "variant": o.variant, "n_images": ctx.own["n_images"]}}

    def sets(self, ctx: Context) -> dict[str, dict[str, Iterable[Any]]]:
        return {"selectivity": {"layer": ctx.own["layers"]}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        keys = pd.DataFrame({"step": np.int64(ckpt.step), "layer": ctx.own["layers"]})
        return {"selectivity": keys.assign(bn_recalibrated=np.int64(ctx.bn[ckpt.step])), "class_means": keys}

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        o = self.options
        am = ctx.model(ckpt)
        loader = ctx.loader(o.split, o.samples)
        with same_outcome(enabled=ctx.shared):  # a bad batch on one rank stops every rank before the reduction
            stats = collect_class_stats(am.model, loader, ctx.own["layers"], ctx.num_classes, device=ctx.device,
                                        desc=f"step {ckpt.step}", progress=ctx.options.progress and is_main())
        if ctx.shared:
            reduce_class_stats(stats)
        stage_map = {n: stage_of(am.model, n) for n in ctx.own["layers"]}
        sel = selectivity_frame(stats, stage_map, o.variant, class_names=ctx.class_names)
        cm = class_means_frame(stats, class_names=ctx.class_names)
        sel.insert(0, "step", np.int64(ckpt.step))
        sel.insert(1, "epoch", float(ckpt.epoch))
        sel["split"] = o.split
        sel["bn_recalibrated"] = np.int64(am.bn_recalibrated)
        sel["variant"] = o.variant
        sel["n_images"] = np.int64(int(next(iter(stats.values())).counts.sum()))
        cm.insert(0, "step", np.int64(ckpt.step))
        return {"selectivity": sel, "class_means": cm}

    def summary(self, rows: Mapping[str, pd.DataFrame]) -> dict[str, float]:
        """Each stage's mean CSI and eta² over its units (dead units included, as in the table)."""
        return stage_summary(rows["selectivity"], ("csi", "eta2"))


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

SUMMARY_COLUMNS = ["step", "epoch", "stage", "csi_mean", "csi_se", "eta2_mean", "eta2_se", "n_units", "n_dead"]
"""Columns every summary has (summarize adds split/variant/bn_recalibrated, summarize_across_runs n_runs)."""


def _require(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise CsnError(f"{what} lacks columns {missing}; pass a table written by `csn selectivity`.")


def summarize(sel: pd.DataFrame, by: str = "stage") -> pd.DataFrame:
    """Per (step, epoch, stage) - or per block with by="layer" - mean CSI and eta^2 with standard errors over units.

    Dead units are excluded from the means and SEs and counted in n_dead (n_units counts all units).
    SE = sample std (ddof=1) / sqrt(live units); NaN with fewer than 2 live units. Also carries
    split, variant and bn_recalibrated (batches used at that step) when the table has them. Rows
    are ordered by step, then by the order stages/layers appear in the table (model order).
    """
    if by not in ("stage", "layer"):
        raise unknown("summary level", by, ["stage", "layer"])
    _require(sel, ["step", "epoch", "stage", "layer", "csi", "eta2", "dead"], "the selectivity table")
    keys = ["step", "epoch", "stage"] + (["layer"] if by == "layer" else [])
    dead = sel["dead"].astype(bool)
    d = sel.assign(_csi=sel["csi"].where(~dead), _eta=sel["eta2"].where(~dead), _dead=dead.astype(np.int64))
    g = d.groupby(keys, sort=False)
    out = g.agg(csi_mean=("_csi", "mean"), _csi_sd=("_csi", "std"), eta2_mean=("_eta", "mean"),
                _eta_sd=("_eta", "std"), n_units=("csi", "size"), n_dead=("_dead", "sum")).reset_index()
    live = (out["n_units"] - out["n_dead"]).clip(lower=1)
    out["csi_se"] = out.pop("_csi_sd") / np.sqrt(live)
    out["eta2_se"] = out.pop("_eta_sd") / np.sqrt(live)
    for col, how in (("split", "first"), ("variant", "first"), ("bn_recalibrated", "max")):
        if col in sel.columns:
            out[col] = g[col].agg(how).to_numpy()
    order = {name: i for i, name in enumerate(dict.fromkeys(sel[by].tolist()))}
    out = out.assign(_o=out[by].map(order)).sort_values(["step", "_o"], kind="stable").drop(columns="_o")
    cols = SUMMARY_COLUMNS[:3] + (["layer"] if by == "layer" else []) + SUMMARY_COLUMNS[3:]
    extra = [c for c in ("split", "variant", "bn_recalibrated") if c in out.columns]
    out = out[cols + extra].reset_index(drop=True)
    return out.astype({"n_units": "int64", "n_dead": "int64"})


def live_unit_means(summary: pd.DataFrame, stages: Sequence[str], by: Sequence[str] = ("step",)) -> pd.DataFrame:
    """Per group of `by`: the mean CSI and eta² over the live units of `stages`, from summarize's per-stage rows (each
    stage's means weighted by its live units, n_units - n_dead). Columns: `by`, csi, eta2."""
    d = summary[summary["stage"].isin(stages)].assign(live=lambda x: (x["n_units"] - x["n_dead"]).clip(lower=0))
    d = d[d["live"] > 0].assign(csi_w=lambda x: x["csi_mean"] * x["live"], eta2_w=lambda x: x["eta2_mean"] * x["live"])
    g = d.groupby(list(by), as_index=False)[["csi_w", "eta2_w", "live"]].sum()
    return g.assign(csi=g["csi_w"] / g["live"], eta2=g["eta2_w"] / g["live"])[[*by, "csi", "eta2"]]


def summarize_across_runs(tables: Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame], *, by: str = "stage",
                   matched: bool = True) -> pd.DataFrame:
    """Across runs (seeds): at each step, the mean over runs of each run's mean CSI / eta^2 and the SE over runs.

    tables: per-run selectivity tables or their `summarize` output. matched=True keeps only the
    (step, stage) points every run has (runs with the same checkpoint schedule match exactly);
    matched=False keeps all, with n_runs saying how many runs each point averages. SE is NaN for
    one run. Columns: those of summarize, plus n_runs (n_units/n_dead are per-run means).
    """
    items = list(tables.items()) if isinstance(tables, Mapping) else [(str(i), t) for i, t in enumerate(tables)]
    if not items:
        raise CsnError("summarize_across_runs needs at least one run's selectivity table.")
    keys = ["step", "stage"] + (["layer"] if by == "layer" else [])
    frames = []
    for name, t in items:
        s = summarize(t, by=by) if "csi" in t.columns else t
        _require(s, SUMMARY_COLUMNS + (["layer"] if by == "layer" else []), f"the summary of run {name}")
        frames.append(s.assign(_run=name))
    allf = pd.concat(frames, ignore_index=True)
    n_total = len(items)
    g = allf.groupby(keys, sort=False)
    out = g.agg(epoch=("epoch", "mean"), csi_mean=("csi_mean", "mean"), _csi_sd=("csi_mean", "std"),
                eta2_mean=("eta2_mean", "mean"), _eta_sd=("eta2_mean", "std"), n_units=("n_units", "mean"),
                n_dead=("n_dead", "mean"), n_runs=("_run", "nunique")).reset_index()
    out["csi_se"] = out.pop("_csi_sd") / np.sqrt(out["n_runs"])
    out["eta2_se"] = out.pop("_eta_sd") / np.sqrt(out["n_runs"])
    if "bn_recalibrated" in allf.columns:
        out["bn_recalibrated"] = g["bn_recalibrated"].max().to_numpy()
    if matched:
        out = out[out["n_runs"] == n_total]
        if out.empty:
            raise CsnError(f"the {n_total} runs share no checkpoint step; train them with the same checkpoint "
                           "schedule, or pass matched=False.")
    level = keys[-1]
    order = {name: i for i, name in enumerate(dict.fromkeys(allf[level].tolist()))}
    out = out.assign(_o=out[level].map(order)).sort_values(["step", "_o"], kind="stable").drop(columns="_o")
    cols = ["step", "epoch", "stage"] + (["layer"] if by == "layer" else []) + SUMMARY_COLUMNS[3:] + ["n_runs"]
    cols += [c for c in ("bn_recalibrated",) if c in out.columns]
    return out[cols].reset_index(drop=True)


def stage_peaks(summary: pd.DataFrame, metric: str = "csi") -> pd.DataFrame:
    """Per stage: value at the first checkpoint (init), the peak (value, step, epoch) and the final value.

    Works on the output of summarize or summarize_across_runs; the peak is the maximum of `{metric}_mean`.
    """
    col = f"{metric}_mean"
    _require(summary, ["step", "epoch", "stage", col], "the summary")
    rows = []
    for stage, d in summary.groupby("stage", sort=False):
        d = d.sort_values("step")
        vals = d[col].to_numpy(dtype=float)
        if np.all(np.isnan(vals)):
            continue
        i = int(np.nanargmax(vals))
        rows.append({"stage": stage, "n_units": int(d["n_units"].iloc[-1]) if "n_units" in d else -1,
                     "init": vals[0], "init_epoch": float(d["epoch"].iloc[0]),
                     "peak": vals[i], "peak_step": int(d["step"].iloc[i]), "peak_epoch": float(d["epoch"].iloc[i]),
                     "final": vals[-1], "final_epoch": float(d["epoch"].iloc[-1])})
    return pd.DataFrame(rows, columns=["stage", "n_units", "init", "init_epoch", "peak", "peak_step", "peak_epoch",
                                       "final", "final_epoch"])


def _fmt(x: float) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def describe_peaks(summary: pd.DataFrame) -> list[str]:
    """Compact lines: per stage, mean CSI at init, its peak (epoch), final value; and final eta^2."""
    peaks = stage_peaks(summary)
    eta = stage_peaks(summary, "eta2").set_index("stage") if "eta2_mean" in summary else None
    lines = []
    width = max((len(str(s)) for s in peaks["stage"]), default=5)
    for r in peaks.itertuples():
        line = (f"{str(r.stage):<{width}}  mean CSI init {_fmt(r.init)}, peak {_fmt(r.peak)} at epoch {r.peak_epoch:.4g} "
                f"(step {r.peak_step}), final {_fmt(r.final)} at epoch {r.final_epoch:.4g}")
        if eta is not None and r.stage in eta.index:
            e = eta.loc[r.stage]
            line += f" | eta^2 init {_fmt(e['init'])}, peak {_fmt(e['peak'])}, final {_fmt(e['final'])}"
        lines.append(line)
    return lines


__all__ = [
    "collect_class_stats", "reduce_class_stats", "selectivity_frame", "class_means_frame", "csi_for_classes",
    "class_selectivity", "SELECTIVITY", "CLASS_MEANS", "SelectivityOptions", "Selectivity", "SUMMARY_COLUMNS",
    "summarize", "summarize_across_runs", "live_unit_means", "stage_peaks", "describe_peaks",
]
