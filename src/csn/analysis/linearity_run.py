"""How linear is the network at every checkpoint of a run: the resumable driver of `csn linearity`.

The measures themselves (formulas and sources) live in csn.analysis.linearity; this file runs them
over a run's checkpoints and writes one tidy table:

    tables/linearity.parquet   step, epoch, measure, value, split, samples, bn_recalibrated

One row per (checkpoint, measure). `samples` is the number of evaluation examples the row's value
was computed on; `bn_recalibrated` the number of training batches used to re-estimate the
checkpoint's BatchNorm statistics (0 = the stored running statistics; csn.analysis.common's default
policy re-estimates them before epoch 1). Every model in a comparison (theta_t, theta_0, the
previous checkpoint) is that checkpoint's analysis model under the same policy.

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

Resume: a checkpoint is done when the table has every requested measure for it; missing ones are
computed and written (atomically) after each checkpoint, so an interrupted run continues there.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from csn import distributed
from csn.analysis.common import (
    analysis_model,
    bn_batches_for,
    bn_loader,
    eval_loader,
    note,
    split_of,
)
from csn.analysis.linearity import accuracy, fit_linear_classifier, linearity_measures
from csn.errors import CsnError, unknown
from csn.runs import Checkpoint, Run, append_rows, save_tensors

TABLE = "linearity"
LINEARITY_TABLE_COLUMNS = ["step", "epoch", "measure", "value", "split", "samples", "bn_recalibrated"]
"""Columns of tables/linearity.parquet (one row per checkpoint and measure)."""

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


def check_groups(measures: Sequence[str] | str) -> tuple[str, ...]:
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


def load_linearity(run: Run | str | os.PathLike) -> pd.DataFrame | None:
    """The run's linearity table (None when `csn linearity` has not written it yet)."""
    run = run if isinstance(run, Run) else Run(run)
    return run.read(TABLE)


# ------------------------------------------------------------------------------------------------
# evaluation data shared with cka_run
# ------------------------------------------------------------------------------------------------

def check_samples(samples: int | None, what: str = "--samples") -> int | None:
    if samples is None:
        return None
    if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples <= 0:
        raise CsnError(f"{what} must be a positive number of examples (or omitted for the whole split), got {samples!r}.")
    return int(samples)


def subset_loader(run: Run, data, split: str, samples: int | None, *, batch_size: int | None = None,
                  device: str | torch.device = "cpu", shard: bool = False, whole_batches: bool = False):
    """(loader, number of examples): unaugmented batches of a split or of its seeded subset of `samples`
    (csn.analysis.common.eval_loader: the same seeded choice for in-memory and folder datasets; shard
    and whole_batches as there)."""
    n_total = len(split_of(data, split))
    samples = check_samples(samples)
    n = n_total if samples is None else min(samples, n_total)
    return eval_loader(run, data, split, batch_size=batch_size, device=device,
                       samples=None if n == n_total else n, shard=shard, whole_batches=whole_batches), n


def bn_plan(run: Run, data, ckpts: Sequence[Checkpoint], bn_recalibrate: int | None, device="cpu") -> dict[int, int]:
    """Training batches BN re-estimation will use at each checkpoint (0 = off, or a model without BatchNorm)."""
    if bn_recalibrate is not None and (isinstance(bn_recalibrate, bool) or not isinstance(bn_recalibrate, int)
                                       or bn_recalibrate < 0):
        raise CsnError(f"--bn-recalibrate must be an integer >= 0 (0 = off), got {bn_recalibrate!r}.")
    from csn.bn import has_batchnorm

    if not has_batchnorm(run.build_model()):
        return {c.step: 0 for c in ckpts}
    plan = {c.step: bn_batches_for(c, bn_recalibrate) for c in ckpts}
    if any(plan.values()):
        try:
            avail = len(bn_loader(run, data, device))
        except TypeError:
            avail = None
        if avail is not None:
            plan = {s: min(n, avail) for s, n in plan.items()}
    return plan


def load_analysis_model(run: Run, ckpt: Checkpoint, data, bn_recalibrate: int | None, device) -> tuple[torch.nn.Module, int]:
    """(eval-mode model at ckpt, BN batches actually used) through csn.analysis.common.analysis_model."""
    try:
        am = analysis_model(run, ckpt, data, bn_recalibrate=bn_recalibrate, device=device)
    except CsnError as e:
        raise CsnError(f"run {run.name}, checkpoint step {ckpt.step}: {e}") from None
    n = int(getattr(am.model, "csn_bn_recalibrated", am.bn_recalibrated)) if am.bn_recalibrated else 0
    return am.model, n


