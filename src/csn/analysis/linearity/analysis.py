"""How linear is the network at every checkpoint of a run: `csn linearity` as an Analysis, and its summaries.

The measures themselves (formulas and sources) live in csn.analysis.linearity.measures; here they run
over a run's checkpoints and fill one tidy table:

    tables/linearity.parquet   step, epoch, measure, value, split, samples, bn_recalibrated

One row per (checkpoint, measure). `samples` is the number of evaluation examples the row's value
was computed on; `bn_recalibrated` the number of training batches used to re-estimate the
checkpoint's BatchNorm statistics (0 = the stored running statistics; csn.core.bn's default policy
re-estimates them before epoch 1). Every model in a comparison (theta_t, theta_0, the previous
checkpoint) is that checkpoint's analysis model under the same policy.

Measures (groups selected with `measures=`):

  linear      (Kalimeris et al. 2019) a softmax-regression classifier L is fit ONCE per run on the
              flattened normalized training inputs and cached in tables/linear_model.safetensors;
              on the whole evaluation split:
                acc                    top-1 accuracy of the network F_t
                linear_agreement       fraction of examples with F_t == L
                linear_acc             accuracy of L on the evaluation split
                mu_y_bits              mu_Y(F_t; L) = I(F_t; Y) - I(F_t; Y | L)   (bits)
                i_fy_bits, i_fy_given_l_bits, i_ly_bits   its parts; I(L; Y) is mu_Y's upper bound
                mu_y_share             mu_Y / I(F_t; Y): the share of what F_t knows about Y that the
                                       linear model explains (Kalimeris et al.: near 1 early, falling
                                       once the network learns non-linear functions). Unlike
                                       linear_agreement, which RISES as both classifiers become
                                       accurate, this is a linearity measure expected to fall.
                                       Noisy while I(F_t; Y) is near its plug-in bias (at initialization).
                linear_model_test_acc  accuracy of L on the test split (the same at every step)
  linearized  (Lee et al. 2019; Fort et al. 2020) f_lin = f(theta_ref) + J(theta_ref)(theta_t - theta_ref)
              by one forward-mode JVP per batch, with theta_ref = theta_0 (the step-0 checkpoint,
              suffix _init) and the previous checkpoint of the run (suffix _prev):
                linearized_agreement_{init,prev}   argmax f_t == argmax f_lin
                linearized_rel_dist_{init,prev}    ||f_t - f_lin||_F / ||f_t - f_ref||_F
  relu        relu_same_as_{init,prev}: fraction of (ReLU output, input) on/off states equal to
              those of theta_0 / the previous checkpoint.

Definitions at the edges: at step 0, theta_t = theta_0, so f_lin = f_0 = f_t: linearized_agreement_init
is 1, relu_same_as_init is 1, and linearized_rel_dist_init is 0/0, recorded as NaN (undefined, not
"perfectly linear"). Every *_prev measure is NaN at the run's first checkpoint (no previous one). The
previous checkpoint is the previous one IN THE RUN, whether or not it is among the selected ones.
Measures that do not apply (a model without nn.ReLU modules) are recorded as NaN.

Cost: the linearized and ReLU measures need a JVP (about three forwards) and a forward per reference
model, so they run on a seeded subset of `samples` examples of the split (DEFAULT_SAMPLES = 2000;
None = the whole split). The linear/information measures use the whole split: they cost one forward
of the network, and plug-in mutual information is biased upward by about
(|F|-1)(|Y|-1)|L| / (2 N ln 2) bits, so they need many examples (about 0.06 bits for N = 10,000 and
10 classes).

Resume (csn.analysis.base.run_analysis): a checkpoint is done when the table has every requested
measure for it; a checkpoint missing any gets all its requested measures computed and written
(atomically), so an interrupted run continues there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from pydantic import AfterValidator, Field
from safetensors import safe_open

from csn.analysis.base import Analysis, AnalysisModel, Context, Samples, Split, note
from csn.analysis.linearity.measures import (
    accuracy,
    fit_linear_classifier,
    linearity_measures,
)
from csn.analysis.registry import register_analysis
from csn.core.schema import CommaList, Int, Schema
from csn.data import DataSplits
from csn.data.loaders import in_memory
from csn.dist import is_dist
from csn.errors import CsnError, unknown
from csn.runs.io import load_tensors, save_tensors
from csn.runs.run import Checkpoint, Run
from csn.runs.table import TableSpec

DEFAULT_SAMPLES = 2000
"""Examples (a seeded subset of the split) for the linearized and ReLU measures; the whole split if smaller."""
LINEAR_MODEL_FILE = "linear_model.safetensors"
"""The cached linear classifier, under the run's tables/ folder."""
LINEAR_FIT_DEFAULTS = {"epochs": 10, "lr": 1e-3, "seed": 0, "batch_size": 256, "weight_decay": 0.0}
"""How the linear classifier is fit: Adam on standardized flattened inputs from zero weights (deterministic)."""

