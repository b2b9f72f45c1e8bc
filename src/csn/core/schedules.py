"""Training schedules: checkpoint steps, learning rate, and selectivity-regularizer alpha windows.

Pure Python (no torch). Everything a user types is parsed strictly: a malformed spec raises
:class:`~csn.errors.CsnError` naming the problem and the fix, never a silently different schedule.

Checkpoints
    A spec is comma-separated segments (whitespace around segments and fields is ignored,
    keywords are case-insensitive):

    ``START:STOP:EVERY``
        epochs START, START+EVERY, ... up to and including STOP (in epochs, floats allowed;
        STOP may be ``end``). Each epoch point becomes step ``round(epoch * steps_per_epoch)``.
    ``steps:logB:BOUND``
        steps 0, 1, B, B**2, ... (powers of the integer base B >= 2 up to and including BOUND;
        BOUND itself is only included when it is a power of B). BOUND may be ``end``.
    ``steps:START:STOP:EVERY``
        steps START, START+EVERY, ... up to and including STOP (whole numbers; STOP may be ``end``).
    ``fSTART:fSTOP:fEVERY``
        the same in fractions of training (``f0.5:end:f0.25``): points f become step ``round(f * total_steps)``.
    a single point in training (:func:`parse_time`)
        ``step=N`` (``step=end`` is the final step), ``fF`` (a fraction of training), ``E`` (an epoch)
        or ``end``.

    Example: ``steps:log2:256,1:end:1``; the fmnist preset's ``step=8,...,step=256,f0.25,f0.3333,...``.
    The result always contains step 0 (initialization) and the final step. Segments reaching beyond
    training are errors, except in the default schedule (:data:`DEFAULT_CHECKPOINTS`), which is
    clipped to the training length, and where the caller asks for clipping (a preset's schedule, so
    that a shortened preset just works: ``checkpoint_steps(..., clip=True, note=print)`` drops the
    points past the end and says so in one line).

Learning rate
    :func:`lr_at` with schedules ``constant``, ``step`` (x gamma at each milestone epoch) and
    ``cosine`` (to 0 at the last step), each optionally preceded by a linear warm-up.

Alpha windows (selectivity regularizer, ``loss = CE - alpha * R``)
    :class:`AlphaSchedule` maps a (fractional) epoch to alpha. It is built from the study's compact
    string (``"0*5 -20*15"``, :func:`parse_study_string`) or the canonical string ``str(schedule)``
    (``"-20@5:end"``, :func:`parse_alpha_windows`); :func:`alpha_schedule` dispatches.
    :class:`AlphaWindows` holds windows in any time unit (``--reg-window step=0:step=64,f0.5:end``,
    :func:`alpha_windows`); the training loop resolves them to optimizer steps (:class:`StepWindows`)
    once the training length is known: a window [a, b) is on from the first step >= a to the first
    step >= b (for epoch windows the same steps as ``AlphaSchedule.alpha_at(step / steps_per_epoch)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from numbers import Integral, Real
from typing import NamedTuple

from csn.core.times import TimePoint, fmt_number, parse_time
from csn.errors import CsnError, unknown

__all__ = [
    "TimePoint",
    "parse_time",
    "DEFAULT_CHECKPOINTS",
    "LR_SCHEDULES",
    "MAX_CHECKPOINTS",
    "AlphaSchedule",
    "alpha_schedule",
    "checkpoint_steps",
    "lr_at",
    "parse_alpha_windows",
    "parse_milestones",
    "parse_study_string",
    "total_steps",
    "warmup_steps",
]

#: Initialization, every 1/8 epoch for epoch 0-1, every 1/4 for 1-3, then every epoch.
DEFAULT_CHECKPOINTS = "0:1:0.125,1:3:0.25,3:end:1"

#: Upper bound on the points one checkpoint segment may ask for (guards against typos like 1e-9).
MAX_CHECKPOINTS = 1_000_000

#: Valid learning-rate schedule names for :func:`lr_at`.
LR_SCHEDULES = ("constant", "step", "cosine")

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_NUM_RE = re.compile(_NUM, re.ASCII)
_INT_RE = re.compile(r"\+?\d{1,4000}", re.ASCII)
_STUDY_TOKEN_RE = re.compile(rf"({_NUM})\*({_NUM})", re.ASCII)
_WINDOW_TOKEN_RE = re.compile(rf"({_NUM})@({_NUM}):({_NUM}|end)", re.ASCII | re.IGNORECASE)

_CKPT_FORMS = (
    "segments are START:STOP:EVERY in epochs (e.g. 0:1:0.125 or 3:end:1), fSTART:fSTOP:fEVERY in fractions of "
    "training (f0.5:end:f0.25), steps:log2:BOUND, steps:START:STOP:EVERY in steps, or single points step=N, fF, "
    "an epoch or end, separated by commas"
)
_STUDY_FORM = "VALUE*EPOCHS tokens separated by spaces, e.g. '0*5 -20*15' (alpha 0 for 5 epochs, then -20 for 15)"
_TOL = 1e-9


# --------------------------------------------------------------------------------------------
# small strict parsers
# --------------------------------------------------------------------------------------------


def _parse_float(text: str, where: str, fix: str) -> float:
    """Parse a finite decimal number (no nan/inf/underscores/non-ASCII digits) or raise CsnError."""
    t = text.strip()
    if not _NUM_RE.fullmatch(t):
        raise CsnError(f"{where}: {t!r} is not a number; {fix}.")
    value = float(t)
    if not math.isfinite(value):
        raise CsnError(f"{where}: {t!r} is out of range; {fix}.")
    return value


def _parse_int(text: str, where: str, fix: str) -> int:
    """Parse a non-negative whole number written in decimal digits or raise CsnError."""
    t = text.strip()
    if not _INT_RE.fullmatch(t):
        raise CsnError(f"{where}: {t!r} is not a whole number of steps; {fix}.")
    return int(t)


def _real(value: object, what: str) -> float:
    """Coerce a user-supplied number (int/float/numeric string) to a finite float or raise CsnError."""
    if isinstance(value, bool) or value is None:
        raise CsnError(f"{what} must be a number, got {value!r}; pass a finite number.")
    if isinstance(value, str):
        return _parse_float(value, what, "pass a finite number such as -20 or 0.5")
    if not isinstance(value, Real):
        raise CsnError(f"{what} must be a number, got {type(value).__name__}; pass a finite number.")
    out = float(value)
    if not math.isfinite(out):
        raise CsnError(f"{what} must be finite, got {value!r}; pass a finite number.")
    return out


def _beyond(x: float, limit: float) -> bool:
    """x > limit, forgiving float noise of a few ulps."""
    return x > limit + _TOL * max(1.0, abs(limit))


# --------------------------------------------------------------------------------------------
# points in training time: steps, epochs, or fractions of training
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def total_steps(steps_per_epoch: int, epochs: float) -> int:
    """Number of optimizer steps in training: ``round(epochs * steps_per_epoch)`` (at least 1).

    Raises CsnError for a non-positive/non-integer ``steps_per_epoch``, a non-positive/non-finite
    ``epochs``, or a training that rounds to 0 steps.
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, Integral) or steps_per_epoch < 1:
        raise CsnError(f"steps_per_epoch must be a whole number >= 1, got {steps_per_epoch!r}; check the dataset size and batch size.")
    if isinstance(epochs, bool) or not isinstance(epochs, Real) or not math.isfinite(float(epochs)) or epochs <= 0:
        raise CsnError(f"epochs must be a finite number > 0, got {epochs!r}; pass e.g. --epochs 5 or --epochs 0.5.")
    product = float(epochs) * int(steps_per_epoch)
    if not math.isfinite(product):
        raise CsnError(f"{epochs!r} epochs x {steps_per_epoch} steps is too long; train for fewer epochs.")
    total = round(product)
    if total < 1:
        raise CsnError(f"{epochs!r} epochs x {steps_per_epoch} steps per epoch rounds to 0 steps; train for at least one step.")
    return total


