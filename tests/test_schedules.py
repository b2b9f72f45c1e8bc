"""Tests for the schedules in csn.core: checkpoints (checkpoint_schedule), learning rate (lr), alpha windows (alpha)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csn.core.alpha import AlphaSchedule, alpha_schedule, alpha_windows, parse_alpha_windows, parse_study_string
from csn.core.checkpoint_schedule import DEFAULT_CHECKPOINTS, checkpoint_steps, total_steps
from csn.core.lr import LR_SCHEDULES, lr_at, parse_milestones
from csn.errors import CsnError

PROP = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------
# checkpoints: examples
# ------------------------------------------------------------------------------------------


def test_total_steps_rounds():
    assert total_steps(100, 2.5) == 250
    assert total_steps(3, 0.5) == round(1.5)
    with pytest.raises(CsnError):
        total_steps(0, 1)
    with pytest.raises(CsnError):
        total_steps(10, 0)
    with pytest.raises(CsnError):
        total_steps(10, 0.01)  # rounds to 0 steps
    with pytest.raises(CsnError):
        total_steps(10, float("nan"))


def test_default_schedule_dense_early():
    assert DEFAULT_CHECKPOINTS == "0:1:0.125,1:3:0.25,3:end:1"
    steps = checkpoint_steps(DEFAULT_CHECKPOINTS, 8, 5)
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 18, 20, 22, 24, 32, 40]
    assert checkpoint_steps(None, 8, 5) == steps


def test_default_schedule_is_clipped_to_short_training():
    # the default must work for any length: 1 epoch -> only the first segment
    assert checkpoint_steps(None, 8, 1) == list(range(9))
    assert checkpoint_steps(DEFAULT_CHECKPOINTS, 8, 2) == list(range(9)) + [10, 12, 14, 16]
    # but the same segments written by the user are an error
    with pytest.raises(CsnError, match="after the end of training"):
        checkpoint_steps("0:1:0.125,1:3:0.25", 8, 2)


def test_epoch_segments_and_end():
    assert checkpoint_steps("0:end:1", 10, 3) == [0, 10, 20, 30]
    assert checkpoint_steps("0:end:1", 10, 2.5) == [0, 10, 20, 25]  # final always included
    assert checkpoint_steps("0.5:1.5:0.5", 10, 2) == [0, 5, 10, 15, 20]
    assert checkpoint_steps("0:1:0.1", 10, 1) == list(range(11))  # float accumulation safe
    assert checkpoint_steps("1:1:1", 10, 2) == [0, 10, 20]  # single point


def test_step_segments():
    assert checkpoint_steps("steps:log2:512", 1000, 1) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000]
    assert checkpoint_steps("steps:log2:500", 1000, 1)[-2:] == [256, 1000]  # powers <= bound
    assert checkpoint_steps("steps:log10:end", 1000, 2) == [0, 1, 10, 100, 1000, 2000]
    assert checkpoint_steps("steps:0:100:25", 1000, 1) == [0, 25, 50, 75, 100, 1000]
    assert checkpoint_steps("steps:10:end:400", 500, 2) == [0, 10, 410, 810, 1000]
    assert checkpoint_steps("step=7, step=end", 100, 1) == [0, 7, 100]


def test_time_points_and_fraction_segments():
    # single points: a step, a fraction of training (round(f * total)), an epoch, end
    assert checkpoint_steps("step=3,f0.25,1.5,end", 10, 2) == [0, 3, 5, 15, 20]
    assert checkpoint_steps("f0.5:end:f0.25", 8, 2) == [0, 8, 12, 16]
    assert checkpoint_steps("f0:f0.5:f0.1", 10, 1) == [0, 1, 2, 3, 4, 5, 10]  # float accumulation safe
    assert checkpoint_steps("F0.5:END:F0.5", 7, 2) == [0, 7, 14]  # case-insensitive
    # fractions scale with the training: the same spec on a dataset 8x larger
    assert checkpoint_steps("f0.25,f0.5", 80, 2) == [0, 40, 80, 160]


def test_fmnist_preset_schedule_resolves_to_the_old_epoch_schedule_on_fashion_mnist():
    """The fmnist preset's fractions give exactly the steps of its former epoch schedule on Fashion-MNIST
    (60,000 // 128 = 468 steps x 3 epochs; and with 469)."""
    from csn.runs.config import preset

    former = "step=8,step=16,step=32,step=64,step=128,step=256,0.75:1:0.25,1:end:0.5"
    assert checkpoint_steps(former, 468, 3) == [0, 8, 16, 32, 64, 128, 256, 351, 468, 702, 936, 1170, 1404]
    for spe in (468, 469):
        assert checkpoint_steps(preset("fmnist").checkpoints, spe, 3) == checkpoint_steps(former, spe, 3)
    assert checkpoint_steps(preset("smoke").checkpoints, 8, 2) == checkpoint_steps("0:1:0.25,1:end:0.5", 8, 2)


def test_a_presets_schedule_is_clipped_with_a_note_a_users_is_an_error():
    from csn.runs.config import is_preset_checkpoints, preset

    spec = preset("fmnist").checkpoints
    assert is_preset_checkpoints(spec) and is_preset_checkpoints(spec.replace(",", ", "))
    assert not is_preset_checkpoints("step=8,step=128") and not is_preset_checkpoints(None)
    notes: list[str] = []
    steps = checkpoint_steps(spec, 469, 0.25, clip=True, note=notes.append)  # `csn train --preset fmnist epochs=0.25`
    assert steps == [0, 8, 16, 29, 32, 39, 58, 64, 78, 97, 117]
    assert len(notes) == 1 and "step=128, step=256" in notes[0] and "117 steps" in notes[0]
    with pytest.raises(CsnError, match="'step=128' is after the end of training"):
        checkpoint_steps("step=8,step=128", 469, 0.25)
    quiet: list[str] = []
    checkpoint_steps(None, 8, 1, note=quiet.append)  # the default schedule is clipped silently
    checkpoint_steps("step=8", 469, 0.25, clip=True, note=quiet.append)  # nothing dropped: no note
    assert quiet == []


def test_mixed_spec():
    steps = checkpoint_steps("steps:log2:256,1:end:1", 469, 3)
    assert steps == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 469, 938, 1407]
    assert checkpoint_steps(" STEPS:LOG2:4 , 0:END:1 ", 10, 1) == [0, 1, 2, 4, 10]