MEASURE_GROUPS: dict[str, tuple[str, ...]] = {
    "linear": ("acc", "linear_agreement", "linear_acc", "mu_y_bits", "i_fy_bits", "i_fy_given_l_bits", "i_ly_bits",
               "mu_y_share", "linear_model_test_acc"),
    "linearized": ("linearized_agreement_init", "linearized_rel_dist_init", "linearized_agreement_prev",
                   "linearized_rel_dist_prev"),
    "relu": ("relu_same_as_init", "relu_same_as_prev"),
}
"""Measure names written for each group (`acc` is always written)."""
ALL_GROUPS = tuple(MEASURE_GROUPS)
SUBSET_MEASURES = ("linearized_", "relu_")
"""Prefixes of the measures computed on the seeded subset of `samples` examples (the rest use the whole split)."""


def check_groups(measures: Sequence[str] | str) -> tuple[str, ...]:
    """Measure groups in canonical order (linear, linearized, relu), duplicates dropped; unknown ones refused."""
    if isinstance(measures, str):
        measures = [m.strip() for m in measures.split(",") if m.strip()]
    out = []
    for m in measures:
        if m not in MEASURE_GROUPS:
            raise unknown("linearity measure group", m, MEASURE_GROUPS)
        if m not in out:
            out.append(m)
    if not out:
        raise CsnError(f"pass at least one linearity measure group ({', '.join(MEASURE_GROUPS)}).")
    return tuple(g for g in ALL_GROUPS if g in out)


def expected_measures(groups: Sequence[str]) -> list[str]:
    """Measure names a checkpoint gets for these groups (always including `acc`)."""
    names = ["acc"]
    for g in check_groups(groups):
        names += [m for m in MEASURE_GROUPS[g] if m not in names]
    return names


# ------------------------------------------------------------------------------------------------
# the linear classifier, fit once per run
# ------------------------------------------------------------------------------------------------

def linear_model_path(run: Run) -> Path:
    """Where the run's linear classifier is cached: RUN/tables/linear_model.safetensors."""
    return run.path / "tables" / LINEAR_MODEL_FILE


def _flat_inputs(split: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x = split.normalize(split.images)
    return x.reshape(x.shape[0], -1), split.labels.long()


def _fit_settings(epochs: int | None, lr: float | None) -> dict[str, Any]:
    fit = dict(LINEAR_FIT_DEFAULTS)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise CsnError(f"--fit-epochs must be a positive integer, got {epochs!r}.")
        fit["epochs"] = int(epochs)
    if lr is not None:
        fit["lr"] = float(lr)
    return fit


def _load_linear_model(path: Path, fit: dict[str, Any], num_classes: int, num_features: int
                       ) -> tuple[torch.nn.Linear, dict]:
    """The cached classifier at `path`, refused when it was fit otherwise or for another input size."""
    fix = "delete it (and tables/linearity.parquet) and run `csn linearity` again to refit."
    tensors = load_tensors(path, what="the cached linear classifier", fix=fix)  # checked against its sha256 sidecar
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["csn_linear_model"])
        weight, bias = tensors["weight"], tensors["bias"]
        if tuple(bias.shape) != (num_classes,) or not isinstance(meta, dict):
            raise ValueError
    except Exception:  # noqa: BLE001 - whatever fails to read it, the file is damaged
        raise CsnError(f"{path} is unreadable or corrupt; {fix}") from None
    if meta.get("fit") != fit or tuple(weight.shape) != (num_classes, num_features):
        raise CsnError(f"{path} was fit with {meta.get('fit')}, but this request asks for {fit}; pass the same "
                       "--fit-epochs, or delete it and tables/linearity.parquet to refit.")
    layer = torch.nn.Linear(num_features, num_classes)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer.requires_grad_(False), meta


