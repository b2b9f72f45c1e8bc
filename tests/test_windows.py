"""Regularizer windows in training time (steps, epochs, fractions): exact switching steps, one-line errors,
same seed = same initialization and batches in every condition (the regularizer consumes no random numbers),
alpha 0 and extra checkpoints train bitwise the same weights as the baseline."""

from __future__ import annotations

import hashlib
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csn.core.alpha import AlphaWindow, AlphaWindows, alpha_windows, parse_window_points
from csn.core.times import parse_time
from csn.errors import CsnError
from csn.runs.run import Run
from csn.training import loop
from csn.training.loop import train
from tests.conftest import tiny_config

SPE, TOTAL = 8, 16  # the tiny run: 256 examples / batch 32 = 8 steps per epoch, 2 epochs


def _decimal_first_step(text: str, spe: int, total: int) -> int:
    """Naive reference: the least whole step >= the point, in exact decimal arithmetic."""
    p = text.strip().lower()
    if p == "end":
        return total
    if p.startswith("step="):
        return int(p[5:])
    x = Fraction(p[1:]) * total if p.startswith("f") else Fraction(p) * spe
    return -(-x.numerator // x.denominator)


def _on_steps(log) -> list[int]:
    """Updates (0-based: the one from step i to i + 1 is logged at step i + 1) that ran with alpha != 0."""
    return [int(s) - 1 for s, a in zip(log["step"], log["alpha"]) if a != 0]


# ------------------------------------------------------------------------------------------------
# resolution to steps
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, steps", [
    ("0:1", [(0, 8)]), ("0.25:0.75", [(2, 6)]), ("0.3:0.6", [(3, 5)]),  # epochs: first step >= e * 8
    ("step=3:step=7", [(3, 7)]), ("f0.25:f0.5", [(4, 8)]), ("f0.55:f0.8", [(9, 13)]),  # fractions of 16 steps
    ("step=1:0.5", [(1, 4)]), ("1.5:end", [(12, 16)]), ("f0:step=2,step=2:step=4", [(0, 4)]),  # touching: merged
    ("0:0.25,step=6:step=8,f0.75:end", [(0, 2), (6, 8), (12, 16)]),
])
def test_windows_resolve_to_the_first_step_at_or_after_each_point(window, steps):
    assert [w[:2] for w in alpha_windows(alpha=-1, window=window).resolve(SPE, TOTAL).windows] == steps


@settings(max_examples=300, deadline=None)
@given(spe=st.integers(1, 500), epochs=st.integers(1, 6), a=st.integers(0, 10**6), b=st.integers(1, 10**6),
       unit=st.sampled_from(["epoch", "fraction", "step"]))
def test_resolution_matches_exact_decimal_arithmetic(spe, epochs, a, b, unit):
    total = spe * epochs
    if unit == "epoch":
        s, e = f"{a * epochs / 10**6:.6f}", f"{min(a + b, 10**6) * epochs / 10**6:.6f}"
    elif unit == "fraction":
        s, e = f"f{a / 10**6:.6f}", f"f{min(a + b, 10**6) / 10**6:.6f}"
    else:
        s, e = f"step={a % total}", f"step={min(a % total + b % total + 1, total)}"
    lo, hi = _decimal_first_step(s, spe, total), min(total, _decimal_first_step(e, spe, total))
    if Fraction(s.lstrip("f").replace("step=", "")) >= Fraction(e.lstrip("f").replace("step=", "")):
        return
    try:
        got = alpha_windows(alpha=-2, window=f"{s}:{e}").resolve(spe, total).windows
    except CsnError as err:
        assert hi <= lo or lo >= total, (s, e, lo, hi, str(err))
        return
    assert got == ((lo, hi, -2.0),)
    sched = alpha_windows(alpha=-2, window=f"{s}:{e}").resolve(spe, total)
    assert [sched.alpha_at(i) != 0 for i in range(total)] == [lo <= i < hi for i in range(total)]


@pytest.mark.parametrize("window, match", [
    ("2:3", "starts at or after the end of training"),             # epoch 2 = step 16 = the end
    ("step=16:end", "starts at or after the end of training"),
    ("f1:end", "starts at or after the end of training"),
    ("1:2.5", "ends after the end of training"),
    ("step=0:step=17", "ends after the end of training"),
    ("0.01:0.1", "covers no optimizer step"),                       # steps 0.08 .. 0.8: [1, 1)
    ("f0.5:step=8", "covers no optimizer step"),                    # both resolve to step 8
    ("step=4:0.25", "covers no optimizer step"),                    # reversed across units: [4, 2)
    ("0:1,0.5:1.5", "overlap"),
    ("1:1", "starts at or after its end"), ("step=5:step=3", "starts at or after its end"),
    ("end:end", "starts at the end of training"), ("0:", "not a point in training"), ("0-1", "is not START:END"),
    ("0:1,", "empty window"), ("x:1", "not a point in training"), ("step=1.5:2", "not a whole number"), ("f2:end", r"outside \[0, 1\]"),
])
def test_bad_windows_are_one_line_errors(window, match):
    with pytest.raises(CsnError, match=match) as e:
        alpha_windows(alpha=-1, window=window).resolve(SPE, TOTAL, 2.0)
    assert "\n" not in str(e.value)


