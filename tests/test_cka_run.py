"""`csn cka` over runs: within-checkpoint matrices, across checkpoints, two runs, resume, errors, CLI, figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.analysis.base import analysis_model, eval_loader
from csn.analysis.cka import (
    CKA,
    Cka,
    cka_matrix,
    describe_cka,
    match_checkpoints,
    summarize_cka_runs,
)
from csn.analysis.cka import analysis as cr
from csn.analysis.cka import cka as core_cka
from csn.cli import main as cli
from csn.errors import CsnError
from csn.runs import Checkpoint, Run
from tests.conftest import analyze

CKA_TABLE_COLUMNS = list(CKA.columns)


def cka_for_runs(run, run_b=None, **kw) -> pd.DataFrame:
    """The rows of the request (the tests' shorthand for run_analysis of Cka)."""
    return analyze(Cka, run, run_b=run_b, **kw).rows


torch.set_num_threads(1)

STEPS = [0, 1, 2, 4, 8, 12, 16]
LAYERS = ["layer1.0", "layer2.0", "layer3.0", "logits"]


@pytest.fixture(scope="module")
def computed(tiny_run_master, tmp_path_factory) -> Path:
    """A copy of the tiny run with within (all checkpoints) and across (reference last) CKA rows."""
    dst = tmp_path_factory.mktemp("cka") / "tiny"
    shutil.copytree(tiny_run_master, dst)
    cka_for_runs(dst, progress=False)
    cka_for_runs(dst, mode="across", progress=False)
    return dst


def table(run) -> pd.DataFrame:
    return Run(run).read("cka")


def test_within_schema_symmetric_unit_diagonal(computed):
    df = table(computed)
    assert list(df.columns) == CKA_TABLE_COLUMNS
    w = df[df["comparison"] == "within"]
    assert len(w) == len(STEPS) * len(LAYERS) ** 2
    assert not df.duplicated(["comparison", "run_b", "step_a", "step_b", "layer_a", "layer_b"]).any()
    assert (w["step_a"] == w["step_b"]).all() and (w["run_a"] == "tiny").all() and (w["run_b"] == "tiny").all()
    assert set(w["samples"]) == {128} and set(w["split"]) == {"test"}
    ep = w.groupby("step_a")["epoch_a"].first()
    bn = w.groupby("step_a")["bn_recalibrated"].first()
    assert (bn[ep < 1] == 8).all() and (bn[ep >= 1] == 0).all()
    for s in STEPS:
        m = cka_matrix(df, s)
        assert list(m.index) == LAYERS and list(m.columns) == LAYERS
        a = m.to_numpy(dtype=float)
        np.testing.assert_allclose(a, a.T, atol=1e-12)
        np.testing.assert_allclose(np.diag(a), 1.0, atol=1e-12)
        assert np.all(a <= 1 + 1e-9)


def test_within_equals_core_cka_on_the_analysis_model(computed):
    run = Run(computed)
    data = run.dataset()
    model = analysis_model(run, run.checkpoint(2), data).model
    ref = core_cka(model, model, eval_loader(run, data, "test"), LAYERS, LAYERS)
    got = table(computed)
    got = got[(got["comparison"] == "within") & (got["step_a"] == 2)]
    merged = ref.merge(got, on=["layer_a", "layer_b"], suffixes=("_ref", ""))
    assert len(merged) == 16
    np.testing.assert_allclose(merged["cka"], merged["cka_ref"], rtol=1e-10)


def test_across_reference_is_one_at_the_reference_and_previous_rows(computed):
    df = table(computed)
    r = df[(df["comparison"] == "reference") & (df["step_b"] == 16)]  # the default reference: the last checkpoint
    assert len(r) == len(STEPS) * len(LAYERS)
    assert (r["layer_a"] == r["layer_b"]).all()
    np.testing.assert_allclose(r[r["step_a"] == 16]["cka"], 1.0, atol=1e-12)
    assert (r[r["step_a"] < 16]["cka"] < 1).all()
    p = df[df["comparison"] == "previous"]
    assert sorted(p["step_a"].unique()) == STEPS[1:]  # the first checkpoint has no previous one
    prev_of = dict(zip(STEPS[1:], STEPS[:-1]))
    assert all(prev_of[a] == b for a, b in zip(p["step_a"], p["step_b"]))
    # vs previous at step 1 == vs reference "first" at step 1 (the previous checkpoint IS step 0)
    first = cka_for_runs(computed, mode="across", reference="first", checkpoints="step=0,step=1", previous=False, progress=False)
    assert set(first["comparison"]) == {"reference"} and set(first["step_b"]) == {0}
    np.testing.assert_allclose(first[first["step_a"] == 0]["cka"], 1.0, atol=1e-12)
    a = first[first["step_a"] == 1].set_index("layer_a")["cka"]
    b = p[p["step_a"] == 1].set_index("layer_a")["cka"]
    np.testing.assert_allclose(a.loc[LAYERS], b.loc[LAYERS], rtol=1e-12)
    with pytest.raises(CsnError, match="--reference"):
        cka_for_runs(computed, mode="across", reference="0:1", progress=False)
    with pytest.raises(CsnError, match="for step 7 write step=7"):
        cka_for_runs(computed, mode="across", reference="7", progress=False)


def test_two_runs_exact_copy_gives_one_everywhere(tiny_run, tmp_path):
    other = tmp_path / "copy" / "tiny"
    shutil.copytree(tiny_run, other)
    df = cka_for_runs(tiny_run, other, checkpoints="0:1", progress=False)
    assert set(df["comparison"]) == {"runs"} and set(df["run_b"]) == {"copy/tiny"}
    assert sorted(df["step_a"].unique()) == [0, 1, 2, 4, 8] and (df["step_a"] == df["step_b"]).all()
    assert (df["layer_a"] == df["layer_b"]).all() and len(df) == 5 * len(LAYERS)
    np.testing.assert_allclose(df["cka"], 1.0, atol=1e-12)
    assert (df["bn_recalibrated"] == df["bn_recalibrated_b"]).all()


def test_mismatched_datasets_are_an_error(tiny_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other)
    info = json.loads((other / "run.json").read_text())
    info["config"]["synthetic"]["size"] = 12
    info["data"]["image_size"] = 12
    (other / "run.json").write_text(json.dumps(info))
    with pytest.raises(CsnError, match="use different data .*image_size.*same dataset"):
        cka_for_runs(tiny_run, other, progress=False)
    assert not (Path(tiny_run) / "tables" / "cka.parquet").exists()


def test_match_by_step_else_nearest_epoch():
    a = [Checkpoint(0, 0.0, "f", "x"), Checkpoint(10, 0.5, "f", "x"), Checkpoint(20, 1.0, "f", "x")]
    b = [Checkpoint(0, 0.0, "f", "x"), Checkpoint(16, 0.4, "f", "x"), Checkpoint(40, 1.0, "f", "x")]
    m = match_checkpoints(a, b)
    assert [(x.step, y.step, exact) for x, y, exact in m] == [(0, 0, True), (10, 16, False), (20, 40, False)]


def test_resume_computes_only_missing_and_keeps_rows(tiny_run, computed, monkeypatch):
    cka_for_runs(tiny_run, checkpoints="step=0,step=1", progress=False)
    first = table(tiny_run).copy()
    calls = []
    real = cr.collect_features

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cr, "collect_features", counting)
    cka_for_runs(tiny_run, progress=False)
    assert len(calls) == len(STEPS) - 2
    df = table(tiny_run)
    assert not df.duplicated(["comparison", "run_b", "step_a", "step_b", "layer_a", "layer_b"]).any()
    pd.testing.assert_frame_equal(df.iloc[: len(first)].reset_index(drop=True), first)
    want = table(computed)
    want = want[want["comparison"] == "within"].reset_index(drop=True)
    pd.testing.assert_frame_equal(df.reset_index(drop=True), want, check_exact=False, rtol=1e-12)
    calls.clear()
    cka_for_runs(tiny_run, progress=False)
    assert calls == []
    # across with the previous checkpoint: each checkpoint's features are computed once
    cka_for_runs(tiny_run, mode="across", progress=False)
    assert len(calls) == len(STEPS)
    with pytest.raises(CsnError, match="pass --samples 128"):
        cka_for_runs(tiny_run, samples=50, progress=False)


