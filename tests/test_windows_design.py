"""The critical-period map's design (issue 22): windows tiling training (tile:N), a constant learning rate, alpha
per stage (reg_reduce=sum) in every condition, the dose per condition, and the dry run's power of every verdict at
the seeds asked (each verdict's own rule simulated, window_stats), checked against direct simulation."""

from __future__ import annotations

import math

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from csn.cli import main as cli
from csn.core import inference as I
from csn.errors import CsnError
from csn.experiments import window_stats as ws
from csn.experiments.claims import Spread
from csn.experiments.windows import (
    WindowsOptions,
    _mean_lr,
    expand_tiles,
    get_windows_preset,
    make_plan,
    planned_power,
    tile_steps,
)

# ------------------------------------------------------------------------------------------------
# tiles
# ------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), n=st.integers(1, 60))
def test_tiles_cover_training_once_in_windows_of_equal_length(total, n):
    if n > total:
        with pytest.raises(CsnError, match=f"asks for {n} tiles"):
            expand_tiles(f"tile:{n}", total)
        return
    tiles = tile_steps(n, total)
    assert tiles[0][0] == 0 and tiles[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(tiles, tiles[1:]))  # touching, no gap, no overlap
    lengths = {e - s for s, e in tiles}
    assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
    assert expand_tiles(f"tile:{n}", total) == ",".join(f"step={s}:step={e}" for s, e in tiles)
    i = n // 2
    assert expand_tiles(f"tile:{n}:{i}", total) == f"step={tiles[i][0]}:step={tiles[i][1]}"


def test_tile_forms_mix_with_the_other_forms():
    assert expand_tiles("tile:6", 1404) == ",".join(f"step={234 * k}:step={234 * (k + 1)}" for k in range(6))
    assert expand_tiles("tile:6:0-4", 1404) == ",".join(f"step={234 * k}:step={234 * (k + 1)}" for k in range(5))
    assert expand_tiles("step=0:step=40, tile:3:2,1:end", 30) == "step=0:step=40,step=20:step=30,1:end"


@pytest.mark.parametrize("text, match", [("tile:", "is not a tile"), ("tile:x", "is not a tile"),
                                         ("tile:2:1:0", "is not a tile"), ("tile:0", "asks for 0 tiles"),
                                         ("tile:4:3-1", "is not a tile"), ("tile:4:2-4", "picks tile 4 of 4"),
                                         ("tile:4:4", "picks tile 4 of 4"), ("tile:4:-1", "picks tile -1 of 4")])
def test_bad_tiles_are_one_line_errors(text, match):
    with pytest.raises(CsnError, match=match) as e:
        expand_tiles(text, 16)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# the fmnist map: constant lr, six tiles, alpha per stage, promotion in the earliest window
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fmnist_plan(tmp_path_factory):
    return make_plan(WindowsOptions(preset="fmnist", out=str(tmp_path_factory.mktemp("m") / "map")))


def test_the_fmnist_map_tiles_training_at_a_constant_learning_rate_with_alpha_per_stage(fmnist_plan):
    plan = fmnist_plan
    assert plan.base.lr_schedule == "constant" and plan.base.reg_reduce == "sum" and plan.total == 1404
    sup = [c for c in plan.conditions if c.alpha < 0]
    pro = [c for c in plan.conditions if c.alpha > 0]
    for alpha in {c.alpha for c in sup}:
        fam = sorted((c.start_step, c.end_step) for c in sup if c.alpha == alpha)
        assert fam == tile_steps(6, 1404)  # six windows of 234 steps, starting at 0, 1/6, ..., 5/6 of training
        assert sum(s / plan.total >= ws.WINDOW_RULES["late_from"] for s, _ in fam) == 3
    assert pro and all((c.start_step, c.end_step) == (0, 234) for c in pro)  # promotion in the earliest window
    for cond, seed, job in plan.jobs():
        assert job.cfg.reg_reduce == "sum" and job.cfg.lr_schedule == "constant" and job.cfg.seed == seed
        if cond.alpha:
            assert _mean_lr(plan, cond) == pytest.approx(plan.base.lr)  # every window gets the same learning rate
    e = plan.estimate()
    assert e["runs"] == 56 and e["training_s"] + e["selectivity_s"] + e["accuracy_s"] <= 95 * 60  # 1 h 33 on 2 cores


