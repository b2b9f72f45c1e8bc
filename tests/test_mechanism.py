"""The mechanism study: its answers from planted per-seed tables and curves (each question's statistic read from the
right condition, step and stages), and the rewind conditions of the windows framework."""

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

from csn.cli import main as cli
from csn.core import inference as I
from csn.errors import CsnError
from csn.experiments import mechanism as M
from csn.experiments import mechanism_stats as ms
from csn.experiments.windows import WindowGrid, WindowsOptions, grid_conditions, make_plan
from csn.runs.io import read_table
from csn.runs.run import Run

SEEDS = list(range(8))
STEPS = [0, 8, 16, 32, 64, 128, 234, 256, 312, 468, 936]


def _per_seed(harm_from0, harm_rewind, csi_reduction=0.9):
    rows = []
    for s in SEEDS:
        rows.append({"condition": "baseline", "kind": "baseline", "seed": s, "start_step": 0, "end_step": 0,
                     "stages": "", "harm": 0.0, "csi_reduction_end": np.nan})
        rows.append({"condition": "a-20_step0-end", "kind": "suppress", "seed": s, "start_step": 0, "end_step": 936,
                     "stages": "layer1+layer2", "harm": harm_from0[s], "csi_reduction_end": csi_reduction})
        rows.append({"condition": "a-20_step234-end", "kind": "suppress", "seed": s, "start_step": 234,
                     "end_step": 936, "stages": "layer1+layer2", "harm": 0.0, "csi_reduction_end": csi_reduction})
        for at, to, h in ((64, 0, harm_rewind[s]), (64, 32, 0.0), (234, 0, 0.0)):
            rows.append({"condition": f"rewind_step{at}-to{to}", "kind": "rewind", "seed": s, "start_step": at,
                         "end_step": at, "stages": "layer1+layer2", "harm": h, "rewind_to_step": to,
                         "csi_reduction_end": np.nan})
    return pd.DataFrame(rows)


def _series(probe_drop, fisher_peak, csi_peak, rng):
    out = {}
    for s in SEEDS:
        def bump(peak):
            return pd.Series([1.0 / (1 + abs(np.log2((t + 8) / (peak + 8)))) for t in STEPS], index=STEPS)
        base = {"csi": bump(csi_peak[s]), "eta2": bump(csi_peak[s]), "fisher_trace": bump(fisher_peak[s]) * 100,
                "probe_acc": pd.Series(0.8 + rng.normal(0, 0.002, len(STEPS)), index=STEPS)}
        out[("baseline", s)] = base
        cond = dict(base)
        cond["probe_acc"] = base["probe_acc"] - probe_drop[s]
        out[("a-20_step0-end", s)] = cond
    return out


def test_answers_read_each_question_where_it_is_declared():
    rng = np.random.default_rng(0)
    harm0 = 0.013 + rng.normal(0, 0.001, 8)
    per_seed = _per_seed(harm0, harm0 + rng.normal(0, 0.001, 8))
    series = _series(0.03 + rng.normal(0, 0.002, 8), [64] * 8, [64] * 8, rng)
    a = M.answers(per_seed, series, 936).set_index("question")
    assert a.loc[ms.Q_PROBE, "verdict"] == I.HOLDS and a.loc[ms.Q_PROBE, "estimate"] == pytest.approx(0.03, abs=0.003)
    assert a.loc[ms.Q_FISHER, "verdict"] == I.HOLDS and a.loc[ms.Q_FISHER, "estimate"] == 0.0
    assert a.loc[ms.Q_REWIND, "verdict"] == I.HOLDS  # the rewind harms like the suppression
    # the rewind judged is the one at the earliest step, to step 0: its harm, not the others' (0)
    per_seed = _per_seed(harm0, np.zeros(8))
    assert M.answers(per_seed, series, 936).set_index("question").loc[ms.Q_REWIND, "verdict"] == I.DOES_NOT_HOLD


