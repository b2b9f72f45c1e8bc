"""BatchNorm re-estimation before eval-mode analysis, and THE policy of when csn does it.

Early in training BN running statistics lag the weights, so the eval-mode network is near chance
and eval-mode CSI/ablation measure a network that does not exist (SPEC, "BatchNorm lag").
`recalibrate_bn` returns a copy whose running statistics are the exact average over a few batches;
`bn_batches`/`bn_plan` decide for which checkpoints (by default those before epoch 1, with 16
training batches), and `bn_note` is the one line every analysis prints about it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from csn.core.progress import bar
from csn.core.units import batch_inputs, to_device
from csn.errors import CsnError

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_modules(model: nn.Module, *, running_stats: bool = True) -> list[nn.Module]:
    """BatchNorm layers (1d/2d/3d/Sync) of a model; with running_stats, only those that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and (m.track_running_stats or not running_stats)]


def has_batchnorm(model: nn.Module, *, running_stats: bool = True) -> bool:
    """True if the model has a BatchNorm layer (with running statistics, unless running_stats=False)."""
    return bool(batchnorm_modules(model, running_stats=running_stats))


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> nn.Module:
    """A deep copy of `model`, in eval mode, whose BN running stats are re-estimated from the first num_batches batches.

    The estimate is PyTorch's exact cumulative average (momentum=None after reset_running_stats):
    running_mean = mean of the batch means, running_var = mean of the *unbiased* batch variances,
    computed in train mode (dropout active, as in torch.optim.swa_utils.update_bn) under no_grad.
    The original momentum values are restored on the copy. The input model is never modified.
    num_batches=0 returns `model` itself (no copy); a model without BatchNorm gives an unchanged
    copy in eval mode without reading any data. The copy carries `csn_bn_recalibrated` (batches
    used) so callers can record that recalibration happened. device: where the copy and inputs go
    (default: the model's device).
    """
    if not isinstance(num_batches, int) or num_batches < 0:
        raise CsnError(f"num_batches must be a non-negative integer, got {num_batches!r}.")
    if num_batches == 0:
        return model
    new = copy.deepcopy(model)
    if device is not None:
        new.to(device)
    bns = batchnorm_modules(new)
    if not bns:
        return new.eval()
    dev = torch.device(device) if device is not None else next(
        itertools.chain(new.parameters(), new.buffers())).device
    momenta = [m.momentum for m in bns]
    seen = 0
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        new.train()
        it = itertools.islice(batches, num_batches)
        if progress:
            it = bar(it, total=num_batches, desc="recalibrating BatchNorm", leave=False, unit="batch")
        with torch.no_grad():
            for batch in it:
                new(to_device(batch_inputs(batch), dev))
                seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    if seen == 0:
        raise CsnError("BatchNorm recalibration got no batches; pass a non-empty loader of training batches.")
    new.csn_bn_recalibrated = seen
    return new.eval()


DEFAULT_BN_BATCHES = 16
"""Training batches used to re-estimate BN statistics when the default policy turns it on."""
BN_DEFAULT_BEFORE_EPOCH = 1.0
"""The default policy re-estimates BN statistics for checkpoints before this epoch, where they lag."""


def bn_batches(epoch: float, requested: int | None) -> int:
    """Batches to re-estimate BN statistics with at a checkpoint of this epoch.

    requested: None = the default policy (DEFAULT_BN_BATCHES before BN_DEFAULT_BEFORE_EPOCH, else 0),
    0 = off, N = N batches at every checkpoint.
    """
    if requested is None:
        return DEFAULT_BN_BATCHES if epoch < BN_DEFAULT_BEFORE_EPOCH else 0
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 0:
        raise CsnError(f"--bn-recalibrate must be an integer >= 0 (0 = off), got {requested!r}.")
    return requested


def bn_plan(epochs: Mapping[int, float], requested: int | None, *, has_bn: bool,
            available: int | None) -> dict[int, int]:
    """Batches BN re-estimation will actually use per checkpoint step ({step: epoch} given).

    0 for a model without BatchNorm; at most `available` (the batches the training split has; None =
    unknown) where re-estimation is on.
    """
    if not has_bn:
        return {s: 0 for s in epochs}
    plan = {s: bn_batches(e, requested) for s, e in epochs.items()}
    if available is not None:
        plan = {s: min(n, available) for s, n in plan.items()}
    return plan


def bn_note(plan: Mapping[int, int], steps: Iterable[int], requested: int | None) -> str | None:
    """The one line that says BN statistics are re-estimated, for how many of `steps`, and how to turn it off."""
    on = [s for s in steps if plan.get(s, 0) > 0]
    if not on:
        return None
    used = sorted({plan[s] for s in on})
    n = used[0] if len(used) == 1 else f"{used[0]}-{used[-1]}"
    asked = DEFAULT_BN_BATCHES if requested is None else requested
    short = f" (the training split has only {used[-1]} batches)" if used[-1] < asked else ""
    what = f"{len(on)} checkpoint{'s' if len(on) != 1 else ''}"
    if requested is None:
        what += f" before epoch {BN_DEFAULT_BEFORE_EPOCH:g}"
    return f"BN statistics re-estimated from {n} training batches{short} for {what} (--bn-recalibrate 0 to turn off)"


__all__ = ["recalibrate_bn", "has_batchnorm", "batchnorm_modules", "DEFAULT_BN_BATCHES", "BN_DEFAULT_BEFORE_EPOCH",
           "bn_batches", "bn_plan", "bn_note"]
