"""Points in training, one grammar for every flag and file: checkpoint selectors (`csn selectivity RUN --checkpoints`),
a study's times (`selectivity_checkpoints = ["0:f0.25", "end"]`), the training schedule's single points (`csn train
--checkpoints step=8,f0.5,end`), regularizer windows and onsets (`--onsets step=0,f0.33`, `late_onset`).

A point is
    ``step=N``   optimizer step N (the early phase is counted in steps: the selectivity peak comes within ~64),
    ``E``        a bare number is an **epoch**, in every flag and file (1.5 = half-way through the second epoch),
    ``fF``       a fraction of training in [0, 1] (transfers across dataset sizes and training lengths),
    ``end``      the last step (``last`` is the same point).
A list is points and ranges separated by commas; a range ``A:B`` is every checkpoint from A to B inclusive (A or B
empty: from the start / to the end). Selecting checkpoints, a point picks the checkpoint nearest to it, the earlier
one on a tie (:func:`nearest_step`); a ``step=N`` with no checkpoint at N says which one it took.

Until 2026-12-05 a checkpoint selector read a bare number as a step (``--checkpoints 64`` = step 64) while study
times and windows read it as an epoch; csn now reads it as an epoch everywhere, and a selector given a bare number
says so in one line naming the explicit form (``step=64``), so no one is moved to another point unknowingly.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real

from csn.errors import CsnError

TIME_FORMS = "a step 'step=64', an epoch '1.5', a fraction of training 'f0.25', or 'end'"
"""How a point in training is written (for error messages)."""

LIST_FORMS = f"points ({TIME_FORMS}) and ranges 'A:B' separated by commas"

NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
"""A decimal number as csn reads one from text (no nan/inf/underscores/non-ASCII digits), for grammars built on it."""
_NUM_RE = re.compile(NUMBER, re.ASCII)
TOL = 1e-9
"""Relative float noise forgiven where a point is compared with the end of training (`beyond`)."""


def fmt_number(x: float) -> str:
    """Shortest text that parses back to exactly x (integers without '.0')."""
    if x == 0:
        return "0"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


class TimePoint:
    """A point in training written in steps (``step=64``), epochs (``1.5``), fractions of training (``f0.25``)
    or ``end``; `step(spe, total)` resolves it to an optimizer step: an epoch e to round(e * steps_per_epoch), a
    fraction f to round(f * total_steps)."""

    __slots__ = ("unit", "value")

    def __init__(self, unit: str, value: float) -> None:
        if unit not in ("step", "epoch", "fraction", "end"):
            raise ValueError(unit)
        self.unit, self.value = unit, float(value)

    def step(self, steps_per_epoch: int, total: int) -> int:
        """The optimizer step of this point in a training of `total` steps, `steps_per_epoch` per epoch."""
        if self.unit == "end":
            return int(total)
        if self.unit == "step":
            return int(self.value)
        if self.unit == "epoch":
            return int(round(self.value * steps_per_epoch))
        return int(round(self.value * total))

    def __str__(self) -> str:
        if self.unit == "end":
            return "end"
        if self.unit == "step":
            return f"step={int(self.value)}"
        return ("f" if self.unit == "fraction" else "") + fmt_number(self.value)

    def __repr__(self) -> str:
        return f"TimePoint({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TimePoint) and (self.unit, self.value) == (other.unit, other.value)

    def __hash__(self) -> int:
        return hash((self.unit, self.value))


def number(text: str, where: str, fix: str, *, whole: bool = False, digits: int = 4000) -> int | float:
    """The one parser of a number a user typed: a finite decimal number (NUMBER) as a float, or (whole=True) a
    non-negative whole number of steps of at most `digits` decimal digits as an int; anything else is a CsnError
    '<where>: <text> is not ...; <fix>.'"""
    t = text.strip()
    if whole:
        if not re.fullmatch(rf"\+?\d{{1,{int(digits)}}}", t, re.ASCII):
            raise CsnError(f"{where}: {t!r} is not a whole number of steps; {fix}.")
        return int(t)
    if not _NUM_RE.fullmatch(t):
        raise CsnError(f"{where}: {t!r} is not a number; {fix}.")
    value = float(t)
    if not math.isfinite(value):
        raise CsnError(f"{where}: {t!r} is out of range; {fix}.")
    return value


def real(value: object, what: str) -> float:
    """A number given as a value (int/float) or text (`number`) as a finite float, or a CsnError naming `what`."""
    if isinstance(value, bool) or value is None:
        raise CsnError(f"{what} must be a number, got {value!r}; pass a finite number.")
    if isinstance(value, str):
        return number(value, what, "pass a finite number such as -20 or 0.5")
    if not isinstance(value, Real):
        raise CsnError(f"{what} must be a number, got {type(value).__name__}; pass a finite number.")
    out = float(value)
    if not math.isfinite(out):
        raise CsnError(f"{what} must be finite, got {value!r}; pass a finite number.")
    return out


def beyond(x: float, limit: float) -> bool:
    """x > limit, forgiving float noise of a few ulps (TOL)."""
    return x > limit + TOL * max(1.0, abs(limit))


def parse_time(text: str | float | int, what: str = "time") -> TimePoint:
    """Parse a point in training: ``step=N`` (a whole number of steps), ``fF`` (a fraction of training in
    [0, 1]), ``end`` or ``last``, or a number of epochs (>= 0). Anything else is a CsnError naming `what`."""
    if isinstance(text, bool):
        raise CsnError(f"{what} {text!r} is not a point in training; write {TIME_FORMS}.")
    if isinstance(text, (int, float)):
        text = fmt_number(float(text)) if math.isfinite(text) else str(text)
    t = str(text).strip().lower()
    fix = f"write {TIME_FORMS}"
    where = f"{what} {text!r}"
    if t in ("end", "last", "step=end"):
        return TimePoint("end", 0.0)
    if t.startswith("step="):
        return TimePoint("step", number(t[5:], where, fix, whole=True, digits=18))
    if t.startswith("f"):
        f = number(t[1:], where, fix)
        if not 0 <= f <= 1:
            raise CsnError(f"{what} {text!r} is a fraction of training outside [0, 1]; {fix}.")
        return TimePoint("fraction", f)
    if not _NUM_RE.fullmatch(t):
        raise CsnError(f"{what} {text!r} is not a point in training; {fix}.")
    e = number(t, where, fix)
    if e < 0:
        raise CsnError(f"{what} {text!r} is a negative epoch; {fix}.")
    return TimePoint("epoch", e)


def is_bare_number(text: str) -> bool:
    """Whether `text` is a bare number (an epoch, in csn's grammar)."""
    return bool(_NUM_RE.fullmatch(text.strip()))


@dataclass(frozen=True)
class TimeRange:
    """Every checkpoint from `start` to `stop` inclusive (None: from the first / to the last)."""

    start: TimePoint | str | None
    stop: TimePoint | str | None

    def __str__(self) -> str:
        return f"{self.start or ''}:{self.stop or ''}"


Item = TimePoint | TimeRange | str
"""One item of a list: a point, a range, or a keyword the caller allows ('all', 'first', 'peak')."""


def parse_times(text: str | Sequence[str], what: str = "--checkpoints", keywords: Sequence[str] = ()) -> list[Item]:
    """A list of points and ranges (LIST_FORMS), as one comma-separated string or a sequence of items (a study file's
    list); `keywords` are further words the caller gives a meaning (kept as lower-case strings, also as a range's
    ends). An empty list, an empty item or a malformed point is a CsnError naming `what` and the forms."""
    parts = [p for t in ([text] if isinstance(text, str) else list(text)) for p in str(t).split(",")]
    if not parts or not any(p.strip() for p in parts):
        raise CsnError(f"{what} is empty; write {LIST_FORMS}.")
    keys = {k.lower() for k in keywords}

    def point(t: str) -> TimePoint | str:
        low = t.strip().lower()
        return low if low in keys else parse_time(low, what)

    items: list[Item] = []
    for raw in parts:
        tok = raw.strip()
        if not tok:
            raise CsnError(f"{what} {text!r} has an empty item; remove the extra comma ({LIST_FORMS}).")
        if ":" in tok:
            fields = tok.split(":")
            if len(fields) != 2:
                raise CsnError(f"{what} item {tok!r} is not a range A:B; write {LIST_FORMS} (a checkpoint schedule "
                               "with an interval, START:STOP:EVERY, belongs to `csn train --checkpoints`).")
            a, b = (f.strip() for f in fields)
            items.append(TimeRange(point(a) if a else None, point(b) if b else None))
        else:
            items.append(point(tok))
    return items


def onset_epoch(point: str | TimePoint, steps_per_epoch: int, total: int, *, what: str = "late_onset",
                from_zero: bool = False) -> float:
    """The epoch (step / steps_per_epoch, exact) where a condition starting at `point` switches on: its step must lie
    inside training, after step 0 unless from_zero (a regularizer from the first step)."""
    tp = point if isinstance(point, TimePoint) else parse_time(point, what)
    step, first = tp.step(steps_per_epoch, total), 0 if from_zero else 1
    if not first <= step < total:
        raise CsnError(f"{what} {tp} is step {step}, outside training (steps {first} to {total - 1}): choose a point "
                       f"strictly inside training (e.g. f0.33){'' if from_zero else ', after step 0'} and before the end.")
    return step / steps_per_epoch


def steps_text(steps: Sequence[int]) -> str:
    """Checkpoint steps as a selector that names exactly them: 'step=0,step=64,step=936'."""
    return ",".join(f"step={int(s)}" for s in steps)


def nearest_step(steps: Sequence[int], want: int) -> int:
    """The step of `steps` nearest to `want`; the earlier one on a tie. csn's one rule for 'the nearest checkpoint'."""
    return min(steps, key=lambda s: (abs(s - want), s))


def resolve(items: Sequence[Item], steps: Sequence[int], steps_per_epoch: int, total: int, *,
            keyword: Callable[[str], int | list[int]] | None = None, what: str = "--checkpoints",
            note: Callable[[str], None] | None = None) -> list[int]:
    """The checkpoint steps (of `steps`, sorted) that `items` select on a run of `total` steps: a point its nearest
    checkpoint (a point past the run's last checkpoint is an error), a range every checkpoint in it; a keyword
    resolves through `keyword(word)` to a step (or, as an item, a list of steps). `note` is told when a step=N
    point has no checkpoint at N and the nearest one was taken."""
    steps = sorted(steps)
    if not steps:
        raise CsnError(f"{what}: the run has no checkpoints yet; train it first.")
    last = steps[-1]

    def at(p: TimePoint | str) -> int:
        if isinstance(p, str):
            if keyword is None:
                raise CsnError(f"{what}: {p!r} is not a point in training here; write {TIME_FORMS}.")
            got = keyword(p)
            if isinstance(got, list):
                raise CsnError(f"{what}: {p!r} cannot be a range's end; write {TIME_FORMS}.")
            return got
        return p.step(steps_per_epoch, total)

    out: set[int] = set()
    for item in items:
        if isinstance(item, TimeRange):
            lo = steps[0] if item.start is None else at(item.start)
            hi = last if item.stop is None else at(item.stop)
            out.update(s for s in steps if lo <= s <= hi)
        elif isinstance(item, str) and keyword is not None and isinstance(got := keyword(item), list):
            out.update(got)
        else:
            want = at(item)
            if want > last and not (isinstance(item, TimePoint) and item.unit == "end"):
                at = "" if item.unit == "step" else f" (step {want})"
                raise CsnError(f"{what} {item}{at} is after the run's last checkpoint (step {last}); choose a point up "
                               f"to step={last} (or 'end').")
            got = nearest_step(steps, want)
            if got != want and isinstance(item, TimePoint) and item.unit == "step" and note is not None:
                note(f"note: {what} {item}: no checkpoint at step {want}; using the nearest, step {got}.")
            out.add(got)
    return sorted(out)


__all__ = ["TIME_FORMS", "LIST_FORMS", "TimePoint", "TimeRange", "Item", "parse_time", "parse_times", "is_bare_number",
           "nearest_step", "resolve", "fmt_number", "steps_text", "onset_epoch", "NUMBER", "TOL", "number", "real", "beyond"]