def _too_many(seg: str, n: float, fix: str) -> CsnError:
    count = "infinitely many" if not math.isfinite(n) else f"{int(n):,}"
    return CsnError(f"checkpoint segment {seg!r} asks for {count} checkpoints, more than the {MAX_CHECKPOINTS:,} allowed; {fix}.")


def _epoch_segment(seg: str, fields: list[str], spe: int, epochs: float, total: int,
                   clip: list[str] | None) -> list[int]:
    """START:STOP:EVERY in epochs. clip: None = past the end is an error, else a list that collects the
    segments whose points past the end were dropped."""
    where = f"checkpoint segment {seg!r}"
    fix = "write epochs as numbers such as 1, 0.25 or 1e-1 (START:STOP:EVERY, STOP may be 'end')"
    start = _parse_float(fields[0], where, fix)
    stop_is_end = fields[1].strip().lower() == "end"
    stop = epochs if stop_is_end else _parse_float(fields[1], where, fix)
    every = _parse_float(fields[2], where, fix)
    length = f"training is {epochs:g} epochs = {total} steps"
    if start < 0:
        raise CsnError(f"{where} starts at negative epoch {start:g}; start at 0 or later.")
    if every <= 0:
        raise CsnError(f"{where} has interval {every:g}; the interval EVERY must be > 0 epochs.")
    if not stop_is_end and start > stop:
        raise CsnError(f"{where} starts at epoch {start:g}, after its stop {stop:g}; write START:STOP:EVERY with START <= STOP.")
    if _beyond(start, epochs):
        if clip is not None:
            clip.append(seg)
            return []
        raise CsnError(f"{where} starts at epoch {start:g}, after the end of training ({length}); start it earlier or train longer.")
    if not stop_is_end and _beyond(stop, epochs):
        if clip is None:
            raise CsnError(f"{where} stops at epoch {stop:g}, after the end of training ({length}); use 'end' or a stop <= {epochs:g}.")
        clip.append(seg)
        stop = epochs
    q = max(0.0, (stop - start) / every)
    if not math.isfinite(q) or q + 1 > MAX_CHECKPOINTS:
        raise _too_many(seg, q + 1, "use a larger interval (one step is 1/steps_per_epoch epochs)")
    n = math.floor(q + _TOL) + 1
    return [min(total, round((start + k * every) * spe)) for k in range(n)]


