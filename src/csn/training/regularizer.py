"""The selectivity regularizer: loss = cross_entropy - alpha * R (SPEC "Selectivity regularizer").

R combines the regularized stages' values (mean over stages by default, reduce="sum": their sum), each the
mean over the stage's units of the batch CSI, gradients flowing through. alpha < 0 suppresses selectivity,
alpha > 0 promotes it (the study's sign convention). Two statistics:

- csn's (statistic="means", group="batch", the default): class means over the classes present in the
  batch; under data parallelism the class sums and counts are all-reduced with autograd-aware
  collectives, so R is the CSI of the global batch.
- the study's (statistic="sums", group=32, eps 1e-6; its trainer_reg_v2.py / class_selectivity_v2.py): class
  sums within each group of 32 consecutive images of a process's batch, never all-reduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from csn.core.stats import EPS, STUDY_EPS, batch_csi_nowait, group_csi_nowait
from csn.core.trace import TraceDict
from csn.core.units import resolve_layers, stage_of, stages
from csn.dist import all_reduce_with_grad
from csn.errors import CsnError, unknown

STATISTICS = ("means", "sums")
"""Class statistic of the batch CSI: class means (csn) or class sums (the study)."""
REDUCES = ("mean", "sum")
"""How the stage values combine into R: their mean (the study's R) or their sum (alpha in full on every stage)."""


def default_reg_layers(model: nn.Module) -> list[str]:
    """Every stage's read points except the last stage's (the study left the last stage out)."""
    st = stages(model)
    names = list(st)
    return [layer for s in names[:-1] for layer in st[s]] if len(names) > 1 else [layer for s in names for layer in st[s]]


def _global_sums(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sum class sums and counts over data-parallel ranks with an autograd-aware all_reduce (identity alone)."""
    return all_reduce_with_grad(sums), all_reduce_with_grad(counts)


def check_group(group: int | str) -> int | str:
    """A regularizer group: 'batch' or a whole number of images >= 2 (else one CsnError naming the fix)."""
    if group == "batch" and isinstance(group, str):
        return group
    if isinstance(group, bool) or not isinstance(group, int) or group < 2:
        raise CsnError(f"the regularizer's group must be 'batch' or a number of images >= 2, got {group!r}; use e.g. "
                       "group=32 (the study's per-GPU batch) or group='batch' (csn's global batch).")
    return group


def check_group_fits(group: int | str, batch_size: int, world_size: int = 1) -> None:
    """Refuse, before training, a group larger than the batch each process trains on (groups are per process)."""
    per_process = batch_size // max(world_size, 1)
    if group != "batch" and group > per_process:
        where = f"batch_size={batch_size} over {world_size} processes" if world_size > 1 else f"batch_size={batch_size}"
        raise CsnError(f"reg_group={group} is larger than the {per_process} images each process trains on per step "
                       f"({where}); choose reg_group <= {per_process} or a larger batch_size.")


class SelectivityRegularizer:
    """Differentiable batch CSI of chosen layers, combined over their stages into R, for any training loop.

    Options (keywords):

    - statistic: "means" (default) - class means, csn's CSI; "sums" - class sums, the study's.
    - group: "batch" (default) - one CSI over the classes present in the whole batch; under data parallelism
      the class sums and counts are all-reduced, so it is the global batch's CSI (at least 2 classes present,
      else the batch is skipped). An integer N >= 2 - the batch (each process's own, never all-reduced: the
      study's per-GPU statistic) is cut into groups of N consecutive images, the last group holding what is
      left over (used like the others); CSI is computed within each group over the classes present in it, a
      group with fewer than 2 classes present contributes nothing, and a unit's value is the mean over the
      contributing groups. A batch where no group contributes is skipped.
    - reduce: "mean" (default) - R is the mean over stages of the stage's mean unit CSI (the study's R: with S
      stages each gets alpha/S); "sum" - R is their sum, so alpha applies in full to every stage (a map that
      compares "stage 2 alone" with "stages 1+2" at one alpha needs this).
    - eps: the CSI denominator's eps; default 1e-7 (csn.core.stats.EPS) with class means, 1e-6
      (csn.core.stats.STUDY_EPS, the study's) with class sums.

    Example::

        reg = SelectivityRegularizer(model, num_classes=10)     # default: all stages but the last
        with reg:                                               # hooks on while inside
            logits = model(x)
            R = reg.value(y)                                    # None when the batch is skipped
        loss = F.cross_entropy(logits, y) - alpha * (R if R is not None else 0)

        study = SelectivityRegularizer(model, num_classes=1000, statistic="sums", group=32)   # the study's R
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, num_classes: int | None = None,
                 *, statistic: str = "means", group: int | str = "batch", reduce: str = "mean",
                 eps: float | None = None) -> None:
        if statistic not in STATISTICS:
            raise unknown("regularizer statistic", str(statistic), STATISTICS)
        if reduce not in REDUCES:
            raise unknown("regularizer reduce", str(reduce), REDUCES)
        self.model = model
        self.layers = resolve_layers(model, layers) if layers is not None else default_reg_layers(model)
        self.stage = {layer: stage_of(model, layer) for layer in self.layers}
        self.num_classes = num_classes
        self.statistic, self.group, self.reduce = statistic, check_group(group), reduce
        self.eps = float(eps) if eps is not None else (EPS if statistic == "means" else STUDY_EPS)
        self.skipped = 0  # batches skipped: fewer than two classes present (in the batch, or in every group)
        self._trace = TraceDict(model, self.layers, detach=False)  # training-mode units, gradients flow through

    def attach(self) -> SelectivityRegularizer:
        """Register the hooks (idempotent)."""
        self._trace.open()
        return self

    def detach(self) -> None:
        """Remove the hooks (idempotent); with them off the regularizer costs nothing."""
        self._trace.close()

    @property
    def activations(self) -> dict[str, Tensor]:
        """The [N, U] training-mode unit activations of each regularized layer in the last forward pass."""
        return dict(self._trace)

    def __enter__(self) -> SelectivityRegularizer:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _stage_tensors(self, labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Mean batch CSI per regularized stage, and whether the batch counts (a 0-d bool tensor; no GPU sync)."""
        if not self._trace:
            raise RuntimeError("SelectivityRegularizer has no activations: attach it and run the model first.")
        k = self.num_classes or int(labels.max()) + 1
        sums = self.statistic == "sums"
        per_stage: dict[str, list[Tensor]] = {}
        counted = labels.new_zeros((), dtype=torch.bool)
        for name in self.layers:
            if self.group == "batch":
                csi, present = batch_csi_nowait(self._trace[name], labels, k, self.eps, sums, reduce=_global_sums)
                counted = present >= 2
            else:
                csi, groups = group_csi_nowait(self._trace[name], labels, k, self.group, self.eps, sums)
                counted = groups >= 1
            per_stage.setdefault(self.stage[name], []).append(csi)
        return {s: torch.cat(v).mean() for s, v in per_stage.items()}, counted

    def _combine(self, vals: dict[str, Tensor]) -> Tensor:
        """R from the stage values: their mean (reduce="mean") or their sum (reduce="sum")."""
        stacked = torch.stack(list(vals.values()))
        return stacked.mean() if self.reduce == "mean" else stacked.sum()

    def stage_values(self, labels: Tensor) -> dict[str, Tensor] | None:
        """Mean batch CSI per regularized stage for the last forward pass; None if the batch is skipped."""
        vals, counted = self._stage_tensors(labels)
        if not bool(counted):
            self.skipped += 1
            return None
        return vals

    def value(self, labels: Tensor) -> Tensor | None:
        """R for the last forward pass (the stage values combined by `reduce`); None if the batch is skipped
        (fewer than 2 classes present in the batch, or in every group)."""
        vals = self.stage_values(labels)
        if vals is None:
            return None
        return self._combine(vals)

    def value_nowait(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(R, counted) as device tensors, without waiting for the GPU (for training loops): R where the batch counts
        (counted True), else 0, whose gradient is 0, as skipping the term."""
        vals, counted = self._stage_tensors(labels)
        r = self._combine(vals)
        return torch.where(counted, r, torch.zeros_like(r)), counted
