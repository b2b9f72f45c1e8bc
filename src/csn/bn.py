"""BatchNorm recalibration: re-estimate running statistics before eval-mode analysis.

Early in training BN running statistics lag the weights, so the eval-mode network is near chance
and eval-mode CSI/ablation measure a network that does not exist (SPEC, "BatchNorm lag").
`recalibrate_bn` returns a copy whose running statistics are the exact average over a few batches.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from csn.errors import CsnError
from csn.units import to_device as _to

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """BatchNorm layers (1d/2d/3d/Sync) of a model that track running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def has_batchnorm(model: nn.Module) -> bool:
    """True if the model has a BatchNorm layer with running statistics."""
    return bool(batchnorm_modules(model))


def _inputs(batch: Any) -> Any:
    """The model input of a batch: x of an (x, y, ...) tuple, or the batch itself."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch




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
            from tqdm.auto import tqdm

            it = tqdm(it, total=num_batches, desc="recalibrating BatchNorm", leave=False, unit="batch")
        with torch.no_grad():
            for batch in it:
                new(_to(_inputs(batch), dev))
                seen += 1
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    if seen == 0:
        raise CsnError("BatchNorm recalibration got no batches; pass a non-empty loader of training batches.")
    new.csn_bn_recalibrated = seen
    return new.eval()


__all__ = ["recalibrate_bn", "has_batchnorm", "batchnorm_modules"]