def _fraction_segment(seg: str, fields: list[str], total: int) -> list[int]:
    """fSTART:fSTOP:fEVERY in fractions of training (STOP may be 'end'); never past the end."""
    where = f"checkpoint segment {seg!r}"
    fix = "write fractions of training as f0.25 (fSTART:fSTOP:fEVERY, each with its 'f'; fSTOP may be 'end')"
    stop_is_end = fields[1].strip().lower() == "end"
    if not all(f.strip().lower().startswith("f") for f in (fields[0], fields[2]) + (() if stop_is_end else (fields[1],))):
        raise CsnError(f"{where} mixes fractions of training with epochs; {fix}.")
    start, every = (_parse_float(fields[i].strip()[1:], where, fix) for i in (0, 2))
    stop = 1.0 if stop_is_end else _parse_float(fields[1].strip()[1:], where, fix)
    for v in (start, stop):
        if not 0 <= v <= 1:
            raise CsnError(f"{where} has a fraction of training outside [0, 1] (f{fmt_number(v)}); {fix}.")
    if every <= 0:
        raise CsnError(f"{where} has interval f{fmt_number(every)}; the interval fEVERY must be > 0.")
    if start > stop:
        raise CsnError(f"{where} starts at f{fmt_number(start)}, after its stop f{fmt_number(stop)}; write fSTART:fSTOP:fEVERY with START <= STOP.")
    q = (stop - start) / every
    if not math.isfinite(q) or q + 1 > MAX_CHECKPOINTS:
        raise _too_many(seg, q + 1, "use a larger interval")
    return [min(total, round((start + k * every) * total)) for k in range(math.floor(q + _TOL) + 1)]


def _point_segment(seg: str, spe: int, epochs: float, total: int, clip: list[str] | None) -> list[int]:
    """One point in training (parse_time): step=N, fF, an epoch, or end; step=end is the final step."""
    low = seg.lower()
    if not (low in ("end", "last", "step=end") or low.startswith(("step=", "f")) or _NUM_RE.fullmatch(low)):
        raise CsnError(f"checkpoint segment {seg!r} has an unknown form; {_CKPT_FORMS}.")
    point = parse_time(seg, "checkpoint segment")
    n = point.step(spe, total)
    if n > total:
        if clip is not None:
            clip.append(seg)
            return []
        at = f"epoch {fmt_number(point.value)}" if point.unit == "epoch" else f"step {n}"
        raise CsnError(f"checkpoint segment {seg!r} is after the end of training ({at}; training is {epochs:g} epochs = "
                       f"{total} steps); use a point <= {total} steps, a fraction such as f0.5, or end.")
    return [n]


