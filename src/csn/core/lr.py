"""Learning-rate schedules: :func:`lr_at` with ``constant``, ``step`` (x gamma at each milestone epoch) and
``cosine`` (to 0 at the last step), each optionally preceded by a linear warm-up. Pure Python (no torch); bad
arguments raise :class:`~csn.errors.CsnError` naming the fix."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from numbers import Integral

from csn.core.times import number, real
from csn.errors import CsnError, unknown

#: Valid learning-rate schedule names for :func:`lr_at`.
LR_SCHEDULES = ("constant", "step", "cosine")


def parse_milestones(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """Milestone epochs from ``"30,60"`` (or a sequence of numbers); empty/None -> ``()``.

    Milestones must be finite, > 0 and strictly increasing; otherwise CsnError.
    """
    if text is None:
        return ()
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
        values = [number(p, "milestones", "write milestone epochs like 30,60") for p in parts]
    else:
        try:
            items = list(text)
        except TypeError:
            raise CsnError(f"milestones must be a list of epochs, got {text!r}; pass e.g. (30, 60).") from None
        values = [real(v, "a milestone") for v in items]
    for v in values:
        if v <= 0:
            raise CsnError(f"milestone {v:g} is not after the start of training; milestones are epochs > 0, e.g. 30,60.")
    for a, b in zip(values, values[1:]):
        if b <= a:
            raise CsnError(f"milestones {', '.join(f'{v:g}' for v in values)} are not strictly increasing; list each epoch once, in order.")
    return tuple(values)


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Warm-up length in steps: ``round(warmup_epochs * steps_per_epoch)`` (0 = no warm-up)."""
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, Integral) or steps_per_epoch < 1:
        raise CsnError(f"steps_per_epoch must be a whole number >= 1, got {steps_per_epoch!r}; check the dataset size and batch size.")
    w = real(warmup_epochs, "warmup_epochs")
    if w < 0:
        raise CsnError(f"warmup_epochs is {w:g}; pass 0 (no warm-up) or a positive number of epochs.")
    return round(w * steps_per_epoch)


def lr_at(
    step: int,
    total_steps: int,
    steps_per_epoch: int,
    base_lr: float,
    schedule: str,
    *,
    milestones: Sequence[float] | str = (),
    gamma: float = 0.1,
    warmup_epochs: float = 0.0,
) -> float:
    """Learning rate for optimizer step ``step`` (0-based; ``0 <= step <= total_steps``).

    Schedules:
        ``constant``: ``base_lr``.
        ``step``: ``base_lr * gamma**k`` where k counts milestones (epochs) already reached, i.e.
            ``step >= round(milestone * steps_per_epoch)``. Milestones are required; milestones past
            the end of training simply never trigger.
        ``cosine``: ``base_lr * (1 + cos(pi * p)) / 2`` with ``p`` going from 0 at the end of warm-up
            to 1 at ``total_steps`` (so the lr reaches 0 at the last step).

    Warm-up (any schedule): for the first ``W = round(warmup_epochs * steps_per_epoch)`` steps the
    schedule's value is multiplied by ``(step + 1) / W``, i.e. ``base_lr * (step + 1) / W`` for
    constant and cosine.

    Raises:
        CsnError: unknown schedule (lists valid names), milestones given to a schedule other than
            ``step`` or missing for ``step``, non-positive gamma, step out of range, warm-up longer
            than training, or a negative/non-finite base_lr.
    """
    name = schedule.strip().lower() if isinstance(schedule, str) else schedule
    if name not in LR_SCHEDULES:
        raise unknown("learning-rate schedule", str(schedule), LR_SCHEDULES)
    for label, v in (("total_steps", total_steps), ("steps_per_epoch", steps_per_epoch)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise CsnError(f"{label} must be a whole number >= 1, got {v!r}; check the training length.")
    if isinstance(step, bool) or not isinstance(step, Integral) or not 0 <= step <= total_steps:
        raise CsnError(f"step {step!r} is outside training (0..{total_steps}); pass a step in that range.")
    lr = real(base_lr, "base_lr")
    if lr < 0:
        raise CsnError(f"base_lr is {lr:g}; pass a learning rate >= 0.")
    w = warmup_steps(warmup_epochs, steps_per_epoch)
    if w > total_steps:
        raise CsnError(f"a warm-up of {warmup_epochs:g} epochs ({w} steps) is longer than training ({total_steps} steps); shorten the warm-up.")
    ms = parse_milestones(milestones)
    if name == "step":
        if not ms:
            raise CsnError("the 'step' lr schedule needs milestones (epochs where lr is multiplied by gamma); pass e.g. milestones=(30, 60).")
        g = real(gamma, "gamma")
        if g <= 0:
            raise CsnError(f"gamma is {g:g}; pass a decay factor > 0 such as 0.1.")
        k = sum(1 for m in ms if step >= round(m * steps_per_epoch))
        lr = lr * g**k
    elif ms:
        raise CsnError(f"milestones only apply to the 'step' lr schedule, not {name!r}; drop them or use schedule 'step'.")
    elif name == "cosine":
        span = total_steps - w
        p = 0.0 if span <= 0 else max(0, step - w) / span
        lr = lr * 0.5 * (1.0 + math.cos(math.pi * p))
    if step < w:
        lr = lr * (step + 1) / w
    return float(lr)


__all__ = ["LR_SCHEDULES", "lr_at", "parse_milestones", "warmup_steps"]
