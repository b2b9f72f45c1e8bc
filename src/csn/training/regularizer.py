"""The selectivity regularizer: loss = cross_entropy - alpha * R (SPEC "Selectivity regularizer").

R = mean over regularized stages of (mean over the stage's units of the batch CSI), with batch CSI
from class means over the classes present in the batch, gradients flowing through. alpha < 0
suppresses selectivity, alpha > 0 promotes it (the study's sign convention). Under data parallelism
the class sums and counts are all-reduced with autograd-aware collectives, so R is the CSI of the
global batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from csn.core.stats import EPS, batch_csi_nowait
from csn.core.trace import TraceDict
from csn.core.units import resolve_layers, stage_of, stages
from csn.dist import all_reduce_with_grad


def default_reg_layers(model: nn.Module) -> list[str]:
    """Every stage's read points except the last stage's (the study left the last stage out)."""
    st = stages(model)
    names = list(st)
    return [layer for s in names[:-1] for layer in st[s]] if len(names) > 1 else [layer for s in names for layer in st[s]]


def _global_sums(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sum class sums and counts over data-parallel ranks with an autograd-aware all_reduce (identity alone)."""
    return all_reduce_with_grad(sums), all_reduce_with_grad(counts)


class SelectivityRegularizer:
    """Differentiable mean batch CSI of chosen layers, for use in any training loop.

    Example::

        reg = SelectivityRegularizer(model, num_classes=10)     # default: all stages but the last
        with reg:                                               # hooks on while inside
            logits = model(x)
            R = reg.value(y)                                    # None when < 2 classes in the batch
        loss = F.cross_entropy(logits, y) - alpha * (R if R is not None else 0)
    """

    def __init__(self, model: nn.Module, layers: Sequence[str] | None = None, num_classes: int | None = None,
                 *, eps: float = EPS, class_sums: bool = False) -> None:
        self.model = model
        self.layers = resolve_layers(model, layers) if layers is not None else default_reg_layers(model)
        self.stage = {layer: stage_of(model, layer) for layer in self.layers}
        self.num_classes = num_classes
        self.eps, self.class_sums = eps, class_sums
        self.skipped = 0  # batches with fewer than two classes present
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
        """Mean batch CSI per regularized stage, and the number of classes present (a 0-d tensor; no GPU sync)."""
        if not self._trace:
            raise RuntimeError("SelectivityRegularizer has no activations: attach it and run the model first.")
        k = self.num_classes or int(labels.max()) + 1
        per_stage: dict[str, list[Tensor]] = {}
        present = labels.new_zeros(())
        for name in self.layers:
            csi, present = batch_csi_nowait(self._trace[name], labels, k, self.eps, self.class_sums,
                                            reduce=_global_sums)
            per_stage.setdefault(self.stage[name], []).append(csi)
        return {s: torch.cat(v).mean() for s, v in per_stage.items()}, present

    def stage_values(self, labels: Tensor) -> dict[str, Tensor] | None:
        """Mean batch CSI per regularized stage for the last forward pass; None if < 2 classes present."""
        vals, present = self._stage_tensors(labels)
        if int(present) < 2:
            self.skipped += 1
            return None
        return vals

    def value(self, labels: Tensor) -> Tensor | None:
        """R for the last forward pass: mean over stages of the stage's mean unit CSI; None if < 2 classes present."""
        vals = self.stage_values(labels)
        if vals is None:
            return None
        return torch.stack(list(vals.values())).mean()

    def value_nowait(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """(R, counted) as device tensors, without waiting for the GPU (for training loops): R where 2 or more
        classes are present (counted True), else 0, whose gradient is 0, as skipping the term."""
        vals, present = self._stage_tensors(labels)
        r = torch.stack(list(vals.values())).mean()
        counted = present >= 2
        return torch.where(counted, r, torch.zeros_like(r)), counted
