"""Class selectivity of every unit at every checkpoint of a run: the resumable driver of `csn selectivity`.

For each selected checkpoint: the model from `analysis_model` (BatchNorm statistics re-estimated by
the default policy for checkpoints before epoch 1, see csn.analysis.common), then ONE streaming
eval-mode pass over the split (`collect_class_stats`: per-class sums, sums of squares and counts,
never per-image activations), from which CSI, eta^2 and the per-class means follow. Rows go to

    tables/selectivity.parquet  step, epoch, layer, stage, unit, csi, pref_class, mu_max, mu_rest,
                                dead, eta2, split, bn_recalibrated, variant, n_images
    tables/class_means.parquet  step, layer, unit, class, mean

Resume: a checkpoint is done when its rows are in BOTH tables; after each checkpoint class_means is
written first and selectivity second (each atomically), and on start class-means rows of a step
that is missing from selectivity (a crash between the two writes) are dropped. So the tables only
ever hold complete checkpoints, and re-running the same command continues where it stopped.

A table holds one configuration (split, variant, layers, BN policy); to keep another beside it
(e.g. `--bn-recalibrate 0` for comparison) give it a tag: tables/selectivity-TAG.parquet.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from csn import distributed
from csn import units as _units
from csn.analysis.common import (
    BN_DEFAULT_BEFORE_EPOCH,
    DEFAULT_BN_BATCHES,
    analysis_model,
    bn_batches_for,
    bn_loader,
    class_stats_of_split,
    note,
    split_of,
)
from csn.errors import CsnError, unknown
from csn.runs import Checkpoint, Run
from csn.selectivity import VARIANTS, class_means_frame, selectivity_frame

SELECTIVITY_TABLE_COLUMNS = [
    "step", "epoch", "layer", "stage", "unit", "csi", "pref_class", "mu_max", "mu_rest", "dead", "eta2",
    "split", "bn_recalibrated", "variant", "n_images",
]
"""Columns of tables/selectivity.parquet (one row per checkpoint and unit)."""

CLASS_MEANS_TABLE_COLUMNS = ["step", "layer", "unit", "class", "mean"]
"""Columns of tables/class_means.parquet (one row per checkpoint, unit and class)."""

SUMMARY_COLUMNS = ["step", "epoch", "stage", "csi_mean", "csi_se", "eta2_mean", "eta2_se", "n_units", "n_dead"]
"""Columns every summary has (summarize adds split/variant/bn_recalibrated, summarize_runs n_runs)."""

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def table_names(tag: str | None = None) -> tuple[str, str]:
    """(selectivity table, class-means table) names: 'selectivity'/'class_means', or with '-TAG' appended."""
    if tag is None or tag == "":
        return "selectivity", "class_means"
    if not _TAG.match(str(tag)):
        raise CsnError(f"table tag {tag!r} must be letters, digits, '_', '-' or '.', e.g. 'nobn'.")
    return f"selectivity-{tag}", f"class_means-{tag}"


def load_selectivity(run: Run | str | os.PathLike, tag: str | None = None) -> pd.DataFrame | None:
    """The run's selectivity table (None when `csn selectivity` has not written it yet)."""
    run = run if isinstance(run, Run) else Run(run)
    return run.read(table_names(tag)[0])


# ------------------------------------------------------------------------------------------------
# one checkpoint
# ------------------------------------------------------------------------------------------------