@pytest.mark.parametrize(
    "spec, match",
    [
        ("0:1:0", "must be > 0"),
        ("0:1:-0.5", "must be > 0"),
        ("2:1:1", "after its stop"),
        ("0:9:1", r"training is 2 epochs = 20 steps"),
        ("3:end:1", "after the end of training"),
        ("-1:1:1", "negative"),
        ("0:1:x", "'x' is not a number"),
        ("0:1:nan", "not a number"),
        ("0:1:inf", "not a number"),
        ("0:1:1e999", "out of range"),
        ("0:1", "unknown form"),
        ("hourly", "unknown form"),
        ("0:1:1:1", "unknown form"),
        ("0:1:0.5,,1:2:1", "empty segment"),
        ("", "empty"),
        ("steps:log1:8", "base must be 2"),
        ("steps:logx:8", "log base"),
        ("steps:log2:9999", "after the end of training"),
        ("steps:log2:2.5", "whole number"),
        ("steps:5:1:1", "after its stop"),
        ("steps:0:10:0", "at least 1 step"),
        ("steps:0:100:1", "after the end of training"),
        ("steps:0:10", "not a valid steps segment"),
        ("steps", "not a valid steps segment"),
        ("step=21", "after the end of training"),
        ("step=-1", "whole number"),
        ("0:1:1e-9", "more than the"),
        ("4", "after the end of training"),
        ("f1.5", "outside"),
        ("f0.5:1:f0.1", "mixes fractions"),
        ("f0.5:f0.2:f0.1", "after its stop"),
        ("f0:f1:f0", "must be > 0"),
        ("f0:f1:f1e-9", "more than the"),
        ("fx", "not a number"),
        ("-1", "negative epoch"),
    ],
)
def test_malformed_checkpoint_specs(spec, match):
    with pytest.raises(CsnError, match=match):
        checkpoint_steps(spec, 10, 2)


def test_explicit_clip():
    assert checkpoint_steps("0:9:1", 10, 2, clip=True) == [0, 10, 20]
    with pytest.raises(CsnError):
        checkpoint_steps(DEFAULT_CHECKPOINTS, 8, 2, clip=False)