def linear_model_for_run(run: Run, data: DataSplits, *, epochs: int | None = None, lr: float | None = None,
                         log: Callable[[str], None] | None = None) -> tuple[torch.nn.Linear, dict]:
    """The run's softmax-regression classifier on flattened normalized inputs: loaded from
    tables/linear_model.safetensors, or fit on the training split (LINEAR_FIT_DEFAULTS, deterministic)
    and saved there atomically. Returns (nn.Linear on CPU, metadata with its train/test accuracy)."""
    fit = _fit_settings(epochs, lr)
    path = linear_model_path(run)
    if not (in_memory(data.train) and in_memory(data.test)):
        raise CsnError(f"the linear-model measure needs an in-memory dataset (run {run.name} uses "
                       f"{data.name}); pass --measures linearized,relu.")
    num_features = int(np.prod(data.train.images.shape[1:]))
    if path.is_file():
        return _load_linear_model(path, fit, data.num_classes, num_features)
    x, y = _flat_inputs(data.train)
    (log or note)(f"fitting the linear classifier of {run.name} on {x.shape[0]} training inputs "
                  f"({fit['epochs']} epochs of Adam, lr {fit['lr']:g}); cached in {path}")
    layer = fit_linear_classifier(x, y, data.num_classes, epochs=fit["epochs"], lr=fit["lr"], seed=fit["seed"],
                                  weight_decay=fit["weight_decay"], batch_size=fit["batch_size"])
    train_acc = accuracy(layer, x, y)
    del x
    xt, yt = _flat_inputs(data.test)
    meta = {"fit": fit, "method": "softmax regression on flattened normalized inputs, standardized per feature, "
                                  "zero init, Adam (csn.analysis.linearity.fit_linear_classifier)",
            "train_examples": int(y.shape[0]), "test_examples": int(yt.shape[0]), "train_acc": train_acc,
            "test_acc": accuracy(layer, xt, yt), "dataset": data.name, "num_features": num_features,
            "fit_in": run.name}  # the run it was fit in (a study shares one fit between its runs)
    save_tensors(path, {"weight": layer.weight, "bias": layer.bias},
                 metadata={"csn_linear_model": json.dumps(meta, sort_keys=True)}, checksum=True)
    return layer, meta


# ------------------------------------------------------------------------------------------------
# the analysis of a run's checkpoints
# ------------------------------------------------------------------------------------------------

