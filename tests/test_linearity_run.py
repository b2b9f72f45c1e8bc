"""`csn linearity` over a run: table schema and ranges, definitions at step 0, resume, the cached linear model, CLI, figures."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.analysis.base import analysis_model, eval_loader
from csn.analysis.linearity import (
    LINEARITY,
    MEASURE_GROUPS,
    Linearity,
    describe_linearity,
    expected_measures,
    linearity_measures,
    summarize_linearity,
)
from csn.analysis.linearity import analysis as lr
from csn.cli import main as cli
from csn.errors import CsnError
from csn.runs import Run, read_manifest, write_manifest
from tests.conftest import analyze

LINEARITY_TABLE_COLUMNS = list(LINEARITY.columns)


def linearity_for_run(run, **kw):
    """The rows of the request (the tests' shorthand for run_analysis)."""
    return analyze(Linearity, run, **kw).rows

torch.set_num_threads(1)

STEPS = [0, 1, 2, 4, 8, 12, 16]  # the tiny run's checkpoints
ALL = expected_measures(("linear", "linearized", "relu"))
AGREEMENTS = ["linear_agreement", "linear_acc", "acc", "linear_model_test_acc", "linearized_agreement_init",
              "linearized_agreement_prev", "relu_same_as_init", "relu_same_as_prev"]


@pytest.fixture(scope="module")
def computed(tiny_run_master, tmp_path_factory) -> Path:
    """A copy of the tiny run with the full linearity table (computed once for this module)."""
    dst = tmp_path_factory.mktemp("lin") / "tiny"
    shutil.copytree(tiny_run_master, dst)
    linearity_for_run(dst, progress=False, samples=100)
    return dst


def table(run) -> pd.DataFrame:
    return Run(run).read("linearity")


def value(df, step, measure) -> float:
    v = df[(df["step"] == step) & (df["measure"] == measure)]["value"]
    assert len(v) == 1, (step, measure)
    return float(v.iloc[0])


# ------------------------------------------------------------------------------------------------
# schema, ranges and definitions
# ------------------------------------------------------------------------------------------------

def test_schema_one_row_per_step_and_measure(computed):
    df = table(computed)
    assert list(df.columns) == LINEARITY_TABLE_COLUMNS
    assert len(df) == len(STEPS) * len(ALL) and not df.duplicated(["step", "measure"]).any()
    assert sorted(df["step"].unique()) == STEPS
    assert all(set(g) == set(ALL) for _, g in df.groupby("step")["measure"])
    assert df["step"].dtype == np.int64 and df["samples"].dtype == np.int64 and df["value"].dtype == np.float64
    assert set(df["split"]) == {"test"}
    # linear-model measures use the whole test split (128), the expensive ones the seeded subset
    sub = df["measure"].str.startswith(("linearized_", "relu_"))
    assert set(df.loc[sub, "samples"]) == {100} and set(df.loc[~sub & (df["measure"] != "linear_model_test_acc"),
                                                               "samples"]) == {128}
    # BN statistics re-estimated before epoch 1 by the default policy (the tiny split has 8 batches), off after
    bn = df.groupby("step")["bn_recalibrated"].first()
    ep = df.groupby("step")["epoch"].first()
    assert (bn[ep < 1] == 8).all() and (bn[ep >= 1] == 0).all()


def test_values_in_range_and_step_zero_definitions(computed):
    df = table(computed)
    for m in AGREEMENTS:
        v = df[df["measure"] == m]["value"].dropna()
        assert ((v >= 0) & (v <= 1)).all(), m
    # step 0: theta_t = theta_0
    assert value(df, 0, "relu_same_as_init") == 1.0
    assert value(df, 0, "linearized_agreement_init") == 1.0
    assert math.isnan(value(df, 0, "linearized_rel_dist_init"))  # 0/0: undefined, recorded as NaN
    for m in ("linearized_agreement_prev", "linearized_rel_dist_prev", "relu_same_as_prev"):
        assert math.isnan(value(df, 0, m))  # no previous checkpoint
    # at the second checkpoint, "previous" IS the initialization
    for a, b in (("relu_same_as_init", "relu_same_as_prev"), ("linearized_rel_dist_init", "linearized_rel_dist_prev")):
        assert value(df, 1, a) == pytest.approx(value(df, 1, b), abs=1e-12)
    later = df[(df["step"] > 0) & df["measure"].str.startswith("linearized_rel_dist")]["value"]
    assert later.notna().all() and (later > 0).all()
    # information: mu_Y <= I(L;Y) (the bound), I(L;Y) and the linear model's accuracy do not depend on the step
    for s in STEPS:
        assert value(df, s, "mu_y_bits") <= value(df, s, "i_ly_bits") + 1e-9
        assert value(df, s, "mu_y_bits") == pytest.approx(value(df, s, "i_fy_bits") - value(df, s, "i_fy_given_l_bits"))
        assert value(df, s, "mu_y_share") == pytest.approx(value(df, s, "mu_y_bits") / value(df, s, "i_fy_bits"))
    for m in ("i_ly_bits", "linear_acc", "linear_model_test_acc"):
        assert df[df["measure"] == m]["value"].nunique() == 1
    # training moves the network away from its initial ReLU patterns
    assert value(df, 16, "relu_same_as_init") < value(df, 1, "relu_same_as_init") < 1.0


def test_values_equal_the_core_measures_on_the_analysis_models(computed):
    """The driver adds nothing: same numbers as linearity_measures on analysis_model's models."""
    run = Run(computed)
    data = run.dataset()
    lin, _ = lr.linear_model_for_run(run, data)
    mt = analysis_model(run, run.checkpoint(4), data).model
    m0 = analysis_model(run, run.checkpoint(0), data).model
    mp = analysis_model(run, run.checkpoint(2), data).model
    full = linearity_measures(mt, m0, eval_loader(run, data, "test"), linear_model=lin, linearized=False, relu=False)
    sub = linearity_measures(mt, m0, eval_loader(run, data, "test", samples=100), model_prev=mp)
    df = table(computed)
    for k in ("linear_agreement", "mu_y_bits", "i_ly_bits"):
        assert value(df, 4, k) == pytest.approx(full[k], abs=1e-12)
    assert value(df, 4, "acc") == pytest.approx(full["test_acc"], abs=1e-12)
    for k in ("linearized_agreement_init", "linearized_rel_dist_init", "relu_same_as_prev"):
        assert value(df, 4, k) == pytest.approx(sub[k], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# resume and the cached linear model
# ------------------------------------------------------------------------------------------------

def test_resume_partial_then_full_keeps_rows_and_computes_only_missing(tiny_run, computed, monkeypatch):
    part = linearity_for_run(tiny_run, checkpoints="0:0.5", progress=False, samples=100)
    assert sorted(part["step"].unique()) == [0, 1, 2, 4]
    first = table(tiny_run).copy()
    lm = Path(tiny_run) / "tables" / "linear_model.safetensors"
    assert lm.is_file()
    mtime = lm.stat().st_mtime_ns

    calls = []
    real = lr.linearity_measures

    def counting(model_t, *a, **k):
        calls.append(1)
        return real(model_t, *a, **k)

    def no_refit(*a, **k):
        raise AssertionError("the cached linear model must be reused, not refit")

    monkeypatch.setattr(lr, "linearity_measures", counting)
    monkeypatch.setattr(lr, "fit_linear_classifier", no_refit)
    full = linearity_for_run(tiny_run, progress=False, samples=100)
    assert len(calls) == 2 * 3  # two passes (whole split, subset) for each of the 3 missing checkpoints
    assert lm.stat().st_mtime_ns == mtime
    df = table(tiny_run)
    assert not df.duplicated(["step", "measure"]).any() and sorted(df["step"].unique()) == STEPS
    pd.testing.assert_frame_equal(df[df["step"] <= 4].reset_index(drop=True), first.reset_index(drop=True))
    # resumed == computed in one go (the run's checkpoint "previous" to step 8 is reloaded correctly)
    key = ["step", "measure"]
    a = df.sort_values(key).reset_index(drop=True)
    b = table(computed).sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9)
    assert len(full) == len(df)

    calls.clear()
    linearity_for_run(tiny_run, progress=False, samples=100)  # everything done: no work
    assert calls == []


def test_linear_model_file_metadata_and_mismatch(computed):
    run = Run(computed)
    lin, meta = lr.linear_model_for_run(run, run.dataset())
    assert meta["fit"] == lr.LINEAR_FIT_DEFAULTS and meta["train_examples"] == 256 and meta["test_examples"] == 128
    assert lin.weight.shape == (4, 64)
    assert value(table(computed), 0, "linear_model_test_acc") == pytest.approx(meta["test_acc"])
    with pytest.raises(CsnError, match="--fit-epochs"):
        lr.linear_model_for_run(run, run.dataset(), epochs=3)


def test_fit_is_deterministic(tiny_run, computed):
    linearity_for_run(tiny_run, checkpoints="step=0", measures="linear", progress=False)
    a = (Path(tiny_run) / "tables" / "linear_model.safetensors").read_bytes()
    b = (Path(computed) / "tables" / "linear_model.safetensors").read_bytes()
    assert a == b


def test_measure_groups_and_settings_mismatch(tiny_run):
    df = linearity_for_run(tiny_run, checkpoints="step=0,step=1", measures=("relu",), samples=50, progress=False)
    assert set(df["measure"]) == {"acc", *MEASURE_GROUPS["relu"]}
    assert set(df["samples"]) == {50}
    assert not (Path(tiny_run) / "tables" / "linear_model.safetensors").exists()  # not needed, not fit
    with pytest.raises(CsnError, match="pass --samples 50"):
        linearity_for_run(tiny_run, checkpoints="step=0,step=1", samples=60, progress=False)
    with pytest.raises(CsnError, match="split=test"):
        linearity_for_run(tiny_run, checkpoints="step=0", split="train", samples=50, progress=False)
    with pytest.raises(CsnError, match="re-estimated from 8 batches"):
        linearity_for_run(tiny_run, checkpoints="step=0,step=1", bn_recalibrate=0, measures="relu", samples=50, progress=False)
    with pytest.raises(CsnError, match="unknown linearity measure group 'relus'"):
        linearity_for_run(tiny_run, measures="relus")


def test_samples_all_other_groups_and_step0_requirement(tiny_run):
    df = linearity_for_run(tiny_run, checkpoints="step=0,step=1", measures="relu", samples="all", progress=False)
    assert set(df["samples"]) == {128}  # 'all' = the whole test split
    # --samples only concerns the linearized/ReLU rows: the linear group is added beside them
    df = linearity_for_run(tiny_run, checkpoints="step=0,step=1", measures="linear", progress=False)
    assert set(df["measure"]) == set(MEASURE_GROUPS["linear"])
    assert set(table(tiny_run)["measure"]) == set(MEASURE_GROUPS["linear"]) | set(MEASURE_GROUPS["relu"])
    ckdir = Path(tiny_run) / "checkpoints"
    write_manifest(ckdir, [c for c in read_manifest(ckdir) if c.step != 0])
    with pytest.raises(CsnError, match="no step-0 checkpoint"):
        linearity_for_run(tiny_run, checkpoints="last", measures="relu", progress=False)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_happy_path_with_plot(tiny_run):
    res = CliRunner().invoke(cli, ["linearity", str(tiny_run), "--checkpoints", "step=0,step=2,step=8", "--samples", "64",
                                   "--plot", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "tables/linearity.parquet (45 rows)" in res.output
    assert "linear_model.safetensors" in res.output
    assert "relu_same_as_init" in res.output and "first 1.000 (epoch 0)" in res.output
    for ext in ("png", "svg"):
        f = Path(tiny_run) / "report" / f"linearity.{ext}"
        assert f.is_file() and f.stat().st_size > 1000
    res = CliRunner().invoke(cli, ["linearity", "--help"])
    assert "Kalimeris" in res.output and "Lee et al. 2019" in res.output and "f_lin = f(theta_0)" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--checkpoints", "7"], "for step 7 write step=7"),
    (["--checkpoints", "e1.x"], "'e1.x' is not a point in training"),
    (["--measures", "linear,foo"], "unknown linearity measure group 'foo'"),
    (["--samples", "lots"], "--samples expects an integer, got 'lots'"),
    (["--samples", "0"], "--samples must be >= 1, got '0'"),
    (["--bn-recalibrate", "-1"], "--bn-recalibrate must be"),
])
def test_cli_bad_input_one_line_exit_2_no_table(tiny_run, extra, message):
    res = CliRunner().invoke(cli, ["linearity", str(tiny_run), "--quiet"] + extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (Path(tiny_run) / "tables" / "linearity.parquet").exists()


# ------------------------------------------------------------------------------------------------
# summaries and figures from tables alone
# ------------------------------------------------------------------------------------------------

def test_summary_and_figures_from_tables_alone(computed, tmp_path):
    from csn.report.fig_linearity import linearity_figure

    df = table(computed)
    other = df.assign(value=df["value"] * 0.9)
    s = summarize_linearity([df, other])
    row = s[(s["step"] == 16) & (s["measure"] == "acc")].iloc[0]
    assert row["n_runs"] == 2 and row["mean"] == pytest.approx(0.95 * value(df, 16, "acc"))
    assert row["se"] == pytest.approx(np.std([value(df, 16, "acc"), 0.9 * value(df, 16, "acc")], ddof=1) / np.sqrt(2))
    lines = describe_linearity(df)
    assert any(line.startswith("relu_same_as_init") and "first 1.000" in line for line in lines)
    caps = {}
    for tables, name in (([df, other], "seeds"), ({"unreg": [df, other], "reg": [other]}, "conds")):
        f = linearity_figure(tables, tmp_path, name=name)  # (one table: see the CLI test)
        assert f.png.stat().st_size > 1000 and f.svg.stat().st_size > 1000
        assert f.caption.endswith(".") and "epoch" in f.caption
        caps[name] = f.caption
    assert "±1 SE over 2 seeds" in caps["seeds"] and "(unreg, reg)" in caps["conds"]
    with pytest.raises(CsnError):
        linearity_figure(pd.DataFrame(), tmp_path)