def test_layer_subset_and_errors(tiny_run):
    df = cka_for_runs(tiny_run, layers=["layer3.*", "logits"], checkpoints="last", progress=False)
    assert set(df["layer_a"]) == {"layer3.0", "logits"} and len(df) == 4
    with pytest.raises(CsnError, match="available names.*or 'logits'"):
        cka_for_runs(tiny_run, layers=["layer9.0"], progress=False)
    with pytest.raises(CsnError, match="batch_size' must be >= 4, got 3"):
        cka_for_runs(tiny_run, batch_size=3, progress=False)
    with pytest.raises(CsnError, match="RUN_B"):
        cka_for_runs(tiny_run, mode="runs", progress=False)
    with pytest.raises(CsnError, match="mode' expects one of 'within', 'across' or 'runs'"):
        cka_for_runs(tiny_run, mode="sideways", progress=False)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------

def test_cli_happy_path_with_plot(tiny_run, tmp_path):
    res = CliRunner().invoke(cli, ["cka", str(tiny_run), "--checkpoints", "step=0,step=4,step=16", "--plot", "--quiet",
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "tables/cka.parquet (48 rows)" in res.output and "layer x layer" in res.output
    res = CliRunner().invoke(cli, ["cka", str(tiny_run), "--mode", "across", "--reference", "first", "--plot",
                                   "--quiet", "--checkpoints", "step=0,step=4,step=16"])
    assert res.exit_code == 0, res.output
    assert "vs reference step 0" in res.output and "vs previous checkpoint" in res.output
    other = tmp_path / "b" / "tiny"
    shutil.copytree(tiny_run, other)
    res = CliRunner().invoke(cli, ["cka", str(tiny_run), str(other), "--checkpoints", "step=0,step=4", "--plot", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "vs run b/tiny" in res.output and "first 1.000" in res.output
    for name in ("cka_within", "cka_pairs", "cka_across", "cka_runs_b_tiny"):
        for ext in ("png", "svg"):
            f = Path(tiny_run) / "report" / f"{name}.{ext}"
            assert f.is_file() and f.stat().st_size > 1000, f
    res = CliRunner().invoke(cli, ["cka", "--help"])
    assert "Kornblith et al. 2019" in res.output and "Nguyen, Raghu & Kornblith 2021" in res.output
    assert "HSIC1(K, L) =" in res.output


@pytest.mark.parametrize("extra, message", [
    (["--layers", "layer1.0,lyr2.0"], "layer pattern 'lyr2.0' matches no module; available names"),
    (["--checkpoints", "7"], "for step 7 write step=7"),
    (["--checkpoints", "e1.x"], "'e1.x' is not a point in training"),
    (["--batch-size", "3"], "--batch-size must be >= 4, got '3'"),
    (["--samples", "3"], "CKA needs batches of more than 3 examples"),
    (["--mode", "runs"], "--mode runs compares two runs"),
    (["--mode", "across", "--reference", "e"], "--reference 'e' is not a point in training"),
])
def test_cli_bad_input_one_line_exit_2_no_table(tiny_run, extra, message):
    res = CliRunner().invoke(cli, ["cka", str(tiny_run), "--quiet"] + extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not (Path(tiny_run) / "tables" / "cka.parquet").exists()


# ------------------------------------------------------------------------------------------------
# figures and summaries from tables alone
# ------------------------------------------------------------------------------------------------

def test_figures_from_tables_alone(computed, tmp_path):
    from csn.report.fig_cka import cka_across_vs_epoch, cka_heatmaps, cka_runs_vs_epoch

    df = table(computed)
    f = cka_heatmaps(df, tmp_path, steps=[0, 16])
    assert f.png.stat().st_size > 1000 and f.svg.stat().st_size > 1000 and "steps 0, 16" in f.caption
    f = cka_across_vs_epoch(df, tmp_path)
    assert f.png.stat().st_size > 1000 and "step 16" in f.caption
    # runs comparison over two seed pairs: mean and SE over pairs
    r = df[(df["comparison"] == "reference") & (df["step_b"] == 16)].assign(comparison="runs", run_b="unreg", step_b=lambda d: d["step_a"])
    r2 = r.assign(cka=r["cka"] * 0.5)
    s = summarize_cka_runs([r, r2])
    row = s[(s["step_a"] == 0) & (s["layer"] == "logits")].iloc[0]
    base = float(r[(r["step_a"] == 0) & (r["layer_a"] == "logits")]["cka"].iloc[0])
    assert row["n_pairs"] == 2 and row["mean"] == pytest.approx(0.75 * base)
    f = cka_runs_vs_epoch([r, r2], tmp_path, label_a="reg", label_b="unreg")
    assert f.png.stat().st_size > 1000 and "2 run pairs" in f.caption
    assert any("layer x layer" in line for line in describe_cka(df))
    with pytest.raises(CsnError, match="no within-checkpoint CKA at step 5"):
        cka_heatmaps(df, tmp_path, steps=[5])
    with pytest.raises(CsnError, match="no 'runs' rows"):
        cka_runs_vs_epoch(df, tmp_path)


def test_run_eval_batch_size_of_three_is_an_error(tiny_run):
    info = json.loads((Path(tiny_run) / "run.json").read_text())
    info["config"]["eval_batch_size"] = 3
    (Path(tiny_run) / "run.json").write_text(json.dumps(info))
    with pytest.raises(CsnError, match="more than 3 examples .*got a batch size of 3, pass --batch-size 4"):
        cka_for_runs(tiny_run, progress=False)
    assert not (Path(tiny_run) / "tables" / "cka.parquet").exists()


def test_bn_statistics_of_a_checkpoint_are_never_mixed(tiny_run):
    """Rows of one checkpoint share its BN setting, whatever the comparison (TableSpec.row_scope)."""
    cka_for_runs(tiny_run, checkpoints="step=0", progress=False)  # default policy: step 0 re-estimated from 8 batches
    before = table(tiny_run)
    with pytest.raises(CsnError, match="step_a 0 with BatchNorm statistics re-estimated from 8 batches, but this "
                                       "request asks for 0; pass --bn-recalibrate 8"):
        cka_for_runs(tiny_run, mode="across", checkpoints="step=0", bn_recalibrate=0, progress=False)
    with pytest.raises(CsnError, match="run_b tiny, step_b 0 with BatchNorm statistics of run B re-estimated from 8 "
                                       "batches, but this request asks for 0"):
        cka_for_runs(tiny_run, mode="across", reference="first", checkpoints="step=16", bn_recalibrate=0, progress=False)
    pd.testing.assert_frame_equal(table(tiny_run), before)