# ------------------------------------------------------------------------------------------
# checkpoints: properties
# ------------------------------------------------------------------------------------------


def _check_steps(steps, total):
    assert steps == sorted(set(steps))
    assert steps[0] == 0 and steps[-1] == total
    assert all(isinstance(s, int) and 0 <= s <= total for s in steps)


nums = st.one_of(
    st.integers(0, 12).map(str),
    st.floats(0, 12, allow_nan=False).map(repr),
    st.sampled_from(["0.125", "0.25", "1e-1", ".5", "2.", "end", "1e0"]),
)


@st.composite
def valid_specs(draw):
    spe = draw(st.integers(1, 60))
    epochs = draw(st.one_of(st.integers(1, 8), st.floats(0.1, 8)).filter(lambda e: round(e * spe) >= 1))
    total = round(epochs * spe)
    segs = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["epoch", "log", "lin", "one"]))
        if kind == "epoch":
            a = draw(st.floats(0, epochs))
            b = draw(st.one_of(st.just("end"), st.floats(a, epochs).map(repr)))
            every = draw(st.floats(0.01, 4))
            segs.append(f"{a!r}:{b}:{every!r}")
        elif kind == "log":
            segs.append(f"steps:log{draw(st.integers(2, 10))}:{draw(st.one_of(st.just('end'), st.integers(1, total).map(str)))}")
        elif kind == "lin":
            a = draw(st.integers(0, total))
            b = draw(st.one_of(st.just("end"), st.integers(a, total).map(str)))
            segs.append(f"steps:{a}:{b}:{draw(st.integers(1, 50))}")
        else:
            segs.append(f"step={draw(st.integers(0, total))}")
    return ",".join(segs), spe, epochs


@PROP
@given(valid_specs())
def test_prop_valid_specs_sorted_unique_bounded(args):
    spec, spe, epochs = args
    steps = checkpoint_steps(spec, spe, epochs)
    _check_steps(steps, total_steps(spe, epochs))


@PROP
@given(st.integers(1, 50), st.floats(0.05, 10), st.integers(0, 20), st.integers(1, 200))
def test_prop_linear_epoch_points_present(spe, epochs, a, b):
    # every requested epoch point is present (as a step) - never a silently different schedule
    if round(epochs * spe) < 1:
        return
    start = min(a / 4, epochs)
    every = b / 16
    steps = checkpoint_steps(f"{start!r}:end:{every!r}", spe, epochs)
    k = 0
    while start + k * every <= epochs:
        assert min(round((start + k * every) * spe), round(epochs * spe)) in steps
        k += 1


ckpt_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.:,-+eEndstplog=x ", max_size=40),
    st.lists(st.tuples(nums, nums, nums).map(":".join), max_size=4).map(",".join),
)


@PROP
@given(ckpt_text, st.integers(1, 40), st.floats(0.1, 6))
def test_prop_checkpoint_arbitrary_text(spec, spe, epochs):
    if round(epochs * spe) < 1:
        return
    try:
        steps = checkpoint_steps(spec, spe, epochs)
    except CsnError:
        return
    _check_steps(steps, total_steps(spe, epochs))


# ------------------------------------------------------------------------------------------
# learning rate
# ------------------------------------------------------------------------------------------


def test_lr_constant_and_step():
    assert lr_at(0, 900, 10, 0.1, "constant") == 0.1
    kw = dict(milestones=(30, 60), gamma=0.1)
    assert lr_at(299, 900, 10, 0.1, "step", **kw) == pytest.approx(0.1)
    assert lr_at(300, 900, 10, 0.1, "step", **kw) == pytest.approx(0.01)
    assert lr_at(599, 900, 10, 0.1, "step", **kw) == pytest.approx(0.01)
    assert lr_at(600, 900, 10, 0.1, "step", **kw) == pytest.approx(0.001)
    assert lr_at(900, 900, 10, 0.1, "step", milestones="30,60") == pytest.approx(0.001)
    # milestones past the end never trigger
    assert lr_at(50, 100, 10, 0.1, "step", milestones=(30,)) == pytest.approx(0.1)