def _steps_segment(seg: str, fields: list[str], total: int, clip: list[str] | None) -> list[int]:
    where = f"checkpoint segment {seg!r}"
    length = f"training is {total} steps"
    kind = fields[1].strip().lower() if len(fields) > 1 else ""
    if len(fields) == 3 and kind.startswith("log"):
        base = _parse_int(kind[3:] or "?", where, "write the log base as a whole number, e.g. steps:log2:512")
        if base < 2:
            raise CsnError(f"{where} uses log base {base}; the base must be 2 or more, e.g. steps:log2:512.")
        bound_is_end = fields[2].strip().lower() == "end"
        bound = total if bound_is_end else _parse_int(fields[2], where, "write the bound in whole steps or 'end', e.g. steps:log2:512")
        if bound > total:
            if clip is None:
                raise CsnError(f"{where} goes up to step {bound}, after the end of training ({length}); use 'end' or a bound <= {total}.")
            clip.append(seg)
            bound = total
        out, p = [0], 1
        while p <= bound:
            out.append(p)
            p *= base
        return out
    if len(fields) == 4:
        fix = "write steps as whole numbers, e.g. steps:0:1000:50 (STOP may be 'end')"
        start = _parse_int(fields[1], where, fix)
        stop_is_end = fields[2].strip().lower() == "end"
        stop = total if stop_is_end else _parse_int(fields[2], where, fix)
        every = _parse_int(fields[3], where, fix)
        if every < 1:
            raise CsnError(f"{where} has interval 0; the interval EVERY must be at least 1 step.")
        if not stop_is_end and start > stop:
            raise CsnError(f"{where} starts at step {start}, after its stop {stop}; write steps:START:STOP:EVERY with START <= STOP.")
        if start > total:
            if clip is not None:
                clip.append(seg)
                return []
            raise CsnError(f"{where} starts at step {start}, after the end of training ({length}); start it earlier or train longer.")
        if stop > total:
            if clip is None:
                raise CsnError(f"{where} stops at step {stop}, after the end of training ({length}); use 'end' or a stop <= {total}.")
            clip.append(seg)
            stop = total
        n = (stop - start) // every + 1
        if n > MAX_CHECKPOINTS:
            raise _too_many(seg, n, "use a larger interval")
        return list(range(start, stop + 1, every))
    raise CsnError(f"checkpoint segment {seg!r} is not a valid steps segment; write steps:log2:BOUND or steps:START:STOP:EVERY.")


def checkpoint_steps(spec: str | None, steps_per_epoch: int, epochs: float, *, clip: bool | None = None,
                     note: Callable[[str], None] | None = None) -> list[int]:
    """Resolve a checkpoint spec to the sorted, unique optimizer steps at which to save.

    Args:
        spec: comma-separated segments (see the module docstring), e.g. ``"steps:log2:256,1:end:1"``;
            ``None`` means :data:`DEFAULT_CHECKPOINTS`.
        steps_per_epoch: optimizer steps per epoch (>= 1).
        epochs: training length in epochs (float allowed); total steps = ``round(epochs * steps_per_epoch)``.
        clip: if True, points past the end of training are dropped (segments truncated) instead of being
            an error. ``None`` (the default) clips only the default schedule, so that it fits any training
            length; user specs that reach past training are errors.
        note: called with one line naming the segments that lost points when clip=True dropped some (a
            preset's schedule on a shortened training); the default schedule is clipped silently.

    Returns:
        Sorted unique steps in ``[0, total_steps]``, always including 0 (initialization) and
        ``total_steps`` (final). Step ``s`` is at epoch ``s / steps_per_epoch``.

    Raises:
        CsnError: malformed spec (bad numbers, EVERY <= 0, START > STOP, a segment past the end of
            training, unknown segment type, empty segment) or bad training length.
    """
    total = total_steps(steps_per_epoch, epochs)
    spe, epochs = int(steps_per_epoch), float(epochs)
    if spec is None:
        spec = DEFAULT_CHECKPOINTS
    if not isinstance(spec, str):
        raise CsnError(f"the checkpoint spec must be a string, got {type(spec).__name__}; pass e.g. {DEFAULT_CHECKPOINTS!r}.")
    is_default = "".join(spec.split()).lower() == DEFAULT_CHECKPOINTS
    if clip is None:
        clip = is_default
    if not spec.strip():
        raise CsnError(f"the checkpoint spec is empty; pass segments such as {DEFAULT_CHECKPOINTS!r} ({_CKPT_FORMS}).")
    points = {0, total}
    dropped: list[str] | None = [] if clip else None
    for raw in spec.split(","):
        seg = raw.strip()
        if not seg:
            raise CsnError(f"the checkpoint spec {spec!r} has an empty segment; remove the extra comma ({_CKPT_FORMS}).")
        fields = seg.lower().split(":")
        if fields[0].strip() == "steps":
            points.update(_steps_segment(seg, fields, total, dropped))
        elif len(fields) == 1:
            points.update(_point_segment(seg, spe, epochs, total, dropped))
        elif len(fields) == 3 and fields[0].strip().startswith("f"):
            points.update(_fraction_segment(seg, fields, total))
        elif len(fields) == 3:
            points.update(_epoch_segment(seg, fields, spe, epochs, total, dropped))
        else:
            raise CsnError(f"checkpoint segment {seg!r} has an unknown form; {_CKPT_FORMS}.")
    if dropped and note is not None and not is_default:
        note(f"note: checkpoint segment{'s' if len(dropped) > 1 else ''} {', '.join(dropped)} of the preset's schedule "
             f"reach{'' if len(dropped) > 1 else 'es'} past the end of training ({epochs:g} epochs = {total} steps); "
             "the points past the end are dropped.")
    return sorted(points)


