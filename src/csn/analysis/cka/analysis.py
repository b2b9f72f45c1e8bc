"""Representational similarity (linear CKA) over a run's checkpoints, or between two runs: `csn cka`.

The estimator lives in csn.analysis.cka.estimator (unbiased minibatch HSIC, Nguyen, Raghu &
Kornblith 2021, after Kornblith et al. 2019; accumulated in float64). Features are per-unit
activations (csn.core.units: the spatial mean of each channel, one value per unit and image), plus
the model output under the layer name "logits". Three comparisons, all on the evaluation data of
run A (no augmentation):

  within   all layer x layer pairs of one checkpoint (default layers: the declared read points + logits)
  across   each layer at each checkpoint vs the same layer at a reference checkpoint of the same run
           (comparison "reference"; default the last checkpoint) and vs the previous checkpoint of the
           run (comparison "previous"; skipped with previous=False)
  runs     each layer of run A vs the same layer of run B at matched checkpoints: B's checkpoint at
           the same step, or, where B has no such step, B's checkpoint nearest in epoch (epoch_b says
           which). Both runs must have been trained on the same data.

Each model is its checkpoint's analysis model (csn.analysis.base: BatchNorm statistics re-estimated
before epoch 1 by default), recorded in bn_recalibrated (A at step_a) and bn_recalibrated_b (B at
step_b). Features of one checkpoint are computed in one pass and reused by every comparison that
needs them (the reference and the previous checkpoint are not recomputed).

    tables/cka.parquet (in run A)   run_a, step_a, layer_a, run_b, step_b, layer_b, cka, epoch_a, epoch_b,
                                    comparison, split, samples, bn_recalibrated, bn_recalibrated_b

run_a / run_b are run directory names (when the two names are equal, run_b is the shortest tail of
B's path that differs from A's, e.g. "reg/s0" vs run_a "s0"). Resume: a (comparison, run_b, step_a,
step_b) is done when the table holds all its requested layer pairs; missing ones are computed and
the table rewritten atomically after each checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
from pydantic import BeforeValidator, Field
from torch import Tensor

from csn.analysis.base import Analysis, Context, Samples, Split
from csn.analysis.cka.estimator import (
    _SMALL,
    LOGITS,
    CKAAccumulator,
    cka_blocks,
    collect_features,
    resolve_cka_layers,
)
from csn.analysis.registry import register_analysis
from csn.core.schema import CommaList, Int, Schema
from csn.dist import all_reduce_tensors, is_dist, same_outcome
from csn.errors import CsnError
from csn.runs.run import Checkpoint, Run, nearest_checkpoint, select_checkpoints
from csn.runs.table import TableSpec

MODES = ("within", "across", "runs")
COMPARISONS = ("within", "reference", "previous", "runs")

CKA = TableSpec(
    "cka",
    {"run_a": "str", "step_a": "int64", "layer_a": "str", "run_b": "str", "step_b": "int64", "layer_b": "str",
     "cka": "float64", "epoch_a": "float64", "epoch_b": "float64", "comparison": "str", "split": "str",
     "samples": "int64", "bn_recalibrated": "int64", "bn_recalibrated_b": "int64"},
    key=("comparison", "run_b", "step_a", "step_b", "layer_a", "layer_b"), settings=("split", "samples"),
    row_settings=("bn_recalibrated", "bn_recalibrated_b"), step="step_a",
    row_scope={"bn_recalibrated": ("step_a",), "bn_recalibrated_b": ("run_b", "step_b")},
    flags={"split": "--split", "samples": "--samples", "bn_recalibrated": "--bn-recalibrate",
           "bn_recalibrated_b": "--bn-recalibrate"},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches",
            "bn_recalibrated_b": "BatchNorm statistics of run B re-estimated from {} batches"})
"""tables/cka.parquet (in run A): one row per compared pair of layers."""


# ------------------------------------------------------------------------------------------------
# options
# ------------------------------------------------------------------------------------------------

def _run_path(v: Any) -> Any:
    """A Run given as the second run means its directory."""
    return v.path if isinstance(v, Run) else v


class CkaOptions(Schema):
    """Options of `csn cka` (and of the Cka analysis)."""

    mode: Literal["within", "across", "runs"] | None = Field(
        None, description="within: every layer pair of each checkpoint; across: each layer vs itself at a reference "
        "checkpoint (and the previous one); runs: each layer of RUN vs the same layer of RUN_B at matched checkpoints. "
        "[default: runs with RUN_B, else within]")
    layers: Annotated[tuple[str, ...], CommaList] | None = Field(
        None, description="Module names or globs ('layer2.*'), 'logits' for the output; repeat or comma-separate. "
        "Default: the declared read points (every residual block's output) + logits.",
        json_schema_extra={"metavar": "PATTERN", "multiple": True})
    reference: str = Field(
        "last", description="Reference checkpoint for --mode across: first, last (= end), or the checkpoint nearest a "
        "point in training: step=64, an epoch (2) or a fraction (f0.5).", json_schema_extra={"metavar": "TIME"})
    previous: bool = Field(True, description="With --mode across, also compare each checkpoint with the previous "
                           "one of the run.")
    samples: Samples = Field(None, description="A seeded subset of N examples of the split [default: all].",
                             json_schema_extra={"metavar": "N|all"})
    split: Split = Field("test", description="Evaluation split of RUN (no augmentation); RUN_B is evaluated on the "
                         "same data.")
    batch_size: Int | None = Field(None, ge=4, description="Examples per minibatch of the estimator (> 3: the unbiased "
                                   "HSIC estimator divides by n-3) [default: the run's eval_batch_size].",
                                   json_schema_extra={"metavar": "N"})
    run_b: Annotated[Path | None, BeforeValidator(_run_path)] = Field(
        None, description="The second run of --mode runs (the command line's RUN_B argument).")


# ------------------------------------------------------------------------------------------------
# runs, checkpoints and the cross-rank reduction
# ------------------------------------------------------------------------------------------------

def run_label(run_a: Run, run_b: Run) -> str:
    """How run B is named in run A's table: its directory name, or (names equal) the shortest differing path tail."""
    if run_b.path.resolve() == run_a.path.resolve():
        return run_a.name
    pa, pb = run_a.path.resolve().parts, run_b.path.resolve().parts
    for k in range(1, len(pb) + 1):
        if pb[-k:] != pa[-k:]:
            return "/".join(pb[-k:])
    return str(run_b.path.resolve())