def test_lr_cosine():
    assert lr_at(0, 100, 10, 0.2, "cosine") == pytest.approx(0.2)
    assert lr_at(50, 100, 10, 0.2, "cosine") == pytest.approx(0.1)
    assert lr_at(100, 100, 10, 0.2, "cosine") == 0.0
    vals = [lr_at(s, 100, 10, 0.2, "cosine") for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lr_warmup_composes():
    # 1 warm-up epoch = 10 steps: base * (step+1)/10
    assert lr_at(0, 100, 10, 0.1, "constant", warmup_epochs=1) == pytest.approx(0.01)
    assert lr_at(4, 100, 10, 0.1, "constant", warmup_epochs=1) == pytest.approx(0.05)
    assert lr_at(9, 100, 10, 0.1, "constant", warmup_epochs=1) == pytest.approx(0.1)
    assert lr_at(10, 100, 10, 0.1, "constant", warmup_epochs=1) == pytest.approx(0.1)
    # cosine anneals over the post-warm-up steps
    assert lr_at(9, 110, 10, 0.1, "cosine", warmup_epochs=1) == pytest.approx(0.1)
    assert lr_at(60, 110, 10, 0.1, "cosine", warmup_epochs=1) == pytest.approx(0.05)
    assert lr_at(110, 110, 10, 0.1, "cosine", warmup_epochs=1) == 0.0
    # step schedule with a milestone inside the warm-up multiplies
    assert lr_at(4, 100, 10, 1.0, "step", milestones=(0.2,), warmup_epochs=1) == pytest.approx(0.1 * 5 / 10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(schedule="cosin"), "closest: 'cosine'"),
        (dict(schedule="linear"), "constant, cosine, step"),
        (dict(schedule="step"), "needs milestones"),
        (dict(schedule="cosine", milestones=(3,)), "only apply"),
        (dict(schedule="step", milestones=(3, 2)), "strictly increasing"),
        (dict(schedule="step", milestones=(0,)), "milestones are epochs > 0"),
        (dict(schedule="step", milestones=(3,), gamma=0), "gamma"),
        (dict(schedule="constant", warmup_epochs=20), "longer than training"),
        (dict(schedule="constant", warmup_epochs=-1), "warmup_epochs"),
        (dict(schedule="constant", step=101), "outside training"),
        (dict(schedule="constant", step=-1), "outside training"),
        (dict(schedule="constant", base_lr=float("nan")), "finite"),
    ],
)
def test_lr_errors(kwargs, match):
    args = dict(step=0, total_steps=100, steps_per_epoch=10, base_lr=0.1)
    args.update(kwargs)
    with pytest.raises(CsnError, match=match):
        lr_at(**args)


def test_all_lr_schedules_listed():
    assert set(LR_SCHEDULES) == {"constant", "step", "cosine"}
    assert parse_milestones("30, 60") == (30.0, 60.0)
    assert parse_milestones("") == ()


@PROP
@given(
    st.integers(1, 500),
    st.integers(1, 20),
    st.floats(1e-4, 10),
    st.sampled_from(["constant", "cosine", "step"]),
    st.floats(0, 1),
    st.data(),
)
def test_prop_lr_bounded(total, spe, base, name, warm_frac, data):
    step = data.draw(st.integers(0, total))
    warm = warm_frac * total / spe
    if round(warm * spe) > total:
        return
    kw = dict(milestones=(total / spe / 2,)) if name == "step" else {}
    lr = lr_at(step, total, spe, base, name, warmup_epochs=warm, **kw)
    assert 0.0 <= lr <= base * (1 + 1e-12)


# ------------------------------------------------------------------------------------------
# alpha schedules: examples
# ------------------------------------------------------------------------------------------


def test_study_string():
    s = parse_study_string("0*5 -20*15")
    assert s.alpha_at(0) == 0 and s.alpha_at(4.999) == 0
    assert s.alpha_at(5) == -20 and s.alpha_at(19.99) == -20
    assert s.alpha_at(20) == 0 and s.alpha_at(100) == 0  # after the listed epochs alpha is 0
    assert s.windows == [(5.0, 20.0, -20.0)]
    assert not s.is_zero
    assert str(s) == "-20@5:20"


