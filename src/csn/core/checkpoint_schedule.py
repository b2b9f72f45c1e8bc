"""Training checkpoint schedules: at which optimizer steps `csn train` saves the weights.

Pure Python (no torch). A spec is parsed strictly: a malformed one raises :class:`~csn.errors.CsnError` naming the
problem and the fix, never a silently different schedule.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

from csn.core.times import TOL, beyond, fmt_number, is_bare_number, number, parse_time
from csn.errors import CsnError

#: Initialization, every 1/8 epoch for epoch 0-1, every 1/4 for 1-3, then every epoch.
DEFAULT_CHECKPOINTS = "0:1:0.125,1:3:0.25,3:end:1"

#: Upper bound on the points one checkpoint segment may ask for (guards against typos like 1e-9).
MAX_CHECKPOINTS = 1_000_000

_CKPT_FORMS = (
    "segments are START:STOP:EVERY in epochs (e.g. 0:1:0.125 or 3:end:1), fSTART:fSTOP:fEVERY in fractions of "
    "training (f0.5:end:f0.25), steps:log2:BOUND, steps:START:STOP:EVERY in steps, or single points step=N, fF, "
    "an epoch or end, separated by commas"
)


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
    start = number(fields[0], where, fix)
    stop_is_end = fields[1].strip().lower() == "end"
    stop = epochs if stop_is_end else number(fields[1], where, fix)
    every = number(fields[2], where, fix)
    length = f"training is {epochs:g} epochs = {total} steps"
    if start < 0:
        raise CsnError(f"{where} starts at negative epoch {start:g}; start at 0 or later.")
    if every <= 0:
        raise CsnError(f"{where} has interval {every:g}; the interval EVERY must be > 0 epochs.")
    if not stop_is_end and start > stop:
        raise CsnError(f"{where} starts at epoch {start:g}, after its stop {stop:g}; write START:STOP:EVERY with START <= STOP.")
    if beyond(start, epochs):
        if clip is not None:
            clip.append(seg)
            return []
        raise CsnError(f"{where} starts at epoch {start:g}, after the end of training ({length}); start it earlier or train longer.")
    if not stop_is_end and beyond(stop, epochs):
        if clip is None:
            raise CsnError(f"{where} stops at epoch {stop:g}, after the end of training ({length}); use 'end' or a stop <= {epochs:g}.")
        clip.append(seg)
        stop = epochs
    q = max(0.0, (stop - start) / every)
    if not math.isfinite(q) or q + 1 > MAX_CHECKPOINTS:
        raise _too_many(seg, q + 1, "use a larger interval (one step is 1/steps_per_epoch epochs)")
    n = math.floor(q + TOL) + 1
    return [min(total, round((start + k * every) * spe)) for k in range(n)]


def _fraction_segment(seg: str, fields: list[str], total: int) -> list[int]:
    """fSTART:fSTOP:fEVERY in fractions of training (STOP may be 'end'); never past the end."""
    where = f"checkpoint segment {seg!r}"
    fix = "write fractions of training as f0.25 (fSTART:fSTOP:fEVERY, each with its 'f'; fSTOP may be 'end')"
    stop_is_end = fields[1].strip().lower() == "end"
    if not all(f.strip().lower().startswith("f") for f in (fields[0], fields[2]) + (() if stop_is_end else (fields[1],))):
        raise CsnError(f"{where} mixes fractions of training with epochs; {fix}.")
    start, every = (number(fields[i].strip()[1:], where, fix) for i in (0, 2))
    stop = 1.0 if stop_is_end else number(fields[1].strip()[1:], where, fix)
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
    return [min(total, round((start + k * every) * total)) for k in range(math.floor(q + TOL) + 1)]


def _point_segment(seg: str, spe: int, epochs: float, total: int, clip: list[str] | None) -> list[int]:
    """One point in training (parse_time): step=N, fF, an epoch, or end; step=end is the final step."""
    low = seg.lower()
    if not (low in ("end", "last", "step=end") or low.startswith(("step=", "f")) or is_bare_number(low)):
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
        base = number(kind[3:] or "?", where, "write the log base as a whole number, e.g. steps:log2:512", whole=True)
        if base < 2:
            raise CsnError(f"{where} uses log base {base}; the base must be 2 or more, e.g. steps:log2:512.")
        bound_is_end = fields[2].strip().lower() == "end"
        bound = total if bound_is_end else number(fields[2], where, "write the bound in whole steps or 'end', e.g. steps:log2:512", whole=True)
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
        start = number(fields[1], where, fix, whole=True)
        stop_is_end = fields[2].strip().lower() == "end"
        stop = total if stop_is_end else number(fields[2], where, fix, whole=True)
        every = number(fields[3], where, fix, whole=True)
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


__all__ = ["DEFAULT_CHECKPOINTS", "MAX_CHECKPOINTS", "checkpoint_steps", "total_steps"]