def test_the_fmnist_seeds_give_power_on_the_suppression_verdicts(fmnist_plan):
    """The preset's seeds were chosen for power >= 0.8 on 'early harms more' and 'late costs little' at the declared
    effect, with the per-run spread measured on fmnist at a constant learning rate (the cosine spread is smaller)."""
    assert get_windows_preset("fmnist").run_sd == 0.0031 > Spread().c4_run_sd
    assert "constant learning rate" in get_windows_preset("fmnist").run_sd_source
    rows = {r["question"]: r for shape in planned_power(fmnist_plan, studies=1000) for r in shape["rows"]}
    assert rows[ws.Q_MORE]["power"] >= 0.8 and rows[ws.Q_LITTLE]["power"] >= 0.8
    assert rows[ws.Q_MORE]["seeds_needed"] <= len(fmnist_plan.seeds) and rows[ws.Q_LITTLE]["seeds_needed"] <= len(
        fmnist_plan.seeds)


def test_a_cosine_map_gives_late_windows_less_learning_rate(fmnist_plan):
    plan = make_plan(WindowsOptions(preset="fmnist", lr_schedule="cosine", out=str(fmnist_plan.root)))
    assert plan.base.lr_schedule == "cosine" and plan.base.reg_reduce == "sum"
    alpha = next(c.alpha for c in plan.conditions if c.alpha < 0)
    lrs = [_mean_lr(plan, c) for c in sorted((c for c in plan.conditions if c.alpha == alpha), key=lambda c: c.start_step)]
    assert len(lrs) == 6 and all(a > b for a, b in zip(lrs, lrs[1:]))  # the dose confound a constant lr removes


def test_anneal_gives_every_window_before_it_the_same_learning_rate(tmp_path):
    """lr_schedule anneal: the constant rate, a tenth of it over the last sixth of training (steps 13-16 of 16)."""
    plan = make_plan(WindowsOptions(preset="smoke", lr_schedule="anneal", windows="tile:6", alphas=[-3.0],
                                    stages=["default"], out=str(tmp_path / "a")))
    assert plan.base.lr_schedule == "step" and plan.base.milestones == [2 * 5 / 6] and plan.base.gamma == 0.1
    lrs = [_mean_lr(plan, c) for c in sorted(plan.conditions[1:], key=lambda c: c.start_step)]
    assert lrs[:5] == pytest.approx([0.05] * 5) and lrs[5] == pytest.approx(0.005)
    back = make_plan(WindowsOptions(preset="smoke", lr_schedule="constant", out=str(tmp_path / "a")),
                     ["lr_schedule=step", "milestones=[1]"])  # overrides come last and win
    assert back.base.lr_schedule == "step" and back.base.milestones == [1]


def test_alpha_split_over_stages_is_refused(tmp_path):
    with pytest.raises(CsnError, match="reg_reduce=mean is not the map.s: preset smoke gives alpha to the regularized stages with reg_reduce=sum") as e:
        make_plan(WindowsOptions(preset="smoke", out=str(tmp_path / "x")), ["reg_reduce=mean"])
    assert "\n" not in str(e.value)
    assert make_plan(WindowsOptions(preset="smoke", out=str(tmp_path / "x")), ["reg_reduce=sum"]).base.reg_reduce == "sum"


# ------------------------------------------------------------------------------------------------
# power at the seeds asked
# ------------------------------------------------------------------------------------------------

