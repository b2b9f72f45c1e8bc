"""Class selectivity: streaming per-class statistics -> CSI table; differentiable batch CSI.

This module is the one place the class selectivity index (CSI) formula lives (`csi_from_means`).
Everything else - the evaluation-split table, class-subset recomputation and the regularizer's
batch CSI - calls it.

    mu_max  = max_k m_k
    mu_rest = mean of m_k over the other K-1 classes
    CSI     = (mu_max - mu_rest) / (mu_max + mu_rest + eps)

For post-ReLU units CSI lies in [0, 1]. For layers whose activations can be negative (pre-ReLU,
linear logits, token features) the formula is applied as is: CSI is then unbounded (and can flip
sign or blow up when mu_max + mu_rest is near 0); csn does not clip it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from csn import units as _units
from csn.errors import CsnError, unknown
from csn.units import to_device as _to

EPS = 1e-7
"""eps of the CSI denominator (csn's definition)."""

STUDY_EPS = 1e-6
"""eps used by the original study's code (variant="study")."""

VARIANTS = ("mean", "study")

SELECTIVITY_COLUMNS = ["layer", "stage", "unit", "csi", "pref_class", "mu_max", "mu_rest", "dead", "eta2"]
CLASS_MEANS_COLUMNS = ["layer", "unit", "class", "mean"]

ClassNames = Sequence[str] | Mapping[int, str] | None


class CSI(NamedTuple):
    """CSI and its parts, each shaped [..., U]."""

    csi: Tensor
    pref_class: Tensor
    mu_max: Tensor
    mu_rest: Tensor


def csi_from_means(means: Tensor, eps: float = EPS) -> CSI:
    """CSI of every unit from class means [..., K, U] (K >= 2); differentiable, the only CSI formula in csn.

    mu_rest is the mean over the K-1 classes other than the preferred one (ties: the first maximum
    is preferred, the other tied classes count in mu_rest). Negative-valued layers are not clipped.
    """
    if means.dim() < 2:
        raise CsnError(f"class means must be shaped [..., classes, units], got shape {tuple(means.shape)}.")
    k = means.shape[-2]
    if k < 2:
        raise CsnError(f"CSI needs the means of at least 2 classes, got {k}; evaluate on data that contains several classes.")
    mu_max, pref = means.max(dim=-2)
    is_pref = torch.zeros_like(means, dtype=torch.bool).scatter_(-2, pref.unsqueeze(-2), True)
    mu_rest = means.masked_fill(is_pref, 0).sum(dim=-2) / (k - 1)
    csi = (mu_max - mu_rest) / (mu_max + mu_rest + eps)
    return CSI(csi, pref, mu_max, mu_rest)


def _class_label(k: int, class_names: ClassNames) -> str:
    """'class 3' or "class 3 ('Dress')" for error messages."""
    name = None
    if class_names is not None:
        try:
            name = class_names[k]
        except (IndexError, KeyError, TypeError):
            name = None
    return f"class {k} ({name!r})" if name is not None else f"class {k}"


class ClassStats:
    """Streaming per-class accumulator for one layer: float64 sums/sumsq [K, U] and int64 counts [K].

    Keeps K x U numbers, never per-image activations. With num_classes=None the class dimension
    grows to the largest label seen. Absent classes have count 0 (`check` turns that into an error).
    """

    def __init__(self, num_classes: int | None = None, num_units: int | None = None, *,
                 device: torch.device | str | None = None) -> None:
        self.num_classes = num_classes
        self.sums: Tensor | None = None
        self.sumsq: Tensor | None = None
        self.counts: Tensor | None = None
        if num_units is not None:
            self._alloc(num_classes or 0, num_units, torch.device(device or "cpu"))

    # -- buffers -------------------------------------------------------------------------------
    def _alloc(self, k: int, u: int, device: torch.device) -> None:
        """Allocate zeroed buffers for k classes and u units on device."""
        self.sums = torch.zeros(k, u, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(k, u, dtype=torch.float64, device=device)
        self.counts = torch.zeros(k, dtype=torch.int64, device=device)

    def ensure_classes(self, k: int) -> None:
        """Grow the class dimension to at least k (only when num_classes was not fixed)."""
        if self.sums is None or k <= self.sums.shape[0]:
            return
        if self.num_classes is not None:
            raise CsnError(f"label {k - 1} is out of range for {self.num_classes} classes; pass the right num_classes.")
        extra = k - self.sums.shape[0]
        u, dev = self.sums.shape[1], self.sums.device
        self.sums = torch.cat([self.sums, self.sums.new_zeros(extra, u)])
        self.sumsq = torch.cat([self.sumsq, self.sumsq.new_zeros(extra, u)])
        self.counts = torch.cat([self.counts, torch.zeros(extra, dtype=torch.int64, device=dev)])

    @property
    def k(self) -> int:
        """Number of classes currently held."""
        return 0 if self.counts is None else int(self.counts.shape[0])

    @property
    def num_units(self) -> int:
        """Number of units (0 before the first update)."""
        return 0 if self.sums is None else int(self.sums.shape[1])

    # -- accumulation --------------------------------------------------------------------------
    def update(self, acts: Tensor, labels: Tensor, *, validate: bool = True) -> None:
        """Add a batch of unit activations [N, U] with integer labels [N] (vectorized, index_add_)."""
        if acts.dim() != 2:
            raise CsnError(f"activations must be [examples, units], got shape {tuple(acts.shape)}.")
        labels = torch.as_tensor(labels)
        if validate:
            labels = check_labels(labels, self.num_classes)
        if labels.shape != (acts.shape[0],):
            raise CsnError(f"got {tuple(labels.shape)} labels for {acts.shape[0]} examples; pass one integer label per example.")
        device = acts.device
        if device.type == "mps":  # no float64 on MPS: accumulate on the CPU
            device = torch.device("cpu")
        if self.sums is None:
            self._alloc(self.num_classes or 0, acts.shape[1], device)
        elif acts.shape[1] != self.sums.shape[1]:
            raise CsnError(f"this layer had {self.sums.shape[1]} units and now has {acts.shape[1]}; read one layer per ClassStats.")
        if labels.numel() == 0:
            return
        if self.num_classes is None:
            self.ensure_classes(int(labels.max()) + 1)
        dev = self.sums.device
        x = acts.detach().to(device=dev, dtype=torch.float64)
        idx = labels.to(device=dev, dtype=torch.long)
        self.sums.index_add_(0, idx, x)
        self.sumsq.index_add_(0, idx, x * x)
        self.counts.index_add_(0, idx, torch.ones_like(idx))

    def tensors(self) -> list[Tensor]:
        """The buffers [sums, sumsq, counts], by reference; summing each across DDP ranks gives the global stats.

        Under DDP pass a fixed num_classes so every rank holds the same shapes.
        """
        if self.sums is None:
            raise CsnError("no activations were accumulated; the evaluation data yielded no examples.")
        return [self.sums, self.sumsq, self.counts]

    # -- results -------------------------------------------------------------------------------
    def _n(self) -> Tensor:
        """Counts as float64 column [K, 1]."""
        self.tensors()
        return self.counts.to(torch.float64).unsqueeze(1)

    def means(self) -> Tensor:
        """Per-class mean activation [K, U] (NaN for a class without examples)."""
        return self.sums / self._n()

    def eta2(self) -> Tensor:
        """Between-class share of variance [U]: sum_k n_k (m_k - m)^2 / sum_i (x_i - m)^2.

        Offset- and scale-invariant class information (CSI is not). 0 where the total variance is 0,
        i.e. below 1e-12 of the unit's mean square (constant or dead units, at float64 precision).
        """
        n = self._n()
        present = n > 0
        m_k = torch.where(present, self.sums / n.clamp_min(1), 0.0)
        m = self.sums.sum(0) / n.sum().clamp_min(1)
        between = (n * (m_k - m) ** 2).sum(0)
        within = (self.sumsq - torch.where(present, self.sums * m_k, 0.0)).clamp_min(0).sum(0)
        total = between + within
        constant = total <= 1e-12 * self.sumsq.sum(0)
        return torch.where(constant, 0.0, between / torch.where(constant, 1.0, total)).clamp(0, 1)

    def dead(self) -> Tensor:
        """Bool [U]: the unit's activation was exactly zero on every example (sumsq == 0)."""
        self.tensors()
        return self.sumsq.sum(0) == 0

    def check(self, class_names: ClassNames = None) -> None:
        """Raise a CsnError if fewer than 2 classes are held or any class has no examples."""
        counts = self.tensors()[2].cpu()
        if counts.numel() < 2:
            raise CsnError(
                f"CSI needs at least 2 classes, but the evaluation split has only {counts.numel()}; "
                "use a split that contains every class."
            )
        missing = torch.nonzero(counts == 0).flatten().tolist()
        if missing:
            named = ", ".join(_class_label(k, class_names) for k in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            verb = "has" if len(missing) == 1 else "have"
            raise CsnError(f"{named}{more} {verb} no examples in the evaluation split; use a split that contains every class.")


# ------------------------------------------------------------------------------------------------
# one streaming pass over a loader
# ------------------------------------------------------------------------------------------------

def check_labels(labels: Any, num_classes: int | None) -> Tensor:
    """Validate class labels (1-D integers in [0, num_classes)) and return them as a long tensor."""
    labels = torch.as_tensor(labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise CsnError(f"labels must be integer class indices, got dtype {labels.dtype}; convert them with labels.long().")
    if labels.dim() != 1:
        raise CsnError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}; pass indices, not one-hot vectors.")
    if labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0:
            raise CsnError(f"label {lo} is negative; labels must be class indices in [0, num_classes).")
        if num_classes is not None and hi >= num_classes:
            raise CsnError(
                f"label {hi} is out of range for num_classes={num_classes}; "
                f"pass num_classes={hi + 1} or more, or fix the dataset's labels."
            )
    return labels.long()


def _split_batch(batch: Any) -> tuple[Any, Any]:
    """(x, y) from a batch given as a tuple/list (extra items ignored)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CsnError(f"each batch must be an (inputs, labels) pair, got {type(batch).__name__}; use a labelled DataLoader.")




def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _save_modes(model: nn.Module) -> dict[nn.Module, bool]:
    """Each submodule's training flag, to restore exactly afterwards."""
    return {m: m.training for m in model.modules()}


def _restore_modes(modes: dict[nn.Module, bool]) -> None:
    """Restore training flags saved by _save_modes."""
    for m, flag in modes.items():
        m.training = flag


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

    layers are module names or patterns (csn.units.resolve_layers). num_classes=None infers it as
    max label + 1. `reduce` is applied in place to every tensor of every ClassStats.tensors() after
    the pass (e.g. torch.distributed.all_reduce). Hooks are removed and train/eval modes restored,
    also on error. Non-finite activations raise a CsnError naming the layer.
    """
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise CsnError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    names = _units.resolve_layers(model, layers)
    dev = torch.device(device) if device is not None else model_device(model)
    stats = {name: ClassStats(num_classes) for name in names}
    modes = _save_modes(model)
    n_batches = 0
    k_seen = 0
    try:
        model.eval()
        total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc or "class statistics", leave=False, unit="batch")
        try:
            with torch.no_grad(), _units.trace_units(model, names) as cache:
                for batch in loader:
                    x, y = _split_batch(batch)
                    y = check_labels(y, num_classes)
                    if y.numel():
                        k_seen = max(k_seen, int(y.max()) + 1)
                    cache.clear()
                    model(_to(x, dev))
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
                    if bar is not None:
                        bar.update(1)
                cache.clear()
        finally:
            if bar is not None:
                bar.close()
    finally:
        _restore_modes(modes)
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
            raise CsnError(
                f"layer {name!r} produced NaN or infinite activations; check the model's weights "
                "(a diverged checkpoint?) and the input data."
            )
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

    layers: patterns for csn.units.resolve_layers (default: the model's declared read points).
    The model's train/eval mode is restored afterwards. See selectivity_frame for the columns.
    """
    if variant not in VARIANTS:
        raise unknown("variant", variant, VARIANTS)
    names = _units.resolve_layers(model, layers)
    stats = collect_class_stats(model, loader, names, num_classes, device=device, progress=progress)
    stage_map = {n: _units.stage_of(model, n) for n in names}
    return selectivity_frame(stats, stage_map, variant, class_names=class_names)


# ------------------------------------------------------------------------------------------------
# differentiable batch CSI (the regularizer)
# ------------------------------------------------------------------------------------------------

def batch_class_sums(acts: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Differentiable per-class sums [K, U] and counts [K] of a batch (index_add, no Python loops).

    Half-precision activations are summed in float32.
    """
    if acts.dim() != 2:
        raise CsnError(f"activations must be [examples, units], got shape {tuple(acts.shape)}.")
    if acts.dtype in (torch.float16, torch.bfloat16):
        acts = acts.float()
    labels = labels.to(device=acts.device, dtype=torch.long)
    sums = acts.new_zeros(num_classes, acts.shape[1]).index_add(0, labels, acts)
    counts = acts.new_zeros(num_classes).index_add(0, labels, torch.ones_like(labels, dtype=acts.dtype))
    return sums, counts


def batch_csi(
    acts: Tensor,
    labels: Tensor,
    num_classes: int,
    eps: float = EPS,
    class_sums: bool = False,
    *,
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> Tensor | None:
    """Differentiable CSI [U] of a batch over the classes present in it; None if fewer than 2 are present.

    Uses class means (class_sums=True: the study's class sums). `reduce(sums, counts)` may return
    the global sums/counts under DDP (use a differentiable all_reduce, e.g.
    csn.distributed.all_reduce_with_grad) so the result is the CSI of the global batch.
    """
    sums, counts = batch_class_sums(acts, labels, num_classes)
    if reduce is not None:
        sums, counts = reduce(sums, counts)
    present = counts > 0
    if int(present.sum()) < 2:
        return None
    vals = sums[present]
    if not class_sums:
        vals = vals / counts[present].unsqueeze(1)
    return csi_from_means(vals, eps).csi


__all__ = [
    "EPS", "STUDY_EPS", "CSI", "csi_from_means", "ClassStats", "check_labels", "collect_class_stats",
    "selectivity_frame", "class_means_frame", "csi_for_classes", "class_selectivity",
    "batch_class_sums", "batch_csi", "model_device",
]
