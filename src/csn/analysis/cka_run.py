"""Representational similarity (linear CKA) over a run's checkpoints, or between two runs: `csn cka`.

The estimator lives in csn.analysis.cka (unbiased minibatch HSIC, Nguyen, Raghu & Kornblith 2021,
after Kornblith et al. 2019; accumulated in float64). Features are per-unit activations (csn.units:
the spatial mean of each channel, one value per unit and image), plus the model output under the
layer name "logits". Three comparisons, all on the evaluation data of run A (no augmentation):

  within   all layer x layer pairs of one checkpoint (default layers: the declared read points + logits)
  across   each layer at each checkpoint vs the same layer at a reference checkpoint of the same run
           (comparison "reference"; default the last checkpoint) and vs the previous checkpoint of the
           run (comparison "previous"; skipped with previous=False)
  runs     each layer of run A vs the same layer of run B at matched checkpoints: B's checkpoint at
           the same step, or, where B has no such step, B's checkpoint nearest in epoch (epoch_b says
           which). Both runs must have been trained on the same data.

Each model is its checkpoint's analysis model (csn.analysis.common.analysis_model: BatchNorm
statistics re-estimated before epoch 1 by default), recorded in bn_recalibrated (A) and
bn_recalibrated_b (B). Features of one checkpoint are computed in one pass and reused by every
comparison that needs them (the reference and the previous checkpoint are not recomputed).

    tables/cka.parquet (in run A)   run_a, step_a, layer_a, run_b, step_b, layer_b, cka, epoch_a, epoch_b,
                                    comparison, split, samples, bn_recalibrated, bn_recalibrated_b

run_a / run_b are run directory names (when the two names are equal, run_b is the shortest tail of
B's path that differs from A's, e.g. "reg/s0" vs run_a "s0"). Resume: a (comparison, run_b, step_a, step_b) is done when the table holds all its requested
layer pairs; missing ones are computed and the table rewritten atomically after each checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from csn import distributed
from csn.analysis.cka import LOGITS, CKAAccumulator
from csn.analysis.common import note, split_of
from csn.analysis.linearity_run import (
    bn_note,
    bn_plan,
    check_samples,
    load_analysis_model,
    subset_loader,
)
from csn.errors import CsnError, unknown
from csn.runs import Checkpoint, Run, append_rows, select_checkpoints
from csn.units import resolve_layers, trace_units

TABLE = "cka"
CKA_TABLE_COLUMNS = ["run_a", "step_a", "layer_a", "run_b", "step_b", "layer_b", "cka", "epoch_a", "epoch_b",
                     "comparison", "split", "samples", "bn_recalibrated", "bn_recalibrated_b"]
"""Columns of tables/cka.parquet (one row per compared pair of layers)."""
MODES = ("within", "across", "runs")
COMPARISONS = ("within", "reference", "previous", "runs")
_KEY = ["comparison", "run_b", "step_a", "step_b"]
_SMALL = "CKA needs batches of more than 3 examples"


def load_cka(run: Run | str | os.PathLike) -> pd.DataFrame | None:
    """Run A's CKA table (None when `csn cka` has not written it yet)."""
    run = run if isinstance(run, Run) else Run(run)
    return run.read(TABLE)


def resolve_cka_layers(model: torch.nn.Module, layers: Sequence[str] | str | None) -> list[str]:
    """Layer patterns -> module names in model order, plus 'logits' (the model output) where asked.

    None = the declared read points + logits. An unknown name raises a CsnError listing the names.
    """
    if layers is None:
        return resolve_layers(model, None) + [LOGITS]
    if isinstance(layers, str):
        layers = [p.strip() for p in layers.split(",") if p.strip()]
    layers = list(layers)
    if not layers:
        raise CsnError("pass at least one layer (a module name, a glob such as 'layer2.*', or 'logits').")
    pats = [p for p in layers if p != LOGITS]
    try:
        names = resolve_layers(model, pats) if pats else []
    except CsnError as e:
        msg = str(e).rstrip(".")
        raise CsnError(f"{msg}, or '{LOGITS}' for the model output.") from None
    return names + ([LOGITS] if LOGITS in layers else [])


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
    for k in _DATA_KEYS:
        if da.get(k) != db.get(k):
            raise CsnError(f"runs {run_a.name} and {run_b.name} use different data ({k}: {da.get(k)!r} vs "
                           f"{db.get(k)!r}); CKA between runs needs both trained on the same dataset.")
    ca, cb = run_a.config, run_b.config
    for k in _CONFIG_KEYS:
        if ca.get(k) != cb.get(k):
            raise CsnError(f"runs {run_a.name} and {run_b.name} use different data ({k}: {ca.get(k)!r} vs "
                           f"{cb.get(k)!r}); CKA between runs needs both trained on the same dataset.")


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
            out.append((c, min(ckpts_b, key=lambda b: (abs(b.epoch - c.epoch), b.step)), False))
    return out