def test_planned_power_is_each_verdicts_own_rule_simulated(tmp_path):
    plan = make_plan(WindowsOptions(preset="smoke", seeds=[0, 1, 2, 3], out=str(tmp_path / "p")))
    shapes = planned_power(plan, studies=500)
    sup = next(s for s in shapes if s["key"][0] == "suppress")
    pro = next(s for s in shapes if s["key"][0] == "promote")
    assert sup["key"] == ("suppress", 4, 2) and [r["question"] for r in sup["rows"]] == [ws.Q_EARLIEST, ws.Q_MORE, ws.Q_LITTLE]
    sd, eff = plan.run_sd, ws.EFFECTS["suppression"]
    for r in sup["rows"][:2]:
        sim = ws.simulate_suppression(r["question"], sd, windows=4, late_windows=2)
        assert r["power"] == I.power(sim, eff, 4, 500)
        assert I.power(sim, r["mde"], 4, 500) >= I.POWER > I.power(sim, r["mde"] * 0.97, 4, 500)
        assert r["seeds_needed"] == I.seeds_needed(sim, eff, studies=500)
    little = sup["rows"][2]
    # at margin = little the late windows cost nothing: the scenario's own 'late windows cost little' simulation
    assert little["power"] == I.power(ws.simulate_suppression(ws.Q_LITTLE, sd, windows=4, late_windows=2), eff, 4, 500)
    assert I.power(ws.simulate_little_margin(sd, 4, 2), little["mde"], 4, 500) >= I.POWER
    for r in pro["rows"]:
        assert r["power"] == I.power(ws.simulate_promotion(r["question"], sd), ws.EFFECTS["promotion"], 4, 500)


def test_more_seeds_more_power_and_a_larger_spread_less(tmp_path):
    def power(seeds, sd=None):
        plan = make_plan(WindowsOptions(preset="smoke", seeds=seeds, run_sd=sd, out=str(tmp_path / "p")))
        return {r["question"]: r for s in planned_power(plan, studies=500) for r in s["rows"]}
    two, five, noisy = power(2), power(5), power(5, 0.004)
    for q in (ws.Q_EARLIEST, ws.Q_MORE, ws.Q_LITTLE, ws.Q_PROMOTE_FINAL):
        assert two[q]["power"] <= five[q]["power"] and noisy[q]["power"] <= five[q]["power"]
        assert two[q]["seeds_needed"] == five[q]["seeds_needed"]  # a property of the effect and spread, not the plan
    assert five[ws.Q_MORE]["mde"] < two[ws.Q_MORE]["mde"] or math.isinf(two[ws.Q_MORE]["mde"])


def test_dry_run_prints_the_power_of_every_verdict_and_writes_nothing(tmp_path):
    out = tmp_path / "dry"
    res = CliRunner().invoke(cli, ["experiment", "windows", "--preset", "smoke", "--dry-run", "--seeds", "4",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "power of the verdicts at 4 seeds" in res.stdout and "0.0014" in res.stdout
    assert "the preset's: recorded on the fmnist study under the cosine schedule" in res.stdout
    for q in (ws.Q_EARLIEST, ws.Q_MORE, ws.Q_LITTLE, ws.Q_PROMOTE_FINAL, ws.Q_PROMOTE_END):
        line = next(x for x in res.stdout.splitlines() if x.strip().startswith(q))
        power = float(line[len(line.split(q)[0]) + len(q):].split()[0])
        assert 0 <= power <= 1
    assert "4 windows, 2 late" in res.stdout and "late cost <=" in res.stdout
    assert "alpha per stage (reg_reduce=sum)" in res.stderr and "lr 0.05 constant" in res.stderr
    assert "BatchNorm re-estimated from 16 training batches" in res.stderr
    assert not out.exists()
    res = CliRunner().invoke(cli, ["experiment", "windows", "--preset", "smoke", "--dry-run", "--run-sd", "0.01",
                                   "--windows", "step=0:step=4", "--out", str(out)])
    assert res.exit_code == 0 and "0.01 (as asked)" in res.stdout and "none late" in res.stdout
    assert ws.Q_MORE not in res.stdout and not out.exists()