def test_study_string_numbers():
    s = parse_study_string("-1.5e1*2.5  3.25*.5\t+2E-1*1e0 0*1")
    assert s.alpha_at(1) == -15.0
    assert s.alpha_at(2.75) == 3.25
    assert s.alpha_at(3.5) == 0.2
    assert s.alpha_at(4.5) == 0.0
    assert parse_study_string("-20*20").alpha_at(0) == -20


@pytest.mark.parametrize(
    "text",
    ["", "   ", "-20", "0*5 -20", "0*5,-20*15", "0 * 5", "a*5", "1*b", "1*0", "1*-2", "1**2", "1*nan", "inf*2",
     "1e999*1", "1*1e999", "0*5 -20*15x", "−20*5", "1_0*5", "5*1 1*1e-320"],
)
def test_study_string_malformed(text):
    with pytest.raises(CsnError):
        parse_study_string(text)


def test_study_string_error_quotes_token_and_form():
    with pytest.raises(CsnError) as e:
        parse_study_string("0*5 -20x15")
    assert "'-20x15'" in str(e.value) and "VALUE*EPOCHS" in str(e.value) and "0*5 -20*15" in str(e.value)


@pytest.mark.parametrize(
    "alpha, window, match",
    [
        (-20, None, "needed together"),
        (None, "5:end", "needed together"),
        (-20, "5:5", "starts at or after its end"),
        (-20, "6:5", "starts at or after its end"),
        (-20, "5", "not START:END"),
        (-20, "1:2:3", "not START:END"),
        (-20, "x:end", "x"),
        (-20, "-1:end", "-1"),
        (float("nan"), "0:end", "finite"),
        ("abc", "0:end", "not a number"),
        (True, "0:end", "must be a number"),
    ],
)
def test_explicit_window_errors(alpha, window, match):
    with pytest.raises(CsnError, match=match):
        alpha_windows(alpha=alpha, window=window)


def test_alpha_schedule_dispatch():
    assert alpha_schedule().is_zero
    assert alpha_schedule("").is_zero
    assert alpha_schedule("none").is_zero
    assert alpha_schedule("0*5 -20*15") == parse_study_string("0*5 -20*15")
    assert alpha_schedule("-20@5:end") == AlphaSchedule([(5, None, -20)])
    assert alpha_schedule("-20@5:end").alpha_at(4.9) == 0 and alpha_schedule("-20@5:end").alpha_at(1e6) == -20
    with pytest.raises(CsnError, match="must be a string"):
        alpha_schedule(5)


def test_alpha_schedule_normalization_and_equality():
    a = AlphaSchedule([(0, 5, -20), (5, 10, -20), (10, None, 0)])
    assert a.windows == [(0.0, 10.0, -20.0)]
    assert a == parse_study_string("-20*5 -20*5 0*3")
    assert hash(a) == hash(parse_study_string("-20*10"))
    assert AlphaSchedule() == AlphaSchedule([(0, None, 0)])
    assert str(AlphaSchedule()) == "none"
    with pytest.raises(CsnError, match="overlap"):
        AlphaSchedule([(0, 5, 1), (4, 6, 2)])
    with pytest.raises(CsnError, match="overlap"):
        AlphaSchedule([(0, None, 1), (4, 6, 2)])
    with pytest.raises(CsnError):
        AlphaSchedule([(1, 2)])
    with pytest.raises(CsnError, match="bad alpha-window token"):
        parse_alpha_windows("-20@5")


# ------------------------------------------------------------------------------------------
# alpha schedules: properties
# ------------------------------------------------------------------------------------------

value_text = st.one_of(
    st.integers(-100, 100).map(str),
    st.floats(-1e3, 1e3, allow_nan=False).map(repr),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: f"{v:.3f}"),
    st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: f"{v:e}"),
    st.sampled_from(["-1.5e1", "+2", ".5", "-.25", "3.", "1E2", "-0", "0.0"]),
)
epochs_text = st.one_of(
    st.integers(1, 100).map(str),
    st.floats(0.01, 50).map(repr),
    st.integers(1, 5000).map(lambda n: f"{n / 100:.2f}"),
    st.floats(0.01, 50).map(lambda v: f"{v:e}"),
    st.sampled_from(["2.5", ".5", "1e0", "2.5E-1", "+3"]),
)