def checkpoint_selectivity(
    run: Run,
    ckpt: Checkpoint,
    data,
    layers: Sequence[str],
    *,
    split: str = "test",
    bn_recalibrate: int | None = None,
    device: str | torch.device = "cpu",
    variant: str = "mean",
    samples: int | None = None,
    progress: bool = False,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(selectivity rows, class-means rows) of one checkpoint from one streaming pass over the split
    (or over a fixed seeded subset of `samples` images of it). Under torchrun every rank calls this
    for the same checkpoint, streams its shard of the split, and gets the rows of the whole split.

    Errors (NaN/inf activations, labels out of range, a corrupt checkpoint) are re-raised as one
    CsnError that names the run and the checkpoint step; nothing is written here.
    """
    info = run.info.get("data", {})
    num_classes = int(info["num_classes"]) if "num_classes" in info else None
    class_names = info.get("class_names") or None
    try:
        am = analysis_model(run, ckpt, data, bn_recalibrate=bn_recalibrate, device=device)
        model = am.model
        # the number of batches actually used (fewer than asked when the training split is small)
        n_bn = am.bn_recalibrated
        stage_map = {n: _units.stage_of(model, n) for n in layers}
        stats = class_stats_of_split(run, data, model, split, list(layers), num_classes, device=device,
                                    samples=samples, desc=f"step {ckpt.step}", progress=progress)
        sel = selectivity_frame(stats, stage_map, variant, class_names=class_names)
        cm = class_means_frame(stats, class_names=class_names)
    except CsnError as e:
        raise CsnError(f"run {run.name}, checkpoint step {ckpt.step} (epoch {ckpt.epoch:g}): {e}") from None
    sel.insert(0, "step", np.int64(ckpt.step))
    sel.insert(1, "epoch", float(ckpt.epoch))
    sel["split"] = split
    sel["bn_recalibrated"] = np.int64(n_bn)
    sel["variant"] = variant
    sel["n_images"] = np.int64(int(next(iter(stats.values())).counts.sum()) if stats else 0)
    cm.insert(0, "step", np.int64(ckpt.step))
    sel = sel.astype({"step": "int64", "bn_recalibrated": "int64", "unit": "int64", "pref_class": "int64",
                      "n_images": "int64"})
    cm = cm.astype({"step": "int64", "unit": "int64", "class": "int64"})
    return sel[SELECTIVITY_TABLE_COLUMNS], cm[CLASS_MEANS_TABLE_COLUMNS]


# ------------------------------------------------------------------------------------------------
# a whole run, resumable
# ------------------------------------------------------------------------------------------------

def _merge(existing: pd.DataFrame | None, new: pd.DataFrame) -> pd.DataFrame:
    """existing + new, where new replaces existing rows of the same steps; sorted by step (stable)."""
    if existing is None or existing.empty:
        return new.reset_index(drop=True)
    keep = existing[~existing["step"].isin(new["step"].unique())]
    out = pd.concat([keep, new], ignore_index=True)
    return out.sort_values("step", kind="stable").reset_index(drop=True)


def _load_consistent(run: Run, sel_name: str, cm_name: str) -> tuple[pd.DataFrame | None, pd.DataFrame | None, set]:
    """Both tables as they are, with class-means rows of unfinished steps dropped; and the done steps."""
    sel = run.read(sel_name)
    cm = run.read(cm_name)
    for df, name, cols in ((sel, sel_name, SELECTIVITY_TABLE_COLUMNS), (cm, cm_name, CLASS_MEANS_TABLE_COLUMNS)):
        if df is not None and not set(cols) <= set(df.columns):
            missing = sorted(set(cols) - set(df.columns))
            raise CsnError(f"{run.table_path(name)} lacks columns {missing} (written by an older csn?); "
                           "delete it and run `csn selectivity` again.")
    sel_steps = set() if sel is None else set(sel["step"].unique().tolist())
    cm_steps = set() if cm is None else set(cm["step"].unique().tolist())
    if cm is not None and cm_steps - sel_steps:
        cm = cm[cm["step"].isin(sel_steps)].reset_index(drop=True)
        run.write(cm_name, cm)  # a crash between the two writes left class means of an unfinished step
    return sel, cm, sel_steps & cm_steps


def _check_compatible(run: Run, sel_name: str, sel: pd.DataFrame | None, *, split: str, variant: str,
                      layers: Sequence[str], expected_bn: Mapping[int, int], done: set, n_images: int | None) -> None:
    """Refuse to mix configurations in one table (the message says how to keep a second one)."""
    if sel is None or sel.empty:
        return
    path = run.table_path(sel_name)
    hint = "pass --tag NAME to keep a separate table, or delete the table to recompute it"
    for col, want in (("split", split), ("variant", variant)):
        have = sorted(set(sel[col].astype(str).unique().tolist()))
        if have != [want]:
            raise CsnError(f"{path} holds {col}={','.join(have)} but this request asks for {col}={want}; {hint}.")
    have_n = sorted(set(sel["n_images"].astype(int).tolist()))
    if n_images is not None and have_n != [n_images]:
        raise CsnError(f"{path} was computed over {','.join(map(str, have_n))} images of the split but this request "
                       f"uses {n_images} (--samples); {hint}.")
    have_layers = list(dict.fromkeys(sel["layer"].tolist()))
    if set(have_layers) != set(layers):
        raise CsnError(f"{path} holds layers {', '.join(have_layers)} but this request reads {', '.join(layers)}; {hint}.")
    recorded = sel.groupby("step")["bn_recalibrated"].first()
    for step, want in sorted(expected_bn.items()):
        if step in done and int(recorded.get(step, want)) != want:
            raise CsnError(
                f"{path} holds step {step} with BatchNorm statistics re-estimated from {int(recorded[step])} batches, "
                f"but this request asks for {want}; {hint} (e.g. --bn-recalibrate 0 --tag nobn)."
            )


def _num_batches(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _bn_plan(run: Run, data, ckpts: Sequence[Checkpoint], bn_recalibrate: int | None, has_bn: bool,
             device) -> dict[int, int]:
    """Batches that BN re-estimation will actually use at each checkpoint (0 = off or no BatchNorm)."""
    if not has_bn:
        return {c.step: 0 for c in ckpts}
    plan = {c.step: bn_batches_for(c, bn_recalibrate) for c in ckpts}
    if any(plan.values()):
        avail = _num_batches(bn_loader(run, data, device))
        if avail is not None:
            plan = {s: min(n, avail) for s, n in plan.items()}
    return plan


def _bn_message(plan: Mapping[int, int], todo: Sequence[Checkpoint], bn_recalibrate: int | None) -> str | None:
    """The one line that says BN statistics were re-estimated, for how many checkpoints, and how to turn it off."""
    on = [c for c in todo if plan[c.step] > 0]
    if not on:
        return None
    used = sorted({plan[c.step] for c in on})
    n = used[0] if len(used) == 1 else f"{used[0]}-{used[-1]}"
    short = ""
    asked = DEFAULT_BN_BATCHES if bn_recalibrate is None else bn_recalibrate
    if used[-1] < asked:
        short = f" (the training split has only {used[-1]} batches)"
    what = f"{len(on)} checkpoint{'s' if len(on) != 1 else ''}"
    if bn_recalibrate is None:
        what += f" before epoch {BN_DEFAULT_BEFORE_EPOCH:g}"
    return f"BN statistics re-estimated from {n} training batches{short} for {what} (--bn-recalibrate 0 to turn off)"


def selectivity_for_run(
    run: Run | str | os.PathLike,
    *,
    split: str = "test",
    layers: Sequence[str] | str | None = None,
    checkpoints: str | None = None,
    bn_recalibrate: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    variant: str = "mean",
    tag: str | None = None,
    samples: int | None = None,
    data=None,
    log: Callable[[str], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fill tables/selectivity.parquet and tables/class_means.parquet for the selected checkpoints.

    Checkpoints already in the tables are skipped (resume). bn_recalibrate: None = default policy
    (DEFAULT_BN_BATCHES training batches before epoch 1, off after), 0 = off, N = N batches at every
    checkpoint; the batches used are recorded per row (bn_recalibrated). variant: "mean" (csn's
    CSI) or "study" (the original code's class sums, eps 1e-6). tag writes selectivity-TAG /
    class_means-TAG instead. samples: measure on a fixed seeded random subset of that many images
    of the split (faster, noisier; the n_images column records it; default: the whole split). log receives the one-line BN note (default: stderr). Returns the rows
    of the selected checkpoints of both tables (the full tables stay on disk).
    """
    with distributed.same_outcome():  # validation: a bad request fails on every rank together
        run = run if isinstance(run, Run) else Run(run)
        if variant not in VARIANTS:
            raise unknown("variant", variant, VARIANTS)
        if split not in ("train", "test"):
            raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
        if bn_recalibrate is not None and (isinstance(bn_recalibrate, bool) or not isinstance(bn_recalibrate, int)
                                           or bn_recalibrate < 0):
            raise CsnError(f"--bn-recalibrate must be an integer >= 0 (0 = off), got {bn_recalibrate!r}.")
        sel_name, cm_name = table_names(tag)
        ckpts = run.select(checkpoints)  # no checkpoints / bad selector: CsnError
        model = run.build_model()
        names = _units.resolve_layers(model, layers)  # unknown pattern: CsnError listing names
        from csn.bn import has_batchnorm

        has_bn = has_batchnorm(model)
        del model
        if data is None:
            data = run.dataset()
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples <= 0):
            raise CsnError(f"--samples must be a positive number of images, got {samples!r}.")
        split_obj = split_of(data, split)
        try:
            n_split = len(split_obj)
        except TypeError:
            n_split = None
        n_images = n_split  # what the n_images column will hold
        if samples and n_split is not None:
            n_images = min(samples, n_split)
        progress = progress and not os.environ.get("CSN_NO_PROGRESS")
        plan = _bn_plan(run, data, ckpts, bn_recalibrate, has_bn, device)

    tables: dict[str, pd.DataFrame | None] = {}  # rank 0's copy of both tables (the only rank that writes)

    def prepare() -> list[int]:
        sel_all, cm_all, done = _load_consistent(run, sel_name, cm_name)
        _check_compatible(run, sel_name, sel_all, split=split, variant=variant, layers=names,
                          expected_bn=plan, done=done, n_images=n_images)
        tables.update(sel=sel_all, cm=cm_all)
        todo = [c for c in ckpts if c.step not in done]
        msg = _bn_message(plan, todo, bn_recalibrate)
        if msg:
            (log or note)(msg)
        return [c.step for c in todo]

    def write(sel: pd.DataFrame, cm: pd.DataFrame) -> None:
        tables["cm"] = _merge(tables["cm"], cm)
        run.write(cm_name, tables["cm"])  # class means first: a step counts as done only once selectivity has it
        tables["sel"] = _merge(tables["sel"], sel)
        run.write(sel_name, tables["sel"])

    # Under torchrun: rank 0 locks, reads and writes the tables; every rank streams its shard of each checkpoint.
    with distributed.main_lock(run.path, sel_name):
        todo_steps = set(distributed.on_main(prepare))
        from tqdm.auto import tqdm

        main = distributed.is_main()
        for c in tqdm([c for c in ckpts if c.step in todo_steps], desc=f"selectivity {run.name}",
                      disable=not (progress and main), unit="ckpt"):
            sel, cm = checkpoint_selectivity(run, c, data, names, split=split, bn_recalibrate=bn_recalibrate,
                                             device=device, variant=variant, samples=samples, progress=progress)
            distributed.on_main(write, sel, cm)

    sel_all, cm_all = (tables["sel"], tables["cm"]) if tables else (run.read(sel_name), run.read(cm_name))
    steps = {c.step for c in ckpts}
    sel_out = sel_all[sel_all["step"].isin(steps)].reset_index(drop=True) if sel_all is not None else \
        pd.DataFrame(columns=SELECTIVITY_TABLE_COLUMNS)
    cm_out = cm_all[cm_all["step"].isin(steps)].reset_index(drop=True) if cm_all is not None else \
        pd.DataFrame(columns=CLASS_MEANS_TABLE_COLUMNS)
    return sel_out, cm_out


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

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