def test_answers_say_no_and_inconclusive_with_reasons():
    rng = np.random.default_rng(1)
    harm0 = 0.013 + rng.normal(0, 0.001, 8)
    series = _series(rng.normal(0, 0.001, 8), [468] * 8, [16] * 8, rng)  # no probe drop; Fisher peak 4.5 octaves late
    a = M.answers(_per_seed(harm0, harm0), series, 936).set_index("question")
    assert a.loc[ms.Q_PROBE, "verdict"] == I.DOES_NOT_HOLD
    assert a.loc[ms.Q_FISHER, "verdict"] == I.DOES_NOT_HOLD and a.loc[ms.Q_FISHER, "estimate"] > 4
    assert "s0: 468/16" in a.loc[ms.Q_FISHER, "detail"]
    weak = M.answers(_per_seed(harm0, harm0, csi_reduction=0.2), series, 936).set_index("question")
    assert weak.loc[ms.Q_PROBE, "verdict"] == I.INCONCLUSIVE and "did not take" in weak.loc[ms.Q_PROBE, "observed"]
    harmless = M.answers(_per_seed(np.zeros(8) + rng.normal(0, 1e-4, 8), harm0), series, 936).set_index("question")
    assert harmless.loc[ms.Q_REWIND, "verdict"] == I.INCONCLUSIVE
    assert "does not itself harm" in harmless.loc[ms.Q_REWIND, "observed"]


def test_curves_are_means_and_ses_over_seeds():
    rng = np.random.default_rng(2)
    series = _series(np.full(8, 0.05), [64] * 8, [64] * 8, rng)
    c = M.curves(series, {"baseline": "baseline", "a-20_step0-end": "suppress"}, 468)
    got = c[(c["condition"] == "baseline") & (c["quantity"] == "probe_acc") & (c["step"] == 64)].iloc[0]
    vals = [series[("baseline", s)]["probe_acc"][64] for s in SEEDS]
    assert got["mean"] == pytest.approx(np.mean(vals), abs=1e-12) and got["n"] == 8
    assert got["se"] == pytest.approx(np.std(vals, ddof=1) / np.sqrt(8), abs=1e-12)
    assert got["epoch"] == pytest.approx(64 / 468)


def test_the_mechanism_plan_rewinds_the_suppressed_stages_at_the_declared_steps(tmp_path):
    plan = make_plan(WindowsOptions(preset="mechanism-smoke", out=str(tmp_path / "m")))
    rew = [c for c in plan.conditions if c.kind == "rewind"]
    sup = [c for c in plan.conditions if c.kind == "suppress"]
    assert [(c.end_step, c.to_step) for c in rew] == [(4, 0), (4, 2), (8, 0), (8, 4)]
    assert all(c.stages == sup[0].stages for c in rew)
    cfg = rew[0].apply(plan.base, 0)
    assert cfg.interventions == [{"kind": "rewind", "stages": list(sup[0].stages), "at": "step=4", "to": "step=0"}]
    assert cfg.reg_alpha is None and plan.base.reg_reduce == "mean"
    # measured from the condition's start on (before it a run equals its baseline)
    assert plan.selectivity_steps(rew[2]) == [s for s in plan.selectivity_steps(plan.conditions[0]) if s >= 8]


@pytest.mark.parametrize("grid, match", [
    ({"kind": "rewind", "at": "step=0"}, "not inside training"),
    ({"kind": "rewind", "at": "end"}, "not inside training"),
    ({"kind": "rewind", "at": "step=8", "to": ["step=8"]}, "does not go back in time"),
    ({"kind": "rewind", "at": "step=8", "to": ["at*1.5"]}, "write at\\*X with 0 <= X < 1"),
    ({"kind": "rewind", "at": "step=2:step=8"}, "is a range"),
])
def test_bad_rewind_grids_are_one_sentence(grid, match):
    with pytest.raises(CsnError, match=match) as e:
        grid_conditions(WindowGrid(**grid), [("default", ("layer1",), None)], 8, 16, 2.0)
    assert "\n" not in str(e.value)