LINEARITY = TableSpec(
    "linearity",
    {"step": "int64", "epoch": "float64", "measure": "str", "value": "float64", "split": "str", "samples": "int64",
     "bn_recalibrated": "int64"},
    key=("step", "measure"), settings=("split",), row_settings=("samples", "bn_recalibrated"),
    flags={"split": "--split", "samples": "--samples"}, row_scope={"bn_recalibrated": ("step",)},
    labels={"samples": "{} examples", "bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/linearity.parquet: one row per checkpoint and measure (samples is checked only for the subset measures)."""


class LinearityOptions(Schema):
    """Options of `csn linearity` (and of the Linearity analysis)."""

    measures: Annotated[tuple[str, ...], CommaList, AfterValidator(check_groups)] = Field(
        ALL_GROUPS, description="Comma-separated measure groups: linear, linearized, relu.",
        json_schema_extra={"metavar": "GROUPS"})
    samples: Samples = Field(DEFAULT_SAMPLES, description="Examples (a seeded subset of the split) for the linearized "
                             "and ReLU measures ('all' = the whole split). The linear-model measures always use the "
                             "whole split.", json_schema_extra={"metavar": "N|all"})
    split: Split = Field("test", description="Evaluation split (no augmentation).")
    fit_epochs: Int = Field(LINEAR_FIT_DEFAULTS["epochs"], ge=1, description="Epochs of the linear classifier's "
                            "fit; it is fit once per run and cached.", json_schema_extra={"metavar": "N"})


@dataclass
class LinearityState:
    """What every rank holds while one run is measured: the linear classifier (when the linear group is
    asked for and something is left to do) and this rank's analysis models kept for the next checkpoint."""

    linear: torch.nn.Linear | None = None
    meta: dict | None = None
    last: int | None = None  # the last checkpoint step to compute: the models are released after it
    models: dict[int, AnalysisModel] = field(default_factory=dict)  # theta_0 and the last checkpoint measured


@register_analysis()
class Linearity(Analysis):
    """Agreement with a linear classifier, distance to the linearized network and ReLU-pattern stability at
    every checkpoint (two passes per checkpoint: the whole split, and a seeded subset for the costly measures).

    Under torchrun every rank streams its shard of the split; counts and norms are summed and predictions
    gathered (reduce_linearity), so the rows equal one process's.
    """

    name = "linearity"
    Options = LinearityOptions
    tables = (LINEARITY,)

    @property
    def compares(self) -> bool:
        """Whether a group compares with theta_0 and the previous checkpoint (linearized, relu)."""
        return "linearized" in self.options.measures or "relu" in self.options.measures

    def setup(self, ctx: Context) -> None:
        if self.compares and ctx.run.checkpoints[0].step != 0:
            raise CsnError(f"run {ctx.run.name} has no step-0 checkpoint (the initialization theta_0); the linearized "
                           "and ReLU measures compare with it; pass --measures linear.")

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        return {"linearity": {"split": self.options.split}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        names = expected_measures(self.options.measures)
        n_subset = ctx.split_size(self.options.split, self.options.samples)
        samples = pd.array([n_subset if m.startswith(SUBSET_MEASURES) else None for m in names], dtype="Int64")
        return {"linearity": pd.DataFrame({"step": np.int64(ckpt.step), "measure": names, "samples": samples,
                                           "bn_recalibrated": np.int64(ctx.bn[ckpt.step])})}

    def prepare(self, ctx: Context, todo: Sequence[Checkpoint]) -> LinearityState:
        """Fit or load the run's linear classifier (rank 0), when the linear group has work to do."""
        last = todo[-1].step if todo else None
        if todo and "linear" in self.options.measures:
            linear, meta = linear_model_for_run(ctx.run, ctx.data, epochs=self.options.fit_epochs, log=ctx.log)
            return LinearityState(linear, meta, last)
        return LinearityState(last=last)

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Every requested measure of `ckpt` (all of them when any is missing, as one unit of work)."""
        all_ckpts = ctx.run.checkpoints
        i = next(j for j, c in enumerate(all_ckpts) if c.step == ckpt.step)
        am = self._model(ctx, ckpt)
        model_0 = self._model(ctx, all_ckpts[0]).model if self.compares else am.model
        model_prev = self._model(ctx, all_ckpts[i - 1]).model if i > 0 and self.compares else None
        values: dict[str, tuple[float, int]] = {}
        if "linear" in self.options.measures:
            values.update(self._linear_values(ctx, am.model, model_0))
        if self.compares:
            values.update(self._compare_values(ctx, am.model, model_0, model_prev, has_acc="acc" in values))
        if ckpt.step == all_ckpts[0].step and "linearized" in self.options.measures:
            # theta_t = theta_0: f_lin = f_0 = f_t by definition; the relative distance is 0/0
            n_subset = ctx.split_size(self.options.split, self.options.samples)
            values["linearized_agreement_init"] = (1.0, n_subset)
            values["linearized_rel_dist_init"] = (math.nan, n_subset)
        # keep only what the next checkpoint can reuse: theta_0 and this one (its "previous"); nothing after the last
        keep = () if ckpt.step == ctx.state.last else (all_ckpts[0].step, ckpt.step)
        ctx.state.models = {s: m for s, m in ctx.state.models.items() if s in keep}
        return {"linearity": pd.DataFrame({
            "step": np.int64(ckpt.step), "epoch": float(ckpt.epoch), "measure": list(values),
            "value": [float(v[0]) for v in values.values()], "split": self.options.split,
            "samples": np.array([v[1] for v in values.values()], dtype=np.int64),
            "bn_recalibrated": np.int64(am.bn_recalibrated),
        }, columns=list(LINEARITY.columns))}

    def _model(self, ctx: Context, ckpt: Checkpoint) -> AnalysisModel:
        """The analysis model at `ckpt`, loaded once while theta_0 and the previous checkpoint are reused."""
        if ckpt.step not in ctx.state.models:
            ctx.state.models[ckpt.step] = ctx.model(ckpt)
        return ctx.state.models[ckpt.step]

    def _linear_values(self, ctx: Context, model_t: torch.nn.Module, model_0: torch.nn.Module
                       ) -> dict[str, tuple[float, int]]:
        """The linear group on the whole split: {measure: (value, examples)}."""
        linear, meta = ctx.state.linear.to(ctx.device), ctx.state.meta
        n_split = ctx.split_size(self.options.split)
        out = linearity_measures(model_t, model_0, ctx.loader(self.options.split), linear_model=linear,
                                 linearized=False, relu=False, reduce=ctx.shared and is_dist())
        values: dict[str, tuple[float, int]] = {}
        for k in MEASURE_GROUPS["linear"]:
            if k == "linear_model_test_acc":
                values[k] = (float(meta["test_acc"]), int(meta["test_examples"]))
            elif k == "acc":
                values[k] = (out["test_acc"], n_split)
            elif k == "mu_y_share":
                values[k] = (out["mu_y_bits"] / out["i_fy_bits"] if out["i_fy_bits"] > 0 else math.nan, n_split)
            else:
                values[k] = (out[k], n_split)
        return values

    def _compare_values(self, ctx: Context, model_t: torch.nn.Module, model_0: torch.nn.Module,
                        model_prev: torch.nn.Module | None, *, has_acc: bool) -> dict[str, tuple[float, int]]:
        """The linearized and relu groups (and acc, unless the linear group gave it) on the seeded subset."""
        o = self.options
        n_subset = ctx.split_size(o.split, o.samples)
        out = linearity_measures(model_t, model_0, ctx.loader(o.split, o.samples), model_prev=model_prev,
                                 linearized="linearized" in o.measures, relu="relu" in o.measures,
                                 reduce=ctx.shared and is_dist())
        values = {} if has_acc else {"acc": (out["test_acc"], n_subset)}
        for g in ("linearized", "relu"):
            if g in o.measures:
                for k in MEASURE_GROUPS[g]:
                    values[k] = (out.get(k, math.nan), n_subset)
        return values


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

def summarize_linearity(tables: pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Mean and standard error over runs (seeds) per (step, measure), at the steps every run has.

    tables: one linearity table, or a list / dict of them. Columns: step, epoch, measure, mean, se,
    n_runs, bn_recalibrated (max over runs). With one run, se is NaN.
    """
    if isinstance(tables, pd.DataFrame):
        items = [("0", tables)]
    elif isinstance(tables, dict):
        items = list(tables.items())
    else:
        items = [(str(i), t) for i, t in enumerate(tables)]
    if not items:
        raise CsnError("no linearity tables given; run `csn linearity RUN` first.")
    frames = []
    for name, t in items:
        if t is None or t.empty:
            raise CsnError(f"the linearity table of {name} is empty; run `csn linearity` on it first.")
        miss = [c for c in ("step", "epoch", "measure", "value") if c not in t.columns]
        if miss:
            raise CsnError(f"the linearity table of {name} lacks columns {miss}; pass a table written by "
                           "`csn linearity`.")
        frames.append(t.assign(_run=name))
    allf = pd.concat(frames, ignore_index=True)
    if "bn_recalibrated" not in allf.columns:
        allf["bn_recalibrated"] = 0
    g = allf.groupby(["step", "measure"], sort=True)
    out = g.agg(epoch=("epoch", "mean"), mean=("value", "mean"), _sd=("value", "std"), n_runs=("_run", "nunique"),
                bn_recalibrated=("bn_recalibrated", "max")).reset_index()
    out["se"] = out.pop("_sd") / np.sqrt(out["n_runs"])
    out = out[out["n_runs"] == len(items)]
    return out[["step", "epoch", "measure", "mean", "se", "n_runs", "bn_recalibrated"]].reset_index(drop=True)


def describe_linearity(tables: pd.DataFrame | Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame],
                       measures: Sequence[str] | None = None) -> list[str]:
    """Compact lines: per measure, its value at the first checkpoint, its max and min (with epochs), and the last."""
    s = summarize_linearity(tables)
    order = [m for names in MEASURE_GROUPS.values() for m in names]
    present = list(dict.fromkeys(["acc"] + [m for m in order if m in set(s["measure"])] +
                                 sorted(set(s["measure"]) - set(order) - {"acc"})))
    if measures is not None:
        present = [m for m in present if m in measures]
    width = max((len(m) for m in present), default=8)
    lines = []
    for m in present:
        d = s[s["measure"] == m].sort_values("step")
        v = d["mean"].to_numpy(dtype=float)
        e = d["epoch"].to_numpy(dtype=float)
        ok = ~np.isnan(v)
        if not ok.any():
            lines.append(f"{m:<{width}}  nan at every checkpoint")
            continue
        if m == "linear_model_test_acc":
            lines.append(f"{m:<{width}}  {v[ok][0]:.3f} (the linear classifier itself)")
            continue
        hi, lo = int(np.nanargmax(v)), int(np.nanargmin(v))
        first = int(np.flatnonzero(ok)[0])
        lines.append(f"{m:<{width}}  first {v[first]:.3f} (epoch {e[first]:.3g}), max {v[hi]:.3f} (epoch {e[hi]:.3g}), "
                     f"min {v[lo]:.3f} (epoch {e[lo]:.3g}), last {v[-1]:.3f} (epoch {e[-1]:.3g})")
    return lines


__all__ = [
    "ALL_GROUPS",
    "DEFAULT_SAMPLES",
    "LINEARITY",
    "LINEAR_FIT_DEFAULTS",
    "LINEAR_MODEL_FILE",
    "MEASURE_GROUPS",
    "Linearity",
    "LinearityOptions",
    "LinearityState",
    "check_groups",
    "describe_linearity",
    "expected_measures",
    "linear_model_for_run",
    "linear_model_path",
    "summarize_linearity",
]