# --------------------------------------------------------------------------------------------
# learning rate
# --------------------------------------------------------------------------------------------


def parse_milestones(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """Milestone epochs from ``"30,60"`` (or a sequence of numbers); empty/None -> ``()``.

    Milestones must be finite, > 0 and strictly increasing; otherwise CsnError.
    """
    if text is None:
        return ()
    if isinstance(text, str):
        parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
        values = [_parse_float(p, "milestones", "write milestone epochs like 30,60") for p in parts]
    else:
        try:
            items = list(text)
        except TypeError:
            raise CsnError(f"milestones must be a list of epochs, got {text!r}; pass e.g. (30, 60).") from None
        values = [_real(v, "a milestone") for v in items]
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
    w = _real(warmup_epochs, "warmup_epochs")
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
    lr = _real(base_lr, "base_lr")
    if lr < 0:
        raise CsnError(f"base_lr is {lr:g}; pass a learning rate >= 0.")
    w = warmup_steps(warmup_epochs, steps_per_epoch)
    if w > total_steps:
        raise CsnError(f"a warm-up of {warmup_epochs:g} epochs ({w} steps) is longer than training ({total_steps} steps); shorten the warm-up.")
    ms = parse_milestones(milestones)
    if name == "step":
        if not ms:
            raise CsnError("the 'step' lr schedule needs milestones (epochs where lr is multiplied by gamma); pass e.g. milestones=(30, 60).")
        g = _real(gamma, "gamma")
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


# --------------------------------------------------------------------------------------------
# alpha windows
# --------------------------------------------------------------------------------------------

Window = tuple[float, float | None, float]


class AlphaSchedule:
    """Regularizer strength alpha as a function of training progress in (fractional) epochs.

    ``windows`` are ``(start_epoch, end_epoch | None, alpha)`` with ``None`` meaning "until the end
    of training"; a window covers ``start <= epoch < end``. Outside every window alpha is 0.
    Windows are stored normalized: sorted, alpha-0 windows dropped, touching windows with the same
    alpha merged; two schedules are equal iff they give the same alpha at every epoch.
    Overlapping windows are an error (CsnError).

    ``str(schedule)`` is canonical: ``"none"`` for the zero schedule, else comma-separated
    ``ALPHA@START:END`` tokens (END may be ``end``), e.g. ``"-20@5:end"``; :func:`alpha_schedule`
    parses it back to an equal schedule.
    """

    __slots__ = ("_windows",)

    def __init__(self, windows: Iterable[Sequence[float | None]] = ()) -> None:
        parsed: list[Window] = []
        for w in windows:
            try:
                start, end, alpha = w
            except (TypeError, ValueError):
                raise CsnError(f"alpha window {w!r} is not (start_epoch, end_epoch or None, alpha); pass three values.") from None
            s = _real(start, "an alpha window's start epoch")
            e = None if end is None else _real(end, "an alpha window's end epoch")
            a = _real(alpha, "alpha")
            if s < 0:
                raise CsnError(f"alpha window starts at negative epoch {s:g}; start at 0 or later.")
            if e is not None and e <= s:
                raise CsnError(f"alpha window {fmt_number(s)}:{fmt_number(e)} is empty or reversed; the end epoch must be after the start.")
            parsed.append((s + 0.0, None if e is None else e + 0.0, a + 0.0))
        parsed.sort(key=lambda t: t[0])
        for (s0, e0, _), (s1, _, _) in zip(parsed, parsed[1:]):
            if e0 is None or e0 > s1:
                end_txt = "end" if e0 is None else fmt_number(e0)
                raise CsnError(f"alpha windows overlap (one spans {fmt_number(s0)}:{end_txt}, the next starts at {fmt_number(s1)}); make them disjoint.")
        merged: list[Window] = []
        for s, e, a in parsed:
            if a == 0:
                continue
            if merged and merged[-1][1] == s and merged[-1][2] == a:
                merged[-1] = (merged[-1][0], e, a)
            else:
                merged.append((s, e, a))
        self._windows: tuple[Window, ...] = tuple(merged)

    @property
    def windows(self) -> list[Window]:
        """Normalized ``(start_epoch, end_epoch | None, alpha)`` windows with alpha != 0, sorted."""
        return list(self._windows)

    @property
    def is_zero(self) -> bool:
        """True if alpha is 0 at every epoch (no regularization)."""
        return not self._windows

    def alpha_at(self, epoch: float) -> float:
        """Alpha at training progress ``epoch`` (fractional epochs; step / steps_per_epoch)."""
        for s, e, a in self._windows:
            if epoch >= s and (e is None or epoch < e):
                return a
        return 0.0

    def __str__(self) -> str:
        if not self._windows:
            return "none"
        return ",".join(f"{fmt_number(a)}@{fmt_number(s)}:{'end' if e is None else fmt_number(e)}" for s, e, a in self._windows)

    def __repr__(self) -> str:
        return f"AlphaSchedule({list(self._windows)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AlphaSchedule):
            return NotImplemented
        return self._windows == other._windows

    def __hash__(self) -> int:
        return hash(self._windows)


def parse_study_string(s: str) -> AlphaSchedule:
    """Parse the study's compact form, e.g. ``"0*5 -20*15"``: alpha 0 for 5 epochs, then -20 for 15.

    Tokens are ``VALUE*EPOCHS`` separated by whitespace and laid end to end from epoch 0. VALUE is
    any finite decimal (negatives, decimals and exponents such as ``-1.5e1*2.5``); EPOCHS must be
    > 0. **After the listed epochs alpha is 0** (the study listed the whole run). Malformed tokens
    raise CsnError quoting the token and the expected form.
    """
    if not isinstance(s, str):
        raise CsnError(f"the alpha schedule must be a string, got {type(s).__name__}; write {_STUDY_FORM}.")
    tokens = s.split()
    if not tokens:
        raise CsnError(f"the alpha schedule is empty; write {_STUDY_FORM}.")
    windows: list[Window] = []
    start = 0.0
    for tok in tokens:
        m = _STUDY_TOKEN_RE.fullmatch(tok)
        if not m:
            raise CsnError(f"bad alpha-schedule token {tok!r}; write {_STUDY_FORM}.")
        value, dur = float(m.group(1)), float(m.group(2))
        if not math.isfinite(value) or not math.isfinite(dur):
            raise CsnError(f"alpha-schedule token {tok!r} has a number out of range; write {_STUDY_FORM}.")
        if dur <= 0:
            raise CsnError(f"alpha-schedule token {tok!r} lasts {dur:g} epochs; each token's EPOCHS must be > 0, e.g. '0*5 -20*15'.")
        end = start + dur
        if not math.isfinite(end) or end <= start:
            raise CsnError(f"alpha-schedule token {tok!r} is too short to register after epoch {start:g}; use a longer duration.")
        windows.append((start, end, value))
        start = end
    return AlphaSchedule(windows)


def parse_alpha_windows(s: str) -> AlphaSchedule:
    """Parse the canonical form written by ``str(AlphaSchedule)``: ``"none"`` or ``ALPHA@START:END,...``.

    END may be ``end``; tokens may be separated by commas and/or whitespace.
    """
    if not isinstance(s, str):
        raise CsnError(f"the alpha windows must be a string, got {type(s).__name__}; write e.g. '-20@5:end'.")
    text = s.strip()
    if text.lower() == "none":
        return AlphaSchedule()
    tokens = [t for t in re.split(r"[,\s]+", text) if t]
    if not tokens:
        raise CsnError("the alpha windows are empty; write ALPHA@START:END tokens, e.g. '-20@5:end', or 'none'.")
    windows: list[Window] = []
    for tok in tokens:
        m = _WINDOW_TOKEN_RE.fullmatch(tok)
        if not m:
            raise CsnError(f"bad alpha-window token {tok!r}; write ALPHA@START:END tokens separated by commas, e.g. '-20@5:end'.")
        a, st = float(m.group(1)), float(m.group(2))
        end = None if m.group(3).lower() == "end" else float(m.group(3))
        if not all(math.isfinite(v) for v in (a, st) + (() if end is None else (end,))):
            raise CsnError(f"alpha-window token {tok!r} has a number out of range; use finite numbers.")
        windows.append((st, end, a))
    return AlphaSchedule(windows)


def alpha_schedule(spec: str | None = None) -> AlphaSchedule:
    """An :class:`AlphaSchedule` from the study string (``"0*5 -20*15"``) or the canonical form (``"-20@5:end"``,
    ``"none"``); None or a blank spec is the zero schedule (no regularization)."""
    if spec is None:
        return AlphaSchedule()
    if not isinstance(spec, str):
        raise CsnError(f"the alpha schedule must be a string, got {type(spec).__name__}; write {_STUDY_FORM}.")
    text = spec.strip()
    if not text:
        return AlphaSchedule()
    if text.lower() == "none" or "@" in text:
        return parse_alpha_windows(text)
    return parse_study_string(text)


# --------------------------------------------------------------------------------------------
# alpha windows in any time unit (steps, epochs, fractions of training), resolved to steps
# --------------------------------------------------------------------------------------------

WINDOW_FORMS = ("write START:END with points in epochs (0.25), steps (step=64), fractions of training (f0.1) or "
                "'end', e.g. 0:0.25, step=0:step=64, f0:f0.1 or 1:end; separate several windows with commas")


class AlphaWindow(NamedTuple):
    """The regularizer at strength `alpha` from time point `start` up to, not including, `end`."""

    start: TimePoint
    end: TimePoint
    alpha: float

    def __str__(self) -> str:
        return f"{fmt_number(self.alpha)}@{self.start}:{self.end}"


def parse_window_points(text: str, what: str = "--reg-window") -> list[tuple[TimePoint, TimePoint]]:
    """``'0:0.25,step=64:step=128,f0.5:end'`` -> [(start, end), ...], in the order written.

    Each window is START:END with points as :func:`parse_time` reads them. A window starting at
    'end', or starting at or after its end when both points are in the same unit, is a CsnError;
    windows in different units are checked once they are resolved to steps (:meth:`AlphaWindows.resolve`).
    """
    if not isinstance(text, str):
        raise CsnError(f"{what} must be text START:END, got {text!r}; {WINDOW_FORMS}.")
    tokens = [t.strip() for t in text.split(",")]
    if not any(tokens) or not all(tokens):
        raise CsnError(f"{what} {text!r} has an empty window; {WINDOW_FORMS}.")
    out = []
    for tok in tokens:
        fields = tok.split(":")
        if len(fields) != 2:
            raise CsnError(f"{what} {tok!r} is not START:END; {WINDOW_FORMS}.")
        start, end = parse_time(fields[0], f"{what} {tok!r} start"), parse_time(fields[1], f"{what} {tok!r} end")
        if start.unit == "end":
            raise CsnError(f"{what} {tok!r} starts at the end of training, so it would never apply; start it earlier.")
        if start.unit == end.unit and start.value >= end.value:
            raise CsnError(f"{what} {tok!r} starts at or after its end; write START:END with START < END, or START:end.")
        out.append((start, end))
    return out


def first_step_at(point: TimePoint, steps_per_epoch: int, total: int) -> int:
    """The first optimizer step >= `point`: a step as written; for an epoch e the least step i with
    i / steps_per_epoch >= e, for a fraction f the least i with i / total >= f (so an epoch window
    switches exactly where ``AlphaSchedule.alpha_at(step / steps_per_epoch)`` does); 'end' is `total`.

    The point must lie within training in its own unit (checked by the caller).
    """
    if point.unit == "end":
        return int(total)
    if point.unit == "step":
        return int(point.value)
    denom = steps_per_epoch if point.unit == "epoch" else total
    i = max(0, math.ceil(point.value * denom))
    while i > 0 and (i - 1) / denom >= point.value:
        i -= 1
    while i / denom < point.value:
        i += 1
    return i


class StepWindows:
    """Alpha per optimizer step: windows ``(start_step, end_step, alpha)``, on for start <= step < end.

    Step i is the update from checkpoint step i to i + 1 (training.parquet logs it at step i + 1), so
    the checkpoint at ``end_step`` holds the weights after the window's last regularized update.
    """

    __slots__ = ("windows",)

    def __init__(self, windows: Iterable[tuple[int, int, float]] = ()) -> None:
        self.windows: tuple[tuple[int, int, float], ...] = tuple((int(s), int(e), float(a)) for s, e, a in windows)

    @property
    def is_zero(self) -> bool:
        """True if alpha is 0 at every step (no regularization)."""
        return not self.windows

    def alpha_at(self, step: int) -> float:
        """Alpha of the update at optimizer step `step` (0-based)."""
        for s, e, a in self.windows:
            if s <= step < e:
                return a
        return 0.0

    def to_json(self) -> list[dict]:
        """[{start_step, end_step, alpha}, ...] (recorded in run.json)."""
        return [{"start_step": s, "end_step": e, "alpha": a} for s, e, a in self.windows]

    def __repr__(self) -> str:
        return f"StepWindows({list(self.windows)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StepWindows) and self.windows == other.windows

    def __hash__(self) -> int:
        return hash(self.windows)


class AlphaWindows:
    """Alpha windows as written (time points in steps, epochs, fractions or 'end'); alpha-0 windows are
    dropped. :meth:`resolve` turns them into :class:`StepWindows` once the training length is known."""

    __slots__ = ("windows",)

    def __init__(self, windows: Iterable[AlphaWindow] = ()) -> None:
        self.windows: tuple[AlphaWindow, ...] = tuple(w for w in windows if w.alpha != 0)

    @classmethod
    def from_schedule(cls, schedule: AlphaSchedule) -> AlphaWindows:
        """The windows of an epoch-based :class:`AlphaSchedule` (study string or canonical form)."""
        return cls(AlphaWindow(TimePoint("epoch", s), TimePoint("end", 0.0) if e is None else TimePoint("epoch", e), a)
                   for s, e, a in schedule.windows)

    @property
    def is_zero(self) -> bool:
        """True if no window has alpha != 0."""
        return not self.windows

    def __str__(self) -> str:
        return ",".join(map(str, self.windows)) if self.windows else "none"

    def __repr__(self) -> str:
        return f"AlphaWindows({str(self)!r})"

    def resolve(self, steps_per_epoch: int, total_steps: int, epochs: float | None = None) -> StepWindows:
        """Optimizer steps of every window in a training of `total_steps` steps, `steps_per_epoch` per epoch
        (`epochs`: the configured length, default total / steps_per_epoch).

        A window [a, b) is on from the first step >= a to the first step >= b (:func:`first_step_at`); an
        end in the training's last fraction of a step is clipped to the last step. CsnError for a window
        starting at or after the end of training, ending after it, covering no step, or overlapping another.
        """
        spe, total = int(steps_per_epoch), int(total_steps)
        epochs = total / spe if epochs is None else float(epochs)
        length = f"training is {epochs:g} epochs = {total} steps"
        resolved = []
        for w in self.windows:
            span = f"alpha {fmt_number(w.alpha)} window {w.start}:{w.end}"
            if _point_beyond(w.start, total, epochs) or first_step_at(w.start, spe, total) >= total:
                raise CsnError(f"{span} starts at or after the end of training ({length}), so it would never apply; "
                               "start it earlier or train longer.")
            if _point_beyond(w.end, total, epochs):
                raise CsnError(f"{span} ends after the end of training ({length}); end it by then or use 'end'.")
            a, b = first_step_at(w.start, spe, total), min(total, first_step_at(w.end, spe, total))
            if b <= a:
                raise CsnError(f"{span} covers no optimizer step (it resolves to steps [{a}, {b}) with {spe} steps per "
                               "epoch); make it longer or write it in steps (step=N).")
            resolved.append((a, b, w.alpha, str(w)))
        resolved.sort(key=lambda r: r[0])
        merged: list[tuple[int, int, float]] = []
        for (_, b0, _, w0), (a1, _, _, w1) in zip(resolved, resolved[1:]):
            if b0 > a1:
                raise CsnError(f"alpha windows {w0} and {w1} overlap (steps from {a1} to {b0}); make them disjoint.")
        for a, b, alpha, _ in resolved:
            if merged and merged[-1][1] == a and merged[-1][2] == alpha:
                merged[-1] = (merged[-1][0], b, alpha)
            else:
                merged.append((a, b, alpha))
        return StepWindows(merged)


def _point_beyond(point: TimePoint, total: int, epochs: float) -> bool:
    """Whether a time point lies after the end of training in its own unit (fractions never do)."""
    if point.unit == "step":
        return point.value > total
    if point.unit == "epoch":
        return _beyond(point.value, epochs)
    return False


def alpha_windows(spec: str | None = None, alpha: float | str | None = None, window: str | None = None) -> AlphaWindows:
    """:class:`AlphaWindows` from whichever form the user gave: ``alpha`` + ``window`` (one or more
    comma-separated START:END windows in any time unit, :func:`parse_window_points`), or ``spec`` (the
    study string or the canonical epoch form, :func:`alpha_schedule`), or nothing (no windows). Giving only
    one of ``alpha`` and ``window``, or ``spec`` with them, is a CsnError."""
    if alpha is None and window is None:
        return AlphaWindows.from_schedule(alpha_schedule(spec))
    if isinstance(spec, str) and spec.strip():
        raise CsnError("an alpha schedule string was given together with --reg-alpha/--reg-window; use one form, "
                       "e.g. '0*5 -20*15' or --reg-alpha -20 --reg-window 5:end.")
    if alpha is None or window is None:
        missing = "--reg-alpha" if alpha is None else "--reg-window"
        raise CsnError(f"{missing} is missing: --reg-alpha and --reg-window are needed together; give both "
                       "(e.g. --reg-alpha -20 --reg-window 5:end) or neither.")
    a = _real(alpha, "--reg-alpha")
    return AlphaWindows(AlphaWindow(s, e, a) for s, e in parse_window_points(window))


__all__ += ["WINDOW_FORMS", "AlphaWindow", "AlphaWindows", "StepWindows", "alpha_windows", "first_step_at",
            "parse_window_points"]