def summarize_runs(tables: Mapping[str, pd.DataFrame] | Sequence[pd.DataFrame], *, by: str = "stage",
                   matched: bool = True) -> pd.DataFrame:
    """Across runs (seeds): at each step, the mean over runs of each run's mean CSI / eta^2 and the SE over runs.

    tables: per-run selectivity tables or their `summarize` output. matched=True keeps only the
    (step, stage) points every run has (runs with the same checkpoint schedule match exactly);
    matched=False keeps all, with n_runs saying how many runs each point averages. SE is NaN for
    one run. Columns: those of summarize, plus n_runs (n_units/n_dead are per-run means).
    """
    items = list(tables.items()) if isinstance(tables, Mapping) else [(str(i), t) for i, t in enumerate(tables)]
    if not items:
        raise CsnError("summarize_runs needs at least one run's selectivity table.")
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

    Works on the output of summarize or summarize_runs; the peak is the maximum of `{metric}_mean`.
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
    "SELECTIVITY_TABLE_COLUMNS", "CLASS_MEANS_TABLE_COLUMNS", "SUMMARY_COLUMNS", "table_names", "load_selectivity",
    "checkpoint_selectivity", "selectivity_for_run", "summarize", "summarize_runs", "stage_peaks", "describe_peaks",
]