def resolve_reference(run: Run, reference: str | int | None) -> Checkpoint:
    """The reference checkpoint of the across comparison: 'first', 'last', a step, or 'eE' (nearest epoch)."""
    ref = "last" if reference is None else str(reference).strip()
    try:
        hits = select_checkpoints(run.checkpoints, ref)
    except CsnError as e:
        raise CsnError(f"bad --reference {ref!r} ({str(e).rstrip('.')}); use first, last, a step or eE.") from None
    if len(hits) != 1 or "," in ref or ":" in ref:
        raise CsnError(f"--reference {ref!r} must name one checkpoint: first, last, a step (e.g. 64) or an epoch (e.g. e2).")
    return hits[0]


@torch.no_grad()
def collect_features(model: torch.nn.Module, loader, layers: Sequence[str], device) -> list[list[torch.Tensor]]:
    """Per batch (of more than 3 examples), the [n, units] features of each layer ('logits' = the output)."""
    names = [l for l in layers if l != LOGITS]
    out: list[list[torch.Tensor]] = []
    dev = torch.device(device)
    with trace_units(model, names) as cache:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if x.shape[0] <= 3:
                continue
            y = model(x.to(dev))
            y = y[0] if isinstance(y, (tuple, list)) else y
            out.append([(y if l == LOGITS else cache[l]).detach().reshape(x.shape[0], -1).float() for l in layers])
            cache.clear()
    return out


def cka_blocks(*feature_sets: list[list[torch.Tensor]], num_layers: int | None = None,
               reduce: bool = False) -> torch.Tensor:
    """The full CKA matrix over the concatenated layers of several feature sets computed on the same batches.

    num_layers: layers per feature set (default: read from the first batch). reduce=True (under
    torchrun, each rank holding the features of its shard of whole batches): the HSIC sums and batch
    counts are all-reduced first, so every rank gets the CKA of the whole split; a rank whose shard
    has no batch of more than 3 examples then contributes nothing.
    """
    from csn.distributed import reduce_cka

    nb = len(feature_sets[0]) if feature_sets else 0
    if any(len(s) != nb for s in feature_sets):
        raise CsnError("CKA feature sets cover different numbers of batches; compare them on the same loader.")
    if num_layers is None and nb:
        num_layers = len(feature_sets[0][0])
    acc = CKAAccumulator(len(feature_sets) * num_layers) if num_layers else None
    for b in range(nb):
        acc.update([f for s in feature_sets for f in s[b]])
    if reduce and acc is not None:
        reduce_cka(acc)
    if acc is None or acc.count.item() == 0:
        raise CsnError(f"{_SMALL}; none of the evaluation batches has more than 3 examples (use a larger --batch-size "
                       "or --samples).")
    return acc.result_full()


def _existing_pairs(df: pd.DataFrame | None) -> dict[tuple, set]:
    if df is None or df.empty:
        return {}
    out: dict[tuple, set] = {}
    for key, d in df.groupby(_KEY, sort=False):
        out[tuple(key)] = set(zip(d["layer_a"], d["layer_b"]))
    return out


def _check_compatible(run: Run, df: pd.DataFrame | None, *, split: str, n: int) -> None:
    if df is None or df.empty:
        return
    path = run.table_path(TABLE)
    missing = sorted(set(CKA_TABLE_COLUMNS) - set(df.columns))
    if missing:
        raise CsnError(f"{path} lacks columns {missing} (written by an older csn?); delete it and run `csn cka` again.")
    hint = "delete the table to recompute it with these settings"
    have = sorted(set(df["split"].astype(str)))
    if have != [split]:
        raise CsnError(f"{path} holds split={','.join(have)} but this request asks for split={split}; pass "
                       f"--split {have[0]}, or {hint}.")
    got = sorted(set(df["samples"].astype(int)))
    if got != [n]:
        raise CsnError(f"{path} holds CKA on {got[0]} examples but this request uses {n}; pass --samples {got[0]}, "
                       f"or {hint}.")