def bn_note(plan: dict[int, int], steps: Sequence[int], bn_recalibrate: int | None) -> str | None:
    """One line saying for how many checkpoints BN statistics are re-estimated, and how to turn it off."""
    on = [s for s in steps if plan.get(s, 0) > 0]
    if not on:
        return None
    used = sorted({plan[s] for s in on})
    n = used[0] if len(used) == 1 else f"{used[0]}-{used[-1]}"
    what = f"{len(on)} checkpoint{'s' if len(on) != 1 else ''}"
    if bn_recalibrate is None:
        what += " before epoch 1"
    return f"BN statistics re-estimated from {n} training batches for {what} (--bn-recalibrate 0 to turn off)"


# ------------------------------------------------------------------------------------------------
# the linear classifier, fit once per run
# ------------------------------------------------------------------------------------------------

def linear_model_path(run: Run) -> Path:
    return run.path / "tables" / LINEAR_MODEL_FILE


def _flat_inputs(split) -> tuple[torch.Tensor, torch.Tensor]:
    x = split.normalize(split.images)
    return x.reshape(x.shape[0], -1), split.labels.long()


def linear_model_for_run(run: Run, data, *, epochs: int | None = None, lr: float | None = None,
                         log: Callable[[str], None] | None = None) -> tuple[torch.nn.Linear, dict]:
    """The run's softmax-regression classifier on flattened normalized inputs: loaded from
    tables/linear_model.safetensors, or fit on the training split (LINEAR_FIT_DEFAULTS, deterministic)
    and saved there atomically. Returns (nn.Linear on CPU, metadata with its train/test accuracy)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    fit = dict(LINEAR_FIT_DEFAULTS)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise CsnError(f"--fit-epochs must be a positive integer, got {epochs!r}.")
        fit["epochs"] = int(epochs)
    if lr is not None:
        fit["lr"] = float(lr)
    path = linear_model_path(run)
    if not (hasattr(data.train, "images") and hasattr(data.test, "images")):
        raise CsnError(f"the linear-model measure needs an in-memory dataset (run {run.name} uses "
                       f"{data.name}); pass --measures linearized,relu.")
    num_features = int(np.prod(data.train.images.shape[1:]))
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["csn_linear_model"])
            tensors = load_file(str(path))
            weight, bias = tensors["weight"], tensors["bias"]
        except Exception:
            raise CsnError(f"{path} is unreadable or corrupt; delete it (and tables/linearity.parquet) and run "
                           "`csn linearity` again to refit.") from None
        if meta.get("fit") != fit or tuple(weight.shape) != (data.num_classes, num_features):
            raise CsnError(f"{path} was fit with {meta.get('fit')}, but this request asks for {fit}; pass the same "
                           "--fit-epochs, or delete it and tables/linearity.parquet to refit.")
        layer = torch.nn.Linear(num_features, data.num_classes)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        return layer.requires_grad_(False), meta
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
            "test_acc": accuracy(layer, xt, yt), "dataset": data.name, "num_features": num_features}
    save_tensors(path, {"weight": layer.weight, "bias": layer.bias},
                 metadata={"csn_linear_model": json.dumps(meta, sort_keys=True)})
    return layer, meta


# ------------------------------------------------------------------------------------------------
# the run driver
# ------------------------------------------------------------------------------------------------

def _check_compatible(run: Run, df: pd.DataFrame | None, steps: set, *, split: str, n_subset: int,
                      plan: dict[int, int]) -> None:
    """Refuse to mix configurations (split, subset size, BN policy) in one table."""
    if df is None or df.empty:
        return
    path = run.table_path(TABLE)
    missing = sorted(set(LINEARITY_TABLE_COLUMNS) - set(df.columns))
    if missing:
        raise CsnError(f"{path} lacks columns {missing} (written by an older csn?); delete it and run `csn linearity` again.")
    hint = "delete the table to recompute it with these settings"
    have = sorted(set(df["split"].astype(str)))
    if have != [split]:
        raise CsnError(f"{path} holds split={','.join(have)} but this request asks for split={split}; pass "
                       f"--split {have[0]}, or {hint}.")
    sub = df[df["measure"].str.startswith(("linearized_", "relu_"))]
    if not sub.empty and set(sub["samples"].astype(int)) != {n_subset}:
        got = sorted(set(sub["samples"].astype(int)))
        raise CsnError(f"{path} holds linearized/ReLU measures on {got[0]} examples but this request uses {n_subset}; "
                       f"pass --samples {got[0]}, or {hint}.")
    rec = df[df["step"].isin(steps)].groupby("step")["bn_recalibrated"].first()
    for step, n in rec.items():
        if int(n) != plan.get(int(step), int(n)):
            raise CsnError(f"{path} holds step {step} with BatchNorm statistics re-estimated from {int(n)} batches, "
                           f"but this request asks for {plan[int(step)]}; pass the same --bn-recalibrate, or {hint}.")


def _done_steps(df: pd.DataFrame | None, names: Sequence[str]) -> set:
    if df is None or df.empty:
        return set()
    have = df.groupby("step")["measure"].agg(set)
    need = set(names)
    return {int(s) for s, ms in have.items() if need <= ms}


def linearity_for_run(
    run: Run | str | os.PathLike,
    *,
    checkpoints: str | None = None,
    split: str = "test",
    samples: int | None = DEFAULT_SAMPLES,
    bn_recalibrate: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    linear_epochs: int | None = None,
    measures: Sequence[str] | str = ALL_GROUPS,
    data=None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Fill tables/linearity.parquet for the selected checkpoints; return their rows (long form).

    samples: examples (seeded subset of the split) for the linearized and ReLU measures, default
    DEFAULT_SAMPLES; None = the whole split. The linear-model measures use the whole split.
    bn_recalibrate: None = default policy (re-estimate BN statistics before epoch 1), 0 = off,
    N = N training batches at every checkpoint. linear_epochs: epochs of the linear classifier's
    fit (default LINEAR_FIT_DEFAULTS["epochs"]); the fitted classifier is cached per run.
    measures: groups among "linear", "linearized", "relu". log receives one-line notes (stderr).
    """
    with distributed.same_outcome():  # validation: a bad request fails on every rank together
        run = run if isinstance(run, Run) else Run(run)
        groups = check_groups(measures)
        names = expected_measures(groups)
        if split not in ("train", "test"):
            raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
        samples = check_samples(samples)
        ckpts = run.select(checkpoints)
        all_ckpts = run.checkpoints
        if ("linearized" in groups or "relu" in groups) and all_ckpts[0].step != 0:
            raise CsnError(f"run {run.name} has no step-0 checkpoint (the initialization theta_0); the linearized and "
                           "ReLU measures compare with it; pass --measures linear.")
        log = log or note
        if data is None:
            data = run.dataset()
        n_split = len(split_of(data, split))
        n_subset = n_split if samples is None else min(samples, n_split)
        plan = bn_plan(run, data, all_ckpts, bn_recalibrate, device)
        progress = progress and not os.environ.get("CSN_NO_PROGRESS")
        index = {c.step: i for i, c in enumerate(all_ckpts)}

    table: dict[str, pd.DataFrame | None] = {}  # rank 0's copy of the table (the only rank that writes)

    def prepare() -> list[int]:
        table["df"] = df = run.read(TABLE)
        _check_compatible(run, df, {c.step for c in ckpts}, split=split, n_subset=n_subset, plan=plan)
        done = _done_steps(df, names)
        todo = [c.step for c in ckpts if c.step not in done]
        note = bn_note(plan, todo, bn_recalibrate) if todo else None
        if note:
            log(note)
        return todo

    def write(rows: pd.DataFrame) -> None:
        table["df"] = append_rows(run, TABLE, table["df"], rows, key_cols=["step", "measure"])

    # Under torchrun: rank 0 locks, reads and writes the table (and fits the linear classifier); every
    # rank measures its shard of the evaluation batches, and counts, norms and predictions are combined.
    with distributed.main_lock(run.path, TABLE):
        todo_steps = set(distributed.on_main(prepare))
        todo = [c for c in ckpts if c.step in todo_steps]
        reduce = distributed.is_dist()
        linear = meta = None
        if todo and "linear" in groups:
            linear, meta = distributed.on_main(linear_model_for_run, run, data, epochs=linear_epochs, log=log)
            linear = linear.to(device)
        full_loader = sub_loader = None
        if todo and "linear" in groups:
            full_loader, _ = subset_loader(run, data, split, None, device=device, shard=True)
        if todo and ("linearized" in groups or "relu" in groups):
            sub_loader, _ = subset_loader(run, data, split, n_subset, device=device, shard=True)

        cache: dict[int, tuple[torch.nn.Module, int]] = {}

        def get(c: Checkpoint) -> tuple[torch.nn.Module, int]:
            if c.step not in cache:
                cache[c.step] = load_analysis_model(run, c, data, bn_recalibrate, device)
            return cache[c.step]

        from tqdm.auto import tqdm

        for c in tqdm(todo, desc=f"linearity {run.name}", disable=not (progress and distributed.is_main()),
                      unit="ckpt"):
            model_t, n_bn = get(c)
            i = index[c.step]
            prev_c = all_ckpts[i - 1] if i > 0 else None
            model_0 = get(all_ckpts[0])[0] if "linearized" in groups or "relu" in groups else model_t
            model_prev = get(prev_c)[0] if prev_c is not None and ("linearized" in groups or "relu" in groups) else None
            values: dict[str, tuple[float, int]] = {}
            try:
                if "linear" in groups:
                    out = linearity_measures(model_t, model_0, full_loader, linear_model=linear,
                                             linearized=False, relu=False, reduce=reduce)
                    for k in MEASURE_GROUPS["linear"]:
                        if k == "linear_model_test_acc":
                            values[k] = (float(meta["test_acc"]), int(meta["test_examples"]))
                        elif k == "acc":
                            values[k] = (out["test_acc"], n_split)
                        elif k == "mu_y_share":
                            share = out["mu_y_bits"] / out["i_fy_bits"] if out["i_fy_bits"] > 0 else math.nan
                            values[k] = (share, n_split)
                        else:
                            values[k] = (out[k], n_split)
                if "linearized" in groups or "relu" in groups:
                    out = linearity_measures(model_t, model_0, sub_loader, model_prev=model_prev,
                                             linearized="linearized" in groups, relu="relu" in groups, reduce=reduce)
                    if "acc" not in values:
                        values["acc"] = (out["test_acc"], n_subset)
                    for g in ("linearized", "relu"):
                        if g in groups:
                            for k in MEASURE_GROUPS[g]:
                                values[k] = (out.get(k, math.nan), n_subset)
            except CsnError as e:
                raise CsnError(f"run {run.name}, checkpoint step {c.step} (epoch {c.epoch:g}): {e}") from None
            if c.step == all_ckpts[0].step and "linearized" in groups:
                # theta_t = theta_0: f_lin = f_0 = f_t by definition; the relative distance is 0/0
                values["linearized_agreement_init"] = (1.0, n_subset)
                values["linearized_rel_dist_init"] = (math.nan, n_subset)
            rows = pd.DataFrame({
                "step": np.int64(c.step), "epoch": float(c.epoch), "measure": list(values),
                "value": [float(v[0]) for v in values.values()], "split": split,
                "samples": np.array([v[1] for v in values.values()], dtype=np.int64),
                "bn_recalibrated": np.int64(n_bn),
            }, columns=LINEARITY_TABLE_COLUMNS)
            distributed.on_main(write, rows)
            # keep only what the next checkpoint can reuse: theta_0 and this one (its "previous")
            for s in list(cache):
                if s not in (all_ckpts[0].step, c.step):
                    del cache[s]

    df = table["df"] if table else run.read(TABLE)
    if df is None:
        return pd.DataFrame(columns=LINEARITY_TABLE_COLUMNS)
    steps = {c.step for c in ckpts}
    out = df[df["step"].isin(steps)].sort_values(["step"], kind="stable").reset_index(drop=True)
    return out


# ------------------------------------------------------------------------------------------------
# summaries
# ------------------------------------------------------------------------------------------------

def summarize_linearity(tables) -> pd.DataFrame:
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
            raise CsnError(f"the linearity table of {name} lacks columns {miss}; pass a table written by `csn linearity`.")
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


def describe_linearity(tables, measures: Sequence[str] | None = None) -> list[str]:
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
    "LINEARITY_TABLE_COLUMNS", "DEFAULT_SAMPLES", "LINEAR_FIT_DEFAULTS", "LINEAR_MODEL_FILE", "MEASURE_GROUPS",
    "check_groups", "expected_measures", "load_linearity", "linear_model_for_run", "linearity_for_run",
    "summarize_linearity", "describe_linearity", "subset_loader", "bn_plan",
]