_DATA_KEYS = ("name", "num_classes", "in_channels", "image_size", "num_train", "num_test", "class_names")
_CONFIG_KEYS = ("dataset", "data_root", "synthetic", "train_samples", "test_samples")


def check_same_data(run_a: Run, run_b: Run) -> None:
    """Raise a CsnError naming the first difference if the two runs were not trained on the same data."""
    da, db = run_a.info.get("data", {}), run_b.info.get("data", {})
    diffs = [(k, da.get(k), db.get(k)) for k in _DATA_KEYS]
    diffs += [(k, getattr(run_a.config, k, None), getattr(run_b.config, k, None)) for k in _CONFIG_KEYS]
    for k, a, b in diffs:
        if a != b:
            raise CsnError(f"runs {run_a.name} and {run_b.name} use different data ({k}: {a!r} vs {b!r}); CKA between "
                           "runs needs both trained on the same dataset.")


def match_checkpoints(ckpts_a: Sequence[Checkpoint], ckpts_b: Sequence[Checkpoint]) -> list[tuple[Checkpoint, Checkpoint, bool]]:
    """(A's checkpoint, B's matched checkpoint, matched by step?) for each of A's: same step, else nearest epoch."""
    if not ckpts_b:
        raise CsnError("run B has no checkpoints yet; train it first with `csn train`.")
    by_step = {c.step: c for c in ckpts_b}
    out = []
    for c in ckpts_a:
        if c.step in by_step:
            out.append((c, by_step[c.step], True))
        else:
            out.append((c, nearest_checkpoint(ckpts_b, epoch=c.epoch), False))
    return out