def _check_bn(run: Run, df: pd.DataFrame | None, plan_a: dict[int, int], plan_b: dict[int, int], label_b: str) -> None:
    if df is None or df.empty:
        return
    hint = "pass the same --bn-recalibrate, or delete the table to recompute it"
    for col, plan, steps, which in (("bn_recalibrated", plan_a, "step_a", "A"),
                                    ("bn_recalibrated_b", plan_b, "step_b", "B")):
        d = df if which == "A" else df[df["run_b"] == label_b]
        for step, n in d.groupby(steps)[col].first().items():
            if int(step) in plan and int(n) != plan[int(step)]:
                raise CsnError(f"{run.table_path(TABLE)} holds step {step} of run {which} with BatchNorm statistics "
                               f"re-estimated from {int(n)} batches, but this request asks for {plan[int(step)]}; {hint}.")


def cka_for_runs(
    run_a: Run | str | os.PathLike,
    run_b: Run | str | os.PathLike | None = None,
    *,
    layers: Sequence[str] | str | None = None,
    checkpoints: str | None = None,
    mode: str | None = None,
    reference: str | int | None = "last",
    previous: bool = True,
    samples: int | None = None,
    split: str = "test",
    batch_size: int | None = None,
    bn_recalibrate: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    data=None,
    log: Callable[[str], None] | None = None,
) -> pd.DataFrame:
    """Fill run A's tables/cka.parquet for one mode; return the rows of this request.

    mode: "within" (default without run_b), "across", or "runs" (default with run_b). layers:
    patterns, 'logits' for the output; None = declared read points + logits. checkpoints: a
    selector of run A's checkpoints (B's are matched to them). reference (across): 'first', 'last'
    (default), a step, or 'eE'. previous (across): also compare with the previous checkpoint.
    samples: a seeded subset of the split (None = the whole split). batch_size: evaluation batch
    (default: run A's eval_batch_size); it must exceed 3. bn_recalibrate: None = default policy,
    0 = off, N = N training batches, for every model.
    """
    with distributed.same_outcome():  # validation: a bad request fails on every rank together
        run_a = run_a if isinstance(run_a, Run) else Run(run_a)
        if run_b is not None and not isinstance(run_b, Run):
            run_b = Run(run_b)
        mode = mode or ("runs" if run_b is not None else "within")
        if mode not in MODES:
            raise unknown("CKA mode", mode, MODES)
        if mode == "runs" and run_b is None:
            raise CsnError("--mode runs compares two runs; pass RUN_B after RUN.")
        if mode != "runs" and run_b is not None:
            raise CsnError(f"RUN_B is only used with --mode runs (got --mode {mode}); drop RUN_B or pass --mode runs.")
        if split not in ("train", "test"):
            raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
        samples = check_samples(samples)
        bs = int(batch_size) if batch_size is not None else int(run_a.config.get("eval_batch_size", 500))
        if bs <= 3:
            raise CsnError(f"{_SMALL} (the unbiased HSIC estimator divides by n-3); got a batch size of {bs}, pass "
                           "--batch-size 4 or more (hundreds give stable estimates).")
        ckpts = run_a.select(checkpoints)
        all_a = run_a.checkpoints
        model_a = run_a.build_model()
        names = resolve_cka_layers(model_a, layers)
        if run_b is not None:
            check_same_data(run_a, run_b)
            model_b = run_b.build_model()
            missing = [n for n in names if n != LOGITS and n not in dict(model_b.named_modules())]
            if missing:
                raise CsnError(f"run {run_b.name} has no layer {missing[0]!r}; compare layers both models have "
                               f"(pass --layers).")
            del model_b
        ref = resolve_reference(run_a, reference) if mode == "across" else None
        log = log or note
        if data is None:
            data = run_a.dataset()
        n_split = len(split_of(data, split))
        n = n_split if samples is None else min(samples, n_split)
        if n <= 3:
            raise CsnError(f"{_SMALL}; the evaluation data has only {n} examples, pass --samples 4 or more.")
        label_b = run_label(run_a, run_b) if run_b is not None else run_a.name
        plan_a = bn_plan(run_a, data, all_a, bn_recalibrate, device)
        plan_b = bn_plan(run_b, data, run_b.checkpoints, bn_recalibrate, device) if run_b is not None else plan_a
        progress = progress and not os.environ.get("CSN_NO_PROGRESS")
        index = {c.step: i for i, c in enumerate(all_a)}

        # what each selected checkpoint needs: [(comparison, checkpoint of B or of A, pairs)]
        def jobs_for(c: Checkpoint, matched: Checkpoint | None) -> list[tuple[str, Checkpoint, list[tuple[str, str]]]]:
            same = [(l, l) for l in names]
            if mode == "within":
                return [("within", c, [(la, lb) for la in names for lb in names])]
            if mode == "runs":
                return [("runs", matched, same)]
            out = [("reference", ref, same)]
            i = index[c.step]
            if previous and i > 0:
                out.append(("previous", all_a[i - 1], same))
            return out

        matches = match_checkpoints(ckpts, run_b.checkpoints) if mode == "runs" else [(c, None, True) for c in ckpts]
        by_epoch = [(a, b) for a, b, exact in matches if not exact]
        if by_epoch:
            log(f"{len(by_epoch)} checkpoint{'s' if len(by_epoch) != 1 else ''} of {run_a.name} have no checkpoint at the "
                f"same step in {run_b.name}; matched to the nearest epoch instead (e.g. step {by_epoch[0][0].step} "
                f"epoch {by_epoch[0][0].epoch:g} -> step {by_epoch[0][1].step} epoch {by_epoch[0][1].epoch:g})")

    table: dict[str, pd.DataFrame | None] = {}  # rank 0's copy of the table (the only rank that writes)

    def prepare() -> list[tuple[int, list[tuple[str, int, list[tuple[str, str]]]]]]:
        """[(step of A, [(comparison, step of B or A, layer pairs)])] still to compute, read on rank 0."""
        table["df"] = df = run_a.read(TABLE)
        _check_compatible(run_a, df, split=split, n=n)
        _check_bn(run_a, df, plan_a, plan_b, label_b)
        have = _existing_pairs(df)
        todo = []
        for c, matched, _ in matches:
            jobs = [(cmp, cb.step, pairs) for cmp, cb, pairs in jobs_for(c, matched)
                    if not set(pairs) <= have.get((cmp, label_b, c.step, cb.step), set())]
            if jobs:
                todo.append((c.step, jobs))
        if todo:
            steps = sorted({s for s, _ in todo} | {sb for _, jobs in todo for _, sb, _ in jobs if mode != "runs"})
            note = bn_note(plan_a, steps, bn_recalibrate)
            if note:
                log(note)
        return todo

    def write(new: pd.DataFrame) -> None:
        table["df"] = append_rows(run_a, TABLE, table["df"], new, key_cols=_KEY + ["layer_a", "layer_b"])

    # Under torchrun: rank 0 locks, reads and writes the table; every rank computes the features of its
    # shard of whole batches (the single-process batches) and the HSIC sums are all-reduced.
    with distributed.main_lock(run_a.path, TABLE):
        todo = distributed.on_main(prepare)
        by_step_a = {c.step: c for c in all_a}
        by_step_b = {c.step: c for c in run_b.checkpoints} if run_b is not None else by_step_a
        loader, _ = (subset_loader(run_a, data, split, n, batch_size=bs, device=device, shard=True, whole_batches=True)
                     if todo else (None, n))
        reduce = distributed.is_dist()

        feats_a: dict[int, list] = {}
        bn_used: dict[tuple[str, int], int] = {}

        def features(run: Run, which: str, c: Checkpoint, keep: dict[int, list] | None) -> list:
            if keep is not None and c.step in keep:
                return keep[c.step]
            model, used = load_analysis_model(run, c, data, bn_recalibrate, device)
            bn_used[(which, c.step)] = used
            try:
                with distributed.same_outcome():
                    f = collect_features(model, loader, names, device)
            except CsnError as e:
                raise CsnError(f"run {run.name}, checkpoint step {c.step}: {e}") from None
            if keep is not None:
                keep[c.step] = f
            return f

        from tqdm.auto import tqdm

        m = len(names)
        for step_a, jobs in tqdm(todo, desc=f"cka {run_a.name}", disable=not (progress and distributed.is_main()),
                                 unit="ckpt"):
            c = by_step_a[step_a]
            fa = features(run_a, "a", c, feats_a)
            rows = []
            for cmp, step_b, pairs in jobs:
                cb = by_step_b[step_b] if cmp == "runs" else by_step_a[step_b]
                if cmp == "within":
                    mat = cka_blocks(fa, num_layers=m, reduce=reduce)
                    vals = {(la, lb): float(mat[i, j]) for i, la in enumerate(names) for j, lb in enumerate(names)}
                    bn_b = bn_used[("a", c.step)]
                else:
                    if cmp == "runs":
                        fb = features(run_b, "b", cb, None)
                        bn_b = bn_used[("b", cb.step)]
                    else:
                        fb = features(run_a, "a", cb, feats_a)
                        bn_b = bn_used[("a", cb.step)]
                    mat = cka_blocks(fa, fb, num_layers=m, reduce=reduce)
                    vals = {(l, l): float(mat[i, m + i]) for i, l in enumerate(names)}
                for la, lb in pairs:
                    rows.append({"run_a": run_a.name, "step_a": c.step, "layer_a": la, "run_b": label_b,
                                 "step_b": cb.step, "layer_b": lb, "cka": vals[(la, lb)], "epoch_a": float(c.epoch),
                                 "epoch_b": float(cb.epoch), "comparison": cmp, "split": split, "samples": n,
                                 "bn_recalibrated": bn_used[("a", c.step)], "bn_recalibrated_b": bn_b})
            new = pd.DataFrame(rows, columns=CKA_TABLE_COLUMNS).astype(
                {"step_a": "int64", "step_b": "int64", "samples": "int64", "bn_recalibrated": "int64",
                 "bn_recalibrated_b": "int64", "cka": "float64", "epoch_a": "float64", "epoch_b": "float64"})
            distributed.on_main(write, new)
            # keep the features the next checkpoints reuse: the reference and this one (their "previous")
            for s in list(feats_a):
                if s != c.step and (ref is None or s != ref.step):
                    del feats_a[s]

    df = table["df"] if table else run_a.read(TABLE)
    if df is None or df.empty:
        return pd.DataFrame(columns=CKA_TABLE_COLUMNS)
    want = {(cmp, label_b, c.step, cb.step) for c, matched, _ in matches for cmp, cb, _ in jobs_for(c, matched)}
    keys = list(zip(df["comparison"], df["run_b"], df["step_a"], df["step_b"]))
    mask = np.array([k in want for k in keys], dtype=bool) & df["layer_a"].isin(names).to_numpy() & \
        df["layer_b"].isin(names).to_numpy()
    return df[mask].sort_values(["comparison", "step_a", "step_b"], kind="stable").reset_index(drop=True)


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


