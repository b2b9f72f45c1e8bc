"""One grammar for points in training (csn.core.times): the same text means the same point in a checkpoint
selector, a study's times, a training schedule and an onset; a bare number is an epoch everywhere, and a selector
given one says so, naming step=N; the nearest checkpoint is one rule (the earlier on a tie)."""

from __future__ import annotations

import random

import pytest

from csn.core.checkpoint_schedule import checkpoint_steps
from csn.core.times import TimePoint, TimeRange, nearest_step, parse_time, parse_times, resolve
from csn.errors import CsnError
from csn.experiments.regularize import parse_onsets
from csn.experiments.study import select_steps
from csn.runs.run import Checkpoint, nearest_checkpoint, select_checkpoints

SPE, TOTAL = 468, 936
STEPS = [0, 8, 16, 32, 64, 117, 234, 312, 468, 702, 936]
CKPTS = [Checkpoint(s, s / SPE, f"step-{s:08d}.safetensors", "0" * 64) for s in STEPS]


def naive_step(text: str) -> int:
    """The step a point names, written out for the test."""
    t = text.strip().lower()
    if t in ("end", "last"):
        return TOTAL
    if t.startswith("step="):
        return int(t[5:])
    if t.startswith("f"):
        return int(round(float(t[1:]) * TOTAL))
    return int(round(float(t) * SPE))


def naive_nearest(want: int) -> int:
    best = None
    for s in STEPS:  # in increasing order: a later step replaces only a strictly nearer one
        if best is None or abs(s - want) < abs(best - want):
            best = s
    return best


@pytest.mark.parametrize("text, unit", [("step=64", "step"), ("1.5", "epoch"), ("f0.25", "fraction"), ("end", "end"),
                                        ("last", "end"), ("step=end", "end"), (" F0.5 ", "fraction"), (2, "epoch")])
def test_every_form_of_a_point(text, unit):
    p = parse_time(text)
    assert p.unit == unit and parse_time(str(p)) == p  # the canonical text reads back to the same point


@pytest.mark.parametrize("text", ["step=1.5", "f1.5", "-1", "nan", "inf", "step=-3", "e", "1e999", "", "peak"])
def test_malformed_points_are_refused(text):
    with pytest.raises(CsnError, match="step=64"):
        parse_time(text)


def test_points_resolve_to_the_nearest_checkpoint_against_a_naive_reference():
    rng = random.Random(0)
    forms = [lambda: f"step={rng.randrange(0, TOTAL + 1)}", lambda: f"{rng.uniform(0, 2):.4f}",
             lambda: f"f{rng.uniform(0, 1):.4f}", lambda: "end"]
    for _ in range(500):
        text = rng.choice(forms)()
        got = resolve(parse_times(text), STEPS, SPE, TOTAL)
        assert got == [naive_nearest(naive_step(text))], text
    assert nearest_step([0, 10, 20], 15) == 10 and nearest_step([0, 10, 20], 16) == 20  # the earlier on a tie


def test_ranges_take_every_checkpoint_inside_inclusive():
    rng = random.Random(1)
    for _ in range(300):
        a, b = sorted(rng.sample(["step=8", "step=64", "0.25", "f0.1", "f0.5", "1", "end", "0"], 2), key=naive_step)
        got = resolve(parse_times(f"{a}:{b}"), STEPS, SPE, TOTAL)
        assert got == [s for s in STEPS if naive_step(a) <= s <= naive_step(b)], (a, b)
    assert resolve(parse_times(":step=16"), STEPS, SPE, TOTAL) == [0, 8, 16]
    assert resolve(parse_times("f0.5:"), STEPS, SPE, TOTAL) == [468, 702, 936]


def test_lists_parse_from_text_and_from_a_file_list_alike():
    assert parse_times("step=8, f0.5 ,end") == parse_times(["step=8", "f0.5", "end"]) == [
        TimePoint("step", 8), TimePoint("fraction", 0.5), TimePoint("end", 0)]
    assert parse_times("peak:end", keywords=("peak",)) == [TimeRange("peak", TimePoint("end", 0))]
    for bad, msg in (("step=8,,end", "empty item"), ("", "is empty"), ("0:1:0.25", "START:STOP:EVERY"),
                     ("peak", "not a point")):
        with pytest.raises(CsnError, match=msg):
            parse_times(bad)


def test_a_bare_number_means_an_epoch_in_every_flag_and_file():
    """The same text, the same point: a selector, a study time, a training schedule and an onset."""
    for text in ("1", "0.5", "step=64", "f0.25", "end"):
        step = naive_step(text)
        selected = [c.step for c in select_checkpoints(CKPTS, text, total=TOTAL, steps_per_epoch=SPE, note=lambda m: None)]
        assert selected == [naive_nearest(step)]
        assert select_steps(STEPS, (text,), SPE, TOTAL) == [naive_nearest(step)]
        assert step in checkpoint_steps(text, SPE, TOTAL / SPE)
        if step < TOTAL:
            assert parse_onsets(text, SPE, TOTAL) == [step / SPE]


def test_a_selector_given_a_bare_number_names_the_explicit_step():
    """Selectors read a bare number as a step until 2026-12-05: now an epoch, said in one line naming step=N."""
    notes = []
    got = select_checkpoints(CKPTS, "1", total=TOTAL, steps_per_epoch=SPE, note=notes.append)
    assert [c.step for c in got] == [468] and len(notes) == 1 and "step=1" in notes[0] and "epoch" in notes[0]
    with pytest.raises(CsnError, match="for step 64 write step=64"):  # past the run as an epoch: the error says it
        select_checkpoints(CKPTS, "64", total=TOTAL, steps_per_epoch=SPE, note=notes.append)
    notes.clear()  # the explicit forms and the old 'eE' say nothing
    got = select_checkpoints(CKPTS, "step=64,e1,end,first", total=TOTAL, steps_per_epoch=SPE, note=notes.append)
    assert [c.step for c in got] == [0, 64, 468, 936] and notes == []


def test_a_step_without_a_checkpoint_takes_the_nearest_and_says_so():
    notes = []
    got = select_checkpoints(CKPTS, "step=10", total=TOTAL, steps_per_epoch=SPE, note=notes.append)
    assert [c.step for c in got] == [8] and "step=10" in notes[0] and "step 8" in notes[0]
    assert nearest_checkpoint(CKPTS, step=10).step == 8 and nearest_checkpoint(CKPTS, epoch=1.0).step == 468


def test_selectors_past_the_run_and_partial_runs():
    part = CKPTS[:5]  # a run stopped at step 64 of 936
    assert [c.step for c in select_checkpoints(part, "end", total=TOTAL, steps_per_epoch=SPE)] == [64]
    with pytest.raises(CsnError, match="after the run's last checkpoint"):
        select_checkpoints(part, "f0.5", total=TOTAL, steps_per_epoch=SPE)
    assert [c.step for c in select_checkpoints(part, "all")] == [0, 8, 16, 32, 64]
    # without the run's length, it is read from the checkpoints
    assert [c.step for c in select_checkpoints(CKPTS, "f0.5")] == [468]


def test_onsets_in_any_unit():
    assert parse_onsets("step=0,f0.3333", SPE, TOTAL) == [0.0, 312 / SPE]
    assert parse_onsets("0,1", SPE, TOTAL) == [0.0, 1.0]
    for bad, msg in (("end", "outside training"), ("2", "outside training"), ("0:1", "range"), ("x", "step=64")):
        with pytest.raises(CsnError, match=msg):
            parse_onsets(bad, SPE, TOTAL)