def test_window_forms_and_study_string_agree():
    assert str(parse_window_points("step=0:step=64, 1:end")[0][1]) == "step=64"
    a = alpha_windows("0*1 -2*1").resolve(SPE, TOTAL)
    b = alpha_windows(alpha=-2, window="1:2").resolve(SPE, TOTAL)
    assert a == b and a.windows == ((8, 16, -2.0),)
    assert alpha_windows(alpha=0, window="0:1").is_zero and alpha_windows().resolve(SPE, TOTAL).is_zero
    assert str(AlphaWindows([AlphaWindow(parse_time("step=2"), parse_time("end"), -1.5)])) == "-1.5@step=2:end"
    with pytest.raises(CsnError, match="needed together"):
        alpha_windows(alpha=-1)
    with pytest.raises(CsnError, match="one form"):
        alpha_windows("0*1 -2*1", alpha=-2, window="1:2")


# ------------------------------------------------------------------------------------------------
# in the training loop
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("window, on", [
    ("0.3:0.6,step=6:step=8,f0.55:f0.8", [3, 4, 6, 7, 9, 10, 11, 12]),   # epoch, step and fraction windows at once
    ("step=0:step=1,1.875:end", [0, 15]),                                 # the first and the last update alone
])
def test_training_switches_at_exactly_the_resolved_steps(tmp_path, window, on):
    run = train(tiny_config(reg_alpha=-2.0, reg_window=window, log_every=1, checkpoints="0:end:1"), tmp_path / "w",
                progress=False)
    log = run.read("training")
    assert list(log["step"]) == list(range(1, TOTAL + 1))
    assert _on_steps(log) == on
    assert log["reg_value"].notna().tolist() == [s - 1 in on for s in log["step"]]
    assert [(w.start_step, w.end_step) for w in run.reg_windows] == \
        [w[:2] for w in alpha_windows(alpha=-2, window=window).resolve(SPE, TOTAL).windows]


@pytest.mark.parametrize("window, match", [("2:end", "starts at or after the end"), ("0.01:0.1", "covers no optimizer"),
                                           ("step=0:step=99", "ends after the end")])
def test_bad_window_stops_training_before_any_checkpoint(tmp_path, window, match):
    with pytest.raises(CsnError, match=match):
        train(tiny_config(reg_alpha=-1.0, reg_window=window), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def _digests(run: Run) -> dict[int, str]:
    return {c.step: c.sha256 for c in run.checkpoints}


def test_alpha_zero_and_extra_checkpoints_train_the_baseline_bitwise(tmp_path):
    base = train(tiny_config(seed=3), tmp_path / "base", progress=False)
    zero = train(tiny_config(seed=3, reg_alpha=0.0, reg_window="step=0:step=8"), tmp_path / "zero", progress=False)
    assert _digests(zero) == _digests(base)
    more = train(tiny_config(seed=3, checkpoints=tiny_config().checkpoints + ",step=3,step=5,step=11"),
                 tmp_path / "more", progress=False)
    d_base, d_more = _digests(base), _digests(more)
    assert set(d_more) == set(d_base) | {3, 5, 11}
    assert all(d_more[s] == d_base[s] for s in d_base)


def test_same_seed_same_batches_and_random_state_whatever_the_regularizer(tmp_path, monkeypatch):
    """The regularizer consumes no random numbers: every condition sees the baseline's batches, and the global
    RNG state at every step is the baseline's; weights are bitwise the baseline's up to the window's start."""
    seen: dict[str, list] = {}
    original = loop._Training._train_step

    def spy(self, x, y):
        h = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes() + torch.get_rng_state().numpy().tobytes())
        seen.setdefault(self.out.name, []).append(h.hexdigest())
        return original(self, x, y)

    monkeypatch.setattr(loop._Training, "_train_step", spy)
    ck = "0:end:0.5,step=5"
    base = train(tiny_config(seed=1, checkpoints=ck), tmp_path / "base", progress=False)
    reg = train(tiny_config(seed=1, checkpoints=ck, reg_alpha=-5.0, reg_window="step=5:step=9"), tmp_path / "reg",
                progress=False)
    train(tiny_config(seed=1, checkpoints=ck, reg_alpha=5.0, reg_window="0:end"), tmp_path / "up", progress=False)
    assert len(seen["base"]) == TOTAL and seen["reg"] == seen["base"] == seen["up"]
    d_base, d_reg = _digests(base), _digests(reg)
    assert d_reg[0] == d_base[0] and d_reg[4] == d_base[4] and d_reg[5] == d_base[5]  # up to the window's start
    assert d_reg[8] != d_base[8] and d_reg[16] != d_base[16]  # the window changed the weights