def describe_cka(df: pd.DataFrame) -> list[str]:
    """Compact lines for the CLI: per comparison and layer (pair), CKA at the first checkpoint, its min, and the last."""
    lines = []
    if df is None or df.empty:
        return lines
    for cmp in COMPARISONS:
        d = df[df["comparison"] == cmp]
        if d.empty:
            continue
        if cmp == "within":
            last = int(d["step_a"].max())
            mat = cka_matrix(d, last)
            ep = float(d.loc[d["step_a"] == last, "epoch_a"].iloc[0])
            lines.append(f"within step {last} (epoch {ep:g}), layer x layer:")
            w = max(len(str(x)) for x in mat.index)
            lines.append(" " * (w + 2) + " ".join(f"{str(c)[-8:]:>8}" for c in mat.columns))
            for r, vals in mat.iterrows():
                lines.append(f"  {str(r):<{w}}" + " ".join(f"{v:8.3f}" for v in vals.to_numpy(dtype=float)))
            continue
        title = {"reference": "vs reference step {}", "previous": "vs previous checkpoint",
                 "runs": "vs run {}"}[cmp]
        if cmp == "reference":
            title = title.format(", ".join(str(s) for s in sorted(set(d["step_b"]))))
        elif cmp == "runs":
            title = title.format(", ".join(sorted(set(d["run_b"]))))
        lines.append(f"{title}:")
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


__all__ = [
    "CKA_TABLE_COLUMNS", "MODES", "COMPARISONS", "load_cka", "resolve_cka_layers", "check_same_data",
    "match_checkpoints", "resolve_reference", "collect_features", "cka_blocks", "cka_for_runs", "cka_matrix",
    "describe_cka",
]