def resolve_reference(run: Run, reference: str | int | None) -> Checkpoint:
    """The reference checkpoint of the across comparison: one point in training (csn.core.times: first, last/end,
    step=N, an epoch E, a fraction fF; the nearest checkpoint), default the last."""
    ref = "last" if reference is None else str(reference).strip()
    if "," in ref or ":" in ref or ref.lower() == "all":
        raise CsnError(f"--reference {ref!r} must name one checkpoint: first, last, step=64, an epoch (2) or f0.5.")
    return select_checkpoints(run.checkpoints, ref, total=run.info.get("total_steps"),
                              steps_per_epoch=run.info.get("steps_per_epoch"), what="--reference")[0]


def reduce_cka(acc: CKAAccumulator) -> CKAAccumulator:
    """Sum a CKAAccumulator's HSIC terms and batch count across torchrun ranks in place; returns it."""
    all_reduce_tensors(acc.tensors())
    return acc


# ------------------------------------------------------------------------------------------------
# the analysis of a run's checkpoints
# ------------------------------------------------------------------------------------------------

@dataclass
class _Request:
    """What setup resolved for one run A: layers, mode, run B, and which checkpoints each checkpoint meets."""

    names: list[str]
    mode: str
    run_b: Run | None
    label_b: str
    ref: Checkpoint | None
    n: int                               # examples of the split (or of its seeded subset)
    batch_size: int
    previous: dict[int, Checkpoint]      # across: A's step -> A's previous checkpoint
    matched: dict[int, Checkpoint]       # runs: A's step -> B's matched checkpoint


Job = tuple[str, Checkpoint, list[tuple[str, str]]]
"""(comparison, the checkpoint compared with (of B, or of A), layer pairs)."""
Features = tuple[list[list[Tensor]], int]
"""(per batch, per layer features; BN batches of the model they came from)."""


def _second_run(mode: str, run_b: Path | None) -> Run | None:
    """Run B, checked against the mode."""
    if mode == "runs" and run_b is None:
        raise CsnError("--mode runs compares two runs; pass RUN_B after RUN.")
    if mode != "runs" and run_b is not None:
        raise CsnError(f"RUN_B is only used with --mode runs (got --mode {mode}); drop RUN_B or pass --mode runs.")
    return None if run_b is None else Run(run_b)


def _check_run_b(run_a: Run, run_b: Run, names: Sequence[str]) -> None:
    """Run B was trained on the same data and has every layer compared."""
    check_same_data(run_a, run_b)
    modules = dict(run_b.build_model().named_modules())
    missing = [n for n in names if n != LOGITS and n not in modules]
    if missing:
        raise CsnError(f"run {run_b.name} has no layer {missing[0]!r}; compare layers both models have (pass --layers).")


