"""Class statistics: the CSI formula, streaming per-class sums, eta², batch CSI and standard errors.

This module is the one place the class selectivity index (CSI) formula lives (`csi_from_means`).
Everything else - the evaluation-split tables, class-subset recomputation and the regularizer's
batch CSI - calls it.

    mu_max  = max_k m_k
    mu_rest = mean of m_k over the other K-1 classes
    CSI     = (mu_max - mu_rest) / (mu_max + mu_rest + eps)

For post-ReLU units CSI lies in [0, 1]. For layers whose activations can be negative (pre-ReLU,
linear logits, token features) the formula is applied as is: CSI is then unbounded (and can flip
sign or blow up when mu_max + mu_rest is near 0); csn does not clip it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from csn.errors import CsnError

EPS = 1e-7
"""eps of the CSI denominator (csn's definition)."""

STUDY_EPS = 1e-6
"""eps used by the original study's code (variant="study")."""

VARIANTS = ("mean", "study")

STUDY_GROUP = 32
"""Images per group of the study's regularizer statistic: its per-GPU batch (256 images over 8 GPUs); never all-reduced."""


ClassNames = Sequence[str] | Mapping[int, str] | None


class CSI(NamedTuple):
    """CSI and its parts, each shaped [..., U]."""

    csi: Tensor
    pref_class: Tensor
    mu_max: Tensor
    mu_rest: Tensor


def csi_from_means(means: Tensor, eps: float = EPS, present: Tensor | None = None) -> CSI:
    """CSI of every unit from class means [..., K, U] (K >= 2); differentiable, the only CSI formula in csn.

    mu_rest is the mean over the K-1 classes other than the preferred one (ties: the first maximum
    is preferred, the other tied classes count in mu_rest). Negative-valued layers are not clipped.
    present [..., K] (bool): use only these classes, without reading the mask on the host (no GPU sync); a
    batched mask ([G, K] for means [G, K, U]) selects classes per leading index. The result equals that of
    means[..., present, :] where 2 or more are present, and is finite otherwise.
    """
    if means.dim() < 2:
        raise CsnError(f"class means must be shaped [..., classes, units], got shape {tuple(means.shape)}.")
    k = means.shape[-2]
    if k < 2:
        raise CsnError(f"CSI needs the means of at least 2 classes, got {k}; evaluate on data that contains several classes.")
    if present is None:
        mu_max, pref = means.max(dim=-2)
        is_pref = torch.zeros_like(means, dtype=torch.bool).scatter_(-2, pref.unsqueeze(-2), True)
        mu_rest = means.masked_fill(is_pref, 0).sum(dim=-2) / (k - 1)
    else:
        present = present.to(device=means.device, dtype=torch.bool)
        absent = ~present.unsqueeze(-1)
        mu_max, pref = means.masked_fill(absent, -math.inf).max(dim=-2)
        mu_max = torch.where(present.any(-1, keepdim=True), mu_max, 0.0)  # no class present: finite, and unused
        is_pref = torch.zeros_like(means, dtype=torch.bool).scatter_(-2, pref.unsqueeze(-2), True)
        others = (present.sum(-1, keepdim=True) - 1).clamp_min(1).to(means.dtype)
        mu_rest = means.masked_fill(is_pref | absent, 0).sum(dim=-2) / others
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


class DeferredLabelCheck:
    """check_labels for a stream of batches without waiting for a GPU on every batch.

    `take(labels)` checks dtype and shape at once; labels on the CPU (or without num_classes) are checked
    in full at once too; labels on another device are returned clamped into [0, num_classes) (so nothing
    indexes out of range) while their smallest and largest values are kept there. `check()`, after the
    stream and before its results are used, raises check_labels's error for any label seen out of range.
    """

    def __init__(self, num_classes: int | None) -> None:
        self.num_classes = num_classes
        self._lo: Tensor | None = None
        self._hi: Tensor | None = None

    def take(self, labels: Any) -> Tensor:
        labels = torch.as_tensor(labels)
        if labels.device.type == "cpu" or self.num_classes is None:
            return check_labels(labels, self.num_classes)
        check_labels(labels[:0], self.num_classes)  # dtype and shape only: no values read
        if labels.numel():
            lo, hi = labels.min().long(), labels.max().long()
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
            self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        return labels.long().clamp(0, self.num_classes - 1)

    def check(self) -> None:
        if self._lo is not None:
            check_labels(torch.stack([self._lo, self._hi]).cpu(), self.num_classes)


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
    csi, present = batch_csi_nowait(acts, labels, num_classes, eps, class_sums, reduce=reduce)
    return csi if int(present) >= 2 else None


def batch_csi_nowait(
    acts: Tensor,
    labels: Tensor,
    num_classes: int,
    eps: float = EPS,
    class_sums: bool = False,
    *,
    reduce: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """batch_csi without waiting for the device (for training loops on GPUs): (CSI [U], the number of classes
    present as a 0-d tensor). The CSI is batch_csi's where 2 or more classes are present, and finite (zeros, to
    be discarded) otherwise. On the CPU, where reading the mask costs nothing, the classes present are selected
    by indexing, which keeps CPU results bitwise those of earlier versions; on other devices they are masked
    (the same values to float rounding: the sum over classes then runs over masked zeros too)."""
    sums, counts = batch_class_sums(acts, labels, num_classes)
    if reduce is not None:
        sums, counts = reduce(sums, counts)
    present = counts > 0
    n = present.sum()
    if sums.device.type == "cpu":
        if int(n) < 2:
            return sums.new_zeros(sums.shape[1]), n
        vals = sums[present]
        return csi_from_means(vals if class_sums else vals / counts[present].unsqueeze(1), eps).csi, n
    vals = sums if class_sums else sums / counts.clamp_min(1).unsqueeze(1)
    return csi_from_means(vals, eps, present=present).csi, n


def group_class_sums(acts: Tensor, labels: Tensor, num_classes: int, group: int) -> tuple[Tensor, Tensor]:
    """Differentiable per-class sums [G, K, U] and counts [G, K] of each group of `group` consecutive examples
    (G = ceil(N / group); the last group holds the N - (G-1)*group left over); one index_add, no Python loops.

    Half-precision activations are summed in float32.
    """
    if acts.dim() != 2:
        raise CsnError(f"activations must be [examples, units], got shape {tuple(acts.shape)}.")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise CsnError(f"group must be a whole number of examples >= 1, got {group!r}.")
    if acts.dtype in (torch.float16, torch.bfloat16):
        acts = acts.float()
    n, u = acts.shape
    g = -(-n // group)
    labels = labels.to(device=acts.device, dtype=torch.long)
    idx = torch.arange(n, device=acts.device) // group * num_classes + labels
    sums = acts.new_zeros(g * num_classes, u).index_add(0, idx, acts)
    counts = acts.new_zeros(g * num_classes).index_add(0, idx, torch.ones_like(labels, dtype=acts.dtype))
    return sums.view(g, num_classes, u), counts.view(g, num_classes)


def group_csi_nowait(
    acts: Tensor, labels: Tensor, num_classes: int, group: int, eps: float = EPS, class_sums: bool = False,
) -> tuple[Tensor, Tensor]:
    """CSI [U] per group, averaged over groups: the study's per-process batch CSI, without waiting for the device.

    The N examples are cut into groups of `group` consecutive ones (a shorter last group is used like the
    others); within each group CSI is computed over the classes present in it, from class means (class_sums=True:
    class sums, as the study); a group with fewer than 2 classes present contributes nothing (it cannot be
    selective: a lone image or a lone class). Returns (the mean over contributing groups of each unit's CSI, zeros
    where none contributes; the number of contributing groups as a 0-d tensor). Nothing is all-reduced: under
    data parallelism groups are per process, as the study's GPUs were. Differentiable; vectorized over groups.
    """
    if isinstance(group, bool) or not isinstance(group, int) or group < 2:
        raise CsnError(f"a CSI group needs at least 2 examples, got group={group!r}; use a group size >= 2.")
    sums, counts = group_class_sums(acts, labels, num_classes, group)
    if num_classes < 2:  # no group can hold two classes
        return sums.new_zeros(sums.shape[-1]), counts.new_zeros((), dtype=torch.long)
    present = counts > 0
    contributes = present.sum(-1) >= 2  # [G]
    vals = sums if class_sums else sums / counts.clamp_min(1).unsqueeze(-1)
    # a group that does not contribute is zeroed first: its CSI is then exactly 0, and no 0/0 can reach a gradient
    vals = vals.masked_fill(~contributes[:, None, None], 0)
    csi = csi_from_means(vals, eps, present=present).csi  # [G, U]
    n = contributes.sum()
    return csi.sum(0) / n.clamp_min(1).to(csi.dtype), n


def standard_error(values: Iterable[float]) -> float:
    """Standard error of the mean: sample standard deviation (ddof=1) / sqrt(n), NaN values dropped.

    NaN when fewer than two values remain. The one SE of csn (over seeds, draws, runs).
    """
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    return float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")


def band(series: Iterable[pd.Series | None]) -> pd.DataFrame | None:
    """Mean, standard error and count over runs of series sharing an index (e.g. epoch): a DataFrame with
    columns mean, se, n (rows sorted by index), or None when no series has a value."""
    series = [s for s in series if s is not None and len(s) and s.notna().any()]
    if not series:
        return None
    df = pd.concat(series, axis=1).sort_index()
    n = df.notna().sum(axis=1)
    return pd.DataFrame({"mean": df.mean(axis=1), "se": df.std(axis=1, ddof=1) / np.sqrt(n.clip(lower=1)), "n": n})


__all__ = [
    "EPS", "STUDY_EPS", "STUDY_GROUP", "VARIANTS", "CSI", "csi_from_means", "ClassStats", "check_labels",
    "batch_class_sums", "batch_csi", "batch_csi_nowait", "group_class_sums", "group_csi_nowait", "DeferredLabelCheck",
    "standard_error", "band",
]