@PROP
@given(st.lists(st.tuples(value_text, epochs_text), min_size=1, max_size=8))
def test_prop_study_string_recovers_values(tokens):
    text = " ".join(f"{v}*{e}" for v, e in tokens)
    s = parse_study_string(text)
    start = 0.0
    for v, e in tokens:
        end = start + float(e)
        mid = (start + end) / 2
        assert s.alpha_at(start) == float(v)
        assert s.alpha_at(mid) == float(v)
        start = end
    assert s.alpha_at(start) == 0.0 and s.alpha_at(start * 2 + 1) == 0.0
    assert s.alpha_at(-1e-9) == 0.0
    # canonical string round-trips exactly
    assert alpha_schedule(str(s)) == s


alpha_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789.*-+eE @:,end", max_size=40),
    st.lists(st.tuples(value_text, epochs_text).map("*".join), max_size=4).map(" ".join),
)


def _valid_schedule(s):
    assert isinstance(s, AlphaSchedule)
    w = s.windows
    for (_s0, e0, _a0), (s1, _, _) in zip(w, w[1:]):
        assert e0 is not None and e0 <= s1
    for st_, e, a in w:
        assert st_ >= 0 and (e is None or e > st_) and a != 0 and math.isfinite(a)
        assert s.alpha_at(st_) == a
    assert alpha_schedule(str(s)) == s


@PROP
@given(alpha_text)
def test_prop_study_parser_arbitrary_text(text):
    try:
        s = parse_study_string(text)
    except CsnError:
        return
    _valid_schedule(s)


@PROP
@given(alpha_text)
def test_prop_alpha_schedule_arbitrary_text(text):
    try:
        s = alpha_schedule(text)
    except CsnError:
        return
    _valid_schedule(s)


@PROP
@given(
    st.one_of(st.none(), st.floats(), st.integers(-10**30, 10**30), st.text(max_size=12), st.booleans()),
    st.one_of(st.none(), st.text(max_size=20), st.text(alphabet="0123456789.:-endfstp=,", max_size=12)),
)
def test_prop_explicit_windows_arbitrary(alpha, window):
    try:
        w = alpha_windows(alpha=alpha, window=window).resolve(8, 80, 10.0)
    except CsnError:
        return
    for a, b, alpha_ in w.windows:
        assert 0 <= a < b <= 80 and alpha_ != 0 and math.isfinite(alpha_)


@PROP
@given(
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(0.001, 50), st.floats(-1e3, 1e3, allow_nan=False)),
        max_size=5,
    ),
    st.booleans(),
)
def test_prop_str_round_trip(raw, open_end):
    windows, start = [], 0.0
    for gap, dur, a in raw:
        s0 = start + gap
        windows.append((s0, s0 + dur, a))
        start = s0 + dur
    if open_end and windows:
        s0, _, a = windows[-1]
        windows[-1] = (s0, None, a)
    sched = AlphaSchedule(windows)
    assert alpha_schedule(str(sched)) == sched
    assert parse_alpha_windows(str(sched)) == sched
    for s0, _e, a in windows:
        assert sched.alpha_at(s0) == a


# ----------------------------------------------------------------------------- points in training time
@pytest.mark.parametrize("text, unit, step", [("step=64", "step", 64), ("1.5", "epoch", 15), ("f0.25", "fraction", 10),
                                              ("end", "end", 40), ("0", "epoch", 0), (2, "epoch", 20),
                                              (" F0.5 ", "fraction", 20), ("STEP=3", "step", 3)])
def test_time_points_resolve_to_steps(text, unit, step):
    from csn.core.times import parse_time

    t = parse_time(text)
    assert t.unit == unit and t.step(10, 40) == step  # 10 steps per epoch, 40 steps of training
    assert parse_time(str(t)) == t  # the canonical text parses back to the same point


@pytest.mark.parametrize("bad", ["f1.5", "f-0.1", "step=1.5", "step=-2", "-1", "x", "nan", "inf", "", "1e", True])
def test_bad_time_points_are_one_line_errors(bad):
    from csn.core.times import parse_time

    with pytest.raises(CsnError, match="write a step 'step=64', an epoch '1.5', a fraction of training 'f0.25'"):
        parse_time(bad, "onset")