def test_a_grid_takes_the_keys_of_its_kind():
    with pytest.raises(ValidationError, match="a rewind grid takes at"):
        WindowGrid(kind="rewind", alphas=[-3.0], windows="tile:4", at="step=4")
    with pytest.raises(ValidationError, match="a selectivity grid takes alphas and windows"):
        WindowGrid(alphas=[-3.0], windows="tile:4", at="step=4")


def test_the_mechanism_study_end_to_end_at_toy_size(tmp_path):
    """mechanism-smoke with one seed: every condition trains (rewinds recorded in run.json, the rewound stages equal
    to their source checkpoint at the rewind's step), probe and Fisher are measured where selectivity is, the
    answers and curves are written, and the report has the section."""
    out = tmp_path / "mech"
    res = CliRunner().invoke(cli, ["experiment", "windows", "--preset", "mechanism-smoke", "--seeds", "1", "--parallel",
                                   "1", "--quiet", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "the mechanism questions at 1 seeds" not in res.output  # only the dry run prints the power
    rewound = Run(out / "rewind_step4-to0-s0")
    (rec,) = [r for r in rewound.info["interventions"] if r["kind"] == "rewind"]
    assert (rec["at_step"], rec["to_step"], rec["stages"]) == (4, 0, ["layer1", "layer2"])
    after, source = rewound.load_state(rewound.checkpoint(4)), rewound.load_state(rewound.checkpoint(0))
    assert all(torch.equal(after[k], source[k]) for k in after if k.startswith(("layer1.", "layer2.")))
    assert any(not torch.equal(after[k], source[k]) for k in after if k.startswith("layer3."))
    plan = make_plan(WindowsOptions(preset="mechanism-smoke", out=str(out), seeds=[0]))
    for cond in plan.conditions:
        run = Run(out / f"{cond.name}-s0")
        for table in ("selectivity", "probe", "fisher"):
            assert sorted(run.read(table)["step"].unique()) == plan.selectivity_steps(cond), (cond.name, table)
    answers = read_table(out / "windows_mechanism.parquet")
    assert list(answers["question"]) == list(ms.QUESTIONS) and set(answers["verdict"]) == {I.INCONCLUSIVE}
    curves = read_table(out / "windows_mechanism_curves.parquet")
    assert set(curves["quantity"]) == set(M.QUANTITIES) and set(curves["condition"]) == {c.name for c in plan.conditions}
    assert "By which mechanism" in (out / "report" / "index.html").read_text()


def test_the_fmnist_mechanism_plan_is_the_declared_one(tmp_path):
    """The study as declared: the regime's fmnist cell (2 epochs = 936 steps, constant lr, the study's statistic at
    -20 split over stages 1-2), suppression from step 0 and 234, rewinds at 64 and 234 to 0 and half-way, 8 seeds,
    probe and Fisher beside selectivity at 0:f0.5 and the end; the dry run prints the questions' power."""
    plan = make_plan(WindowsOptions(preset="mechanism", out=str(tmp_path / "m")))
    b = plan.base
    assert (plan.total, b.lr_schedule, b.reg_mode, b.reg_reduce, b.dataset) == (936, "constant", "study", "mean",
                                                                                "fashion-mnist")
    assert [c.name for c in plan.conditions] == ["baseline", "a-20_step0-end", "a-20_step234-end", "rewind_step64-to0",
                                                 "rewind_step64-to32", "rewind_step234-to0", "rewind_step234-to117"]
    assert plan.seeds == list(range(8)) and plan.preset.mechanism and set(plan.preset.analyses) == {"probe", "fisher"}
    assert plan.selectivity_steps(plan.conditions[0]) == [0, 8, 16, 32, 64, 128, 234, 256, 312, 468, 936]
    assert plan.selectivity_steps(plan.conditions[5]) == [234, 256, 312, 468, 936]
    res = CliRunner().invoke(cli, ["experiment", "windows", "--preset", "mechanism", "--dry-run", "--out",
                                   str(tmp_path / "m")])
    assert res.exit_code == 0 and not (tmp_path / "m").exists()
    assert "the mechanism questions at 8 seeds" in res.output and ms.Q_REWIND in res.output