@register_analysis(label="CKA")
class Cka(Analysis):
    """Linear CKA within a checkpoint, across a run's checkpoints, or between two runs at matched checkpoints.

    Under torchrun every rank computes the features of its shard of whole batches (the
    single-process batches) and the HSIC sums are all-reduced, so the rows equal one process's.
    """

    name = "cka"
    Options = CkaOptions
    tables = (CKA,)

    def __init__(self, options: CkaOptions | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self._requests: dict[Path, _Request] = {}
        self._cache: dict[tuple[Path, int], Features] = {}  # A's features the next checkpoints reuse

    def _request(self, ctx: Context) -> _Request:
        return self._requests[ctx.run.path.resolve()]

    def setup(self, ctx: Context) -> None:
        o, run = self.options, ctx.run
        mode = o.mode or ("runs" if o.run_b is not None else "within")
        run_b = _second_run(mode, o.run_b)
        bs = o.batch_size or run.config.eval_batch_size
        if bs <= 3:
            raise CsnError(f"{_SMALL} (the unbiased HSIC estimator divides by n-3); got a batch size of {bs}, pass "
                           "--batch-size 4 or more (hundreds give stable estimates).")
        names = resolve_cka_layers(run.build_model(), o.layers)
        if run_b is not None:
            _check_run_b(run, run_b, names)
        if mode != "across" and o.reference != "last":
            raise CsnError(f"--reference {o.reference} applies to --mode across only (this is --mode {mode}); drop it, or "
                           "pass --mode across.")
        ref = resolve_reference(run, o.reference) if mode == "across" else None
        n = ctx.split_size(o.split, o.samples)
        if n <= 3:
            raise CsnError(f"{_SMALL}; the evaluation data has only {n} examples, pass --samples 4 or more.")
        all_a = run.checkpoints
        previous = {c.step: all_a[i - 1] for i, c in enumerate(all_a) if i > 0} if mode == "across" and o.previous else {}
        matched = self._match(ctx, run_b) if mode == "runs" else {}
        label_b = run_label(run, run_b) if run_b is not None else run.name
        self._requests[run.path.resolve()] = _Request(names, mode, run_b, label_b, ref, n, bs, previous, matched)
        self._cache.clear()

    @staticmethod
    def _match(ctx: Context, run_b: Run) -> dict[int, Checkpoint]:
        """B's checkpoint for each selected checkpoint of A; one note when some are matched by epoch."""
        matches = match_checkpoints(ctx.checkpoints, run_b.checkpoints)
        by_epoch = [(a, b) for a, b, exact in matches if not exact]
        if by_epoch:
            (a, b), k = by_epoch[0], len(by_epoch)
            ctx.log(f"{k} checkpoint{'s' if k != 1 else ''} of {ctx.run.name} have no checkpoint at the same step in "
                    f"{run_b.name}; matched to the nearest epoch instead (e.g. step {a.step} epoch {a.epoch:g} -> "
                    f"step {b.step} epoch {b.epoch:g})")
        return {a.step: b for a, b, _ in matches}

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        return {"cka": {"split": self.options.split, "samples": self._request(ctx).n}}

    @staticmethod
    def _jobs(req: _Request, ckpt: Checkpoint) -> list[Job]:
        """What one checkpoint of A is compared with, and on which layer pairs."""
        same = [(name, name) for name in req.names]
        if req.mode == "within":
            return [("within", ckpt, [(a, b) for a in req.names for b in req.names])]
        if req.mode == "runs":
            return [("runs", req.matched[ckpt.step], same)]
        jobs: list[Job] = [("reference", req.ref, same)]
        if ckpt.step in req.previous:
            jobs.append(("previous", req.previous[ckpt.step], same))
        return jobs

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        req = self._request(ctx)
        plan_b = ctx.plan(req.run_b)  # run A's own plan unless comparing with another run
        frames = []
        for cmp, cb, pairs in self._jobs(req, ckpt):
            frames.append(pd.DataFrame({
                "comparison": cmp, "run_b": req.label_b, "step_a": np.int64(ckpt.step), "step_b": np.int64(cb.step),
                "layer_a": [a for a, _ in pairs], "layer_b": [b for _, b in pairs],
                "bn_recalibrated": np.int64(ctx.bn[ckpt.step]), "bn_recalibrated_b": np.int64(plan_b[cb.step])}))
        return {"cka": pd.concat(frames, ignore_index=True)}

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The comparisons of `ckpt` the table lacks (each over all its layer pairs), features reused where kept."""
        req, o = self._request(ctx), self.options
        todo = {(c, int(s)) for c, s in zip(missing["cka"]["comparison"], missing["cka"]["step_b"])}
        loader = ctx.loader(o.split, o.samples, batch_size=req.batch_size, whole_batches=True)
        fa = self._features(ctx, ctx.run, ckpt, loader, keep=True)
        rows = [self._job_rows(ctx, req, ckpt, job, fa, loader) for job in self._jobs(req, ckpt)
                if (job[0], job[1].step) in todo]
        keep = set() if req.ref is None else {req.ref.step} | ({ckpt.step} if req.previous else set())
        for key in [k for k in self._cache if k[0] == ctx.run.path.resolve() and k[1] not in keep]:
            del self._cache[key]
        return {"cka": CKA.frame(pd.concat(rows, ignore_index=True))}

    def _features(self, ctx: Context, run: Run, ckpt: Checkpoint, loader: Any, *, keep: bool,
                  other: bool = False) -> Features:
        """Features of every layer at a checkpoint of run A (or of run B), from the cache when kept there.

        other=True: a checkpoint other than the one computed (errors then name its run and step).
        """
        key = (run.path.resolve(), ckpt.step)
        if key in self._cache:
            return self._cache[key]
        try:
            am = ctx.model(ckpt, run)
            with same_outcome(enabled=ctx.shared):  # a bad batch on one rank stops every rank before the reduction
                feats = collect_features(am.model, loader, self._request(ctx).names, ctx.device)
        except CsnError as e:
            if not other:
                raise
            raise CsnError(f"run {run.name}, checkpoint step {ckpt.step}: {e}") from None
        out = (feats, am.bn_recalibrated)
        if keep:
            self._cache[key] = out
        return out

    def _job_rows(self, ctx: Context, req: _Request, ckpt: Checkpoint, job: Job, fa: Features,
                  loader: Any) -> pd.DataFrame:
        """The rows of one comparison of `ckpt`: every layer pair of the job."""
        cmp, cb, pairs = job
        m, names = len(req.names), req.names
        reduce = reduce_cka if ctx.shared and is_dist() else None
        if cmp == "within":
            mat = cka_blocks(fa[0], num_layers=m, reduce=reduce)
            vals = {(a, b): float(mat[i, j]) for i, a in enumerate(names) for j, b in enumerate(names)}
            bn_b = fa[1]
        else:
            run = req.run_b if cmp == "runs" else ctx.run
            fb, bn_b = self._features(ctx, run, cb, loader, keep=cmp != "runs", other=True)
            mat = cka_blocks(fa[0], fb, num_layers=m, reduce=reduce)
            vals = {(name, name): float(mat[i, m + i]) for i, name in enumerate(names)}
        return pd.DataFrame({
            "run_a": ctx.run.name, "step_a": ckpt.step, "layer_a": [a for a, _ in pairs], "run_b": req.label_b,
            "step_b": cb.step, "layer_b": [b for _, b in pairs], "cka": [vals[p] for p in pairs],
            "epoch_a": float(ckpt.epoch), "epoch_b": float(cb.epoch), "comparison": cmp, "split": self.options.split,
            "samples": req.n, "bn_recalibrated": fa[1], "bn_recalibrated_b": bn_b})


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

def cka_matrix(df: pd.DataFrame, step: int | None = None) -> pd.DataFrame:
    """The within-checkpoint layer x layer CKA matrix at a step (default: the last one in the table)."""
    d = df[df["comparison"] == "within"]
    if d.empty:
        raise CsnError("the table has no within-checkpoint rows; run `csn cka RUN --mode within` first.")
    step = int(d["step_a"].max()) if step is None else int(step)
    d = d[d["step_a"] == step]
    if d.empty:
        raise CsnError(f"no within-checkpoint CKA at step {step}; steps in the table: "
                       f"{', '.join(str(s) for s in sorted(set(df['step_a'])))}.")
    order = list(dict.fromkeys(d["layer_a"].tolist()))
    return d.pivot(index="layer_a", columns="layer_b", values="cka").loc[order, order]


def _describe_within(d: pd.DataFrame) -> list[str]:
    """The layer x layer matrix of the last checkpoint, as lines."""
    last = int(d["step_a"].max())
    mat = cka_matrix(d, last)
    ep = float(d.loc[d["step_a"] == last, "epoch_a"].iloc[0])
    lines = [f"within step {last} (epoch {ep:g}), layer x layer:"]
    w = max(len(str(x)) for x in mat.index)
    lines.append(" " * (w + 2) + " ".join(f"{str(c)[-8:]:>8}" for c in mat.columns))
    for r, vals in mat.iterrows():
        lines.append(f"  {r!s:<{w}}" + " ".join(f"{v:8.3f}" for v in vals.to_numpy(dtype=float)))
    return lines


def _describe_curves(cmp: str, d: pd.DataFrame) -> list[str]:
    """Per layer: CKA at the first checkpoint, its minimum and the last value (one comparison)."""
    title = {"reference": "vs reference step {}", "previous": "vs previous checkpoint", "runs": "vs run {}"}[cmp]
    if cmp == "reference":
        title = title.format(", ".join(str(s) for s in sorted(set(d["step_b"]))))
    elif cmp == "runs":
        title = title.format(", ".join(sorted(set(d["run_b"]))))
    lines = [f"{title}:"]
    w = max(len(str(x)) for x in d["layer_a"])
    for layer in dict.fromkeys(d["layer_a"].tolist()):
        s = d[d["layer_a"] == layer].sort_values("step_a")
        v, e = s["cka"].to_numpy(dtype=float), s["epoch_a"].to_numpy(dtype=float)
        if np.all(np.isnan(v)):
            lines.append(f"  {layer:<{w}}  nan")
            continue
        lo = int(np.nanargmin(v))
        lines.append(f"  {layer:<{w}}  first {v[0]:.3f} (epoch {e[0]:.3g}), min {v[lo]:.3f} (epoch {e[lo]:.3g}), "
                     f"last {v[-1]:.3f} (epoch {e[-1]:.3g})")
    return lines


def describe_cka(df: pd.DataFrame) -> list[str]:
    """Compact lines for the CLI: per comparison and layer (pair), CKA at the first checkpoint, its min, and the last."""
    lines: list[str] = []
    if df is None or df.empty:
        return lines
    for cmp in COMPARISONS:
        d = df[df["comparison"] == cmp]
        if not d.empty:
            lines += _describe_within(d) if cmp == "within" else _describe_curves(cmp, d)
    return lines


_NEEDED = ["step_a", "epoch_a", "layer_a", "step_b", "epoch_b", "layer_b", "cka", "comparison"]


def comparison_rows(df: pd.DataFrame, comparison: str, hint: str) -> pd.DataFrame:
    """The rows of one comparison of a CKA table; a CsnError naming the command to run when there are none."""
    if df is None or len(df) == 0:
        raise CsnError(f"no CKA rows to plot; run `{hint}` first.")
    miss = [c for c in _NEEDED if c not in df.columns]
    if miss:
        raise CsnError(f"the CKA table lacks columns {miss}; pass a table written by `csn cka`.")
    d = df[df["comparison"] == comparison]
    if d.empty:
        raise CsnError(f"the CKA table has no '{comparison}' rows; run `{hint}` first.")
    return d


def _run_pairs(tables: pd.DataFrame | Mapping[Any, pd.DataFrame] | Sequence[pd.DataFrame]) -> list[pd.DataFrame]:
    """The same-layer 'runs' rows of each run pair (each run_b of each table is a pair)."""
    if isinstance(tables, pd.DataFrame):
        items = [tables]
    elif isinstance(tables, Mapping):
        items = list(tables.values())
    else:
        items = list(tables)
    out = []
    for t in items:
        d = comparison_rows(t, "runs", "csn cka RUN_A RUN_B")
        for _, g in d.groupby("run_b", sort=False):
            out.append(g[g["layer_a"] == g["layer_b"]])
    return out


def summarize_cka_runs(tables: pd.DataFrame | Mapping[Any, pd.DataFrame] | Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean and SE over run pairs of the same-layer CKA per (step_a, layer), at steps every pair has.

    tables: one CKA table (each run_b in it is a pair) or a list/dict of them (e.g. one per seed pair).
    SE = sample std (ddof=1) over pairs / sqrt(pairs). Columns: step_a, epoch_a, layer, mean, se, n_pairs.
    """
    parts = [p.assign(_pair=i) for i, p in enumerate(_run_pairs(tables))]
    allp = pd.concat(parts, ignore_index=True)
    g = allp.groupby(["step_a", "layer_a"], sort=False)
    out = g.agg(epoch_a=("epoch_a", "mean"), mean=("cka", "mean"), _sd=("cka", "std"),
                n_pairs=("_pair", "nunique")).reset_index().rename(columns={"layer_a": "layer"})
    out["se"] = out.pop("_sd") / np.sqrt(out["n_pairs"])
    out = out[out["n_pairs"] == len(parts)]
    return out.sort_values(["step_a"], kind="stable")[["step_a", "epoch_a", "layer", "mean", "se", "n_pairs"]]


__all__ = [
    "CKA",
    "COMPARISONS",
    "MODES",
    "Cka",
    "CkaOptions",
    "check_same_data",
    "cka_matrix",
    "describe_cka",
    "match_checkpoints",
    "reduce_cka",
    "resolve_reference",
    "run_label",
    "summarize_cka_runs",
]
