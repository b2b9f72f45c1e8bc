"""Alpha windows of the selectivity regularizer (``loss = CE - alpha * R``): when it is on and how strongly.

:class:`AlphaSchedule` maps a (fractional) epoch to alpha. It is built from the study's compact
string (``"0*5 -20*15"``, :func:`parse_study_string`) or the canonical string ``str(schedule)``
(``"-20@5:end"``, :func:`parse_alpha_windows`); :func:`alpha_schedule` dispatches.
:class:`AlphaWindows` holds windows in any time unit (``--reg-window step=0:step=64,f0.5:end``,
:func:`alpha_windows`); the training loop resolves them to optimizer steps (:class:`StepWindows`)
once the training length is known: a window [a, b) is on from the first step >= a to the first
step >= b (for epoch windows the same steps as ``AlphaSchedule.alpha_at(step / steps_per_epoch)``).

Every kind of window is kept in one normal form (:func:`disjoint_windows`: sorted, overlaps refused, alpha-0 windows
dropped, touching windows of equal alpha merged). Pure Python (no torch); malformed input raises
:class:`~csn.errors.CsnError` naming the problem and the fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, TypeVar

from csn.core.times import NUMBER, TimePoint, beyond, fmt_number, parse_time, real
from csn.errors import CsnError

_STUDY_TOKEN_RE = re.compile(rf"({NUMBER})\*({NUMBER})", re.ASCII)
_WINDOW_TOKEN_RE = re.compile(rf"({NUMBER})@({NUMBER}):({NUMBER}|end)", re.ASCII | re.IGNORECASE)
_STUDY_FORM = "VALUE*EPOCHS tokens separated by spaces, e.g. '0*5 -20*15' (alpha 0 for 5 epochs, then -20 for 15)"

Window = tuple[float, float | None, float]
T = TypeVar("T", int, float)


def disjoint_windows(windows: Sequence[tuple[T, T | None, float]],
                     overlap: Callable[[int, int], CsnError]) -> list[tuple[T, T | None, float]]:
    """The one normal form of windows (start, end, alpha), each on for start <= t < end (end None: to the end of
    training), in epochs or in steps: sorted by start (stably), checked disjoint, alpha-0 windows dropped and
    touching windows of equal alpha merged. Two windows that overlap raise overlap(i, j), i and j their positions
    in `windows` (the earlier-starting one first)."""
    order = sorted(range(len(windows)), key=lambda i: windows[i][0])
    for i, j in zip(order, order[1:]):
        end, next_start = windows[i][1], windows[j][0]
        if end is None or end > next_start:
            raise overlap(i, j)
    merged: list[tuple[T, T | None, float]] = []
    for s, e, a in (windows[i] for i in order):
        if a == 0:
            continue
        if merged and merged[-1][1] == s and merged[-1][2] == a:
            merged[-1] = (merged[-1][0], e, a)
        else:
            merged.append((s, e, a))
    return merged


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
            s = real(start, "an alpha window's start epoch")
            e = None if end is None else real(end, "an alpha window's end epoch")
            a = real(alpha, "alpha")
            if s < 0:
                raise CsnError(f"alpha window starts at negative epoch {s:g}; start at 0 or later.")
            if e is not None and e <= s:
                raise CsnError(f"alpha window {fmt_number(s)}:{fmt_number(e)} is empty or reversed; the end epoch must be after the start.")
            parsed.append((s + 0.0, None if e is None else e + 0.0, a + 0.0))

        def overlap(i: int, j: int) -> CsnError:
            (s0, e0, _), s1 = parsed[i], parsed[j][0]
            end_txt = "end" if e0 is None else fmt_number(e0)
            return CsnError(f"alpha windows overlap (one spans {fmt_number(s0)}:{end_txt}, the next starts at "
                            f"{fmt_number(s1)}); make them disjoint.")

        self._windows: tuple[Window, ...] = tuple(disjoint_windows(parsed, overlap))

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
            resolved.append((a, b, w.alpha))

        def overlap(i: int, j: int) -> CsnError:
            return CsnError(f"alpha windows {self.windows[i]} and {self.windows[j]} overlap (steps from "
                            f"{resolved[j][0]} to {resolved[i][1]}); make them disjoint.")

        return StepWindows(disjoint_windows(resolved, overlap))


def _point_beyond(point: TimePoint, total: int, epochs: float) -> bool:
    """Whether a time point lies after the end of training in its own unit (fractions never do)."""
    if point.unit == "step":
        return point.value > total
    if point.unit == "epoch":
        return beyond(point.value, epochs)
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
    a = real(alpha, "--reg-alpha")
    return AlphaWindows(AlphaWindow(s, e, a) for s, e in parse_window_points(window))



__all__ = ["WINDOW_FORMS", "AlphaSchedule", "AlphaWindow", "AlphaWindows", "StepWindows", "alpha_schedule",
           "alpha_windows", "disjoint_windows", "first_step_at", "parse_alpha_windows", "parse_study_string",
           "parse_window_points"]
