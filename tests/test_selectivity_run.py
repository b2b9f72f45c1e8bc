"""`csn selectivity` on a run: tables, resume, BN re-estimation policy, errors, summaries, figures, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.analysis import base
from csn.analysis import selectivity as selmod
from csn.analysis.base import analysis_model, eval_loader
from csn.analysis.selectivity import (
    CLASS_MEANS,
    SELECTIVITY,
    Selectivity,
    class_selectivity,
    summarize,
)
from csn.analysis.selectivity import summarize_across_runs as summarize_runs
from csn.cli import main as cli
from csn.core.units import stage_of
from csn.errors import CsnError
from csn.runs import Run, read_manifest, save_tensors, sha256_file, write_manifest
from tests.conftest import analyze

SELECTIVITY_TABLE_COLUMNS = list(SELECTIVITY.columns)
CLASS_MEANS_TABLE_COLUMNS = list(CLASS_MEANS.columns)


def selectivity_for_run(run, **kw):
    """(selectivity rows, class-means rows) of the request (the tests' shorthand for run_analysis)."""
    return tuple(analyze(Selectivity, run, **kw).tables.values())

torch.set_num_threads(1)  # 2 shared cores: OpenMP threads under contention are far slower than one

STEPS = [0, 1, 2, 4, 8, 12, 16]  # the tiny run's checkpoints (epochs 0 .. 2, 8 steps per epoch)
UNITS = 8 + 16 + 32  # resnet8 at width 0.5: one block per stage
K = 4


@pytest.fixture(scope="module")
def computed(tiny_run_master, tmp_path_factory) -> Path:
    """A copy of the tiny run with the default selectivity tables (do not modify)."""
    dst = tmp_path_factory.mktemp("sel") / "tiny"
    shutil.copytree(tiny_run_master, dst)
    selectivity_for_run(dst, progress=False, log=lambda s: None)
    return dst


def tables(path) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    run = Run(path)
    return run.read("selectivity"), run.read("class_means")


def steps_of(df) -> list[int]:
    return [] if df is None else sorted(df["step"].unique().tolist())


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------

def test_tables_schema_row_counts_and_ranges(computed):
    sel, cm = tables(computed)
    assert list(sel.columns) == SELECTIVITY_TABLE_COLUMNS
    assert list(cm.columns) == CLASS_MEANS_TABLE_COLUMNS
    assert len(sel) == UNITS * len(STEPS) and len(cm) == UNITS * K * len(STEPS)
    assert steps_of(sel) == STEPS == steps_of(cm)
    assert not sel.duplicated(["step", "layer", "unit"]).any()
    assert not cm.duplicated(["step", "layer", "unit", "class"]).any()
    for col in ("step", "unit", "pref_class", "bn_recalibrated", "n_images"):
        assert sel[col].dtype == np.int64, col
    assert sel["dead"].dtype == bool
    assert set(sel["split"]) == {"test"} and set(sel["variant"]) == {"mean"} and set(sel["n_images"]) == {128}
    model = Run(computed).build_model()
    assert all(sel["stage"] == sel["layer"].map(lambda n: stage_of(model, n)))
    assert set(sel["stage"]) == {"layer1", "layer2", "layer3"}
    assert sel["eta2"].between(0, 1).all() and sel["csi"].between(0, 1).all()  # post-ReLU read points
    epochs = dict(zip(sel["step"], sel["epoch"]))
    assert epochs[0] == 0.0 and epochs[8] == 1.0 and epochs[16] == 2.0
    # class means agree with the selectivity columns (mu_max is the largest class mean)
    mx = cm.groupby(["step", "layer", "unit"])["mean"].max().rename("m")
    joined = sel.join(mx, on=["step", "layer", "unit"])
    np.testing.assert_allclose(joined["m"], joined["mu_max"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("step", [0, 16])  # BN re-estimated at step 0, stored statistics at step 16
def test_values_equal_class_selectivity_on_the_same_model(computed, step):
    run = Run(computed)
    data = run.dataset()
    ckpt = run.checkpoint(step)
    am = analysis_model(run, ckpt, data)
    ref = class_selectivity(am.model, eval_loader(run, data, "test"), num_classes=K, progress=False)
    sel, _ = tables(computed)
    got = sel[sel["step"] == step].reset_index(drop=True)
    for col in ("layer", "stage", "unit", "pref_class", "dead"):
        assert got[col].tolist() == ref[col].tolist(), col
    for col in ("csi", "mu_max", "mu_rest", "eta2"):
        np.testing.assert_allclose(got[col].to_numpy(), ref[col].to_numpy(), rtol=1e-12, atol=1e-15)
    assert (got["bn_recalibrated"] > 0).all() == (step == 0)


def test_study_variant_in_its_own_table(computed, tmp_path):
    run_dir = tmp_path / "tiny"
    shutil.copytree(computed, run_dir)
    with pytest.raises(CsnError, match="variant=mean.*--tag"):
        selectivity_for_run(run_dir, variant="study", checkpoints="last", progress=False)
    sel, _ = selectivity_for_run(run_dir, variant="study", tag="study", checkpoints="last", progress=False)
    run = Run(run_dir)
    data = run.dataset()
    ref = class_selectivity(analysis_model(run, run.checkpoint(16), data).model, eval_loader(run, data, "test"),
                            num_classes=K, variant="study", progress=False)
    np.testing.assert_allclose(sel["csi"], ref["csi"], rtol=1e-12)
    assert set(sel["variant"]) == {"study"} and (run_dir / "tables" / "class_means-study.parquet").is_file()


def test_samples_subset_recorded_and_not_mixed(tiny_run):
    sel, cm = selectivity_for_run(tiny_run, samples=100, checkpoints="last", progress=False)
    assert (sel["n_images"] == 100).all() and len(sel) == UNITS
    run = Run(tiny_run)
    data = run.dataset()
    ref = class_selectivity(analysis_model(run, run.checkpoint(16), data).model,
                            eval_loader(run, data, "test", samples=100), num_classes=K, progress=False)
    np.testing.assert_allclose(sel["csi"], ref["csi"], rtol=1e-12)
    with pytest.raises(CsnError, match="holds n_images=100 but this request asks for n_images=128; pass --samples 100"):
        selectivity_for_run(tiny_run, checkpoints="step=0", progress=False)
    with pytest.raises(CsnError, match="samples' must be >= 1, got 0"):
        selectivity_for_run(tiny_run, samples=0, progress=False)


# ------------------------------------------------------------------------------------------------
# resume and crashes
# ------------------------------------------------------------------------------------------------

def test_resume_computes_only_missing_checkpoints_and_keeps_rows(tiny_run, computed, monkeypatch):
    first, _ = selectivity_for_run(tiny_run, checkpoints="step=0,step=4", progress=False)
    assert steps_of(first) == [0, 4]
    before_sel, before_cm = tables(tiny_run)
    calls = []
    real = Selectivity.compute
    monkeypatch.setattr(Selectivity, "compute", lambda self, ctx, c, *a: calls.append(c.step) or real(self, ctx, c, *a))
    selectivity_for_run(tiny_run, progress=False)
    assert calls == [1, 2, 8, 12, 16]
    sel, cm = tables(tiny_run)
    assert not sel.duplicated(["step", "layer", "unit"]).any() and len(sel) == UNITS * len(STEPS)
    pd.testing.assert_frame_equal(sel[sel["step"].isin([0, 4])].reset_index(drop=True), before_sel)
    pd.testing.assert_frame_equal(cm[cm["step"].isin([0, 4])].reset_index(drop=True), before_cm)
    # the same as computing everything in one go
    full_sel, full_cm = tables(computed)
    pd.testing.assert_frame_equal(sel, full_sel)
    pd.testing.assert_frame_equal(cm, full_cm)
    calls.clear()
    selectivity_for_run(tiny_run, progress=False)  # nothing left to do
    assert calls == []


def test_crash_leaves_only_complete_checkpoints_then_resumes(tiny_run, computed, monkeypatch):
    real = selmod.collect_class_stats
    n = {"calls": 0}

    def crashing(*a, **k):
        n["calls"] += 1
        if n["calls"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    monkeypatch.setattr(selmod, "collect_class_stats", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        selectivity_for_run(tiny_run, progress=False)
    sel, cm = tables(tiny_run)
    assert steps_of(sel) == [0, 1] == steps_of(cm)
    assert len(sel) == 2 * UNITS and len(cm) == 2 * UNITS * K
    assert not (Path(tiny_run) / ".lock").exists()
    # a crash between the two writes: class means of a step that selectivity does not have yet
    run = Run(tiny_run)
    orphan = cm[cm["step"] == 1].assign(step=2, mean=-1.0)
    run.write("class_means", pd.concat([cm, orphan], ignore_index=True))
    monkeypatch.setattr(selmod, "collect_class_stats", real)
    selectivity_for_run(tiny_run, progress=False)
    sel, cm = tables(tiny_run)
    full_sel, full_cm = tables(computed)
    pd.testing.assert_frame_equal(sel, full_sel)
    pd.testing.assert_frame_equal(cm, full_cm)


def test_a_kill_between_the_two_writes_never_leaves_selectivity_ahead_of_class_means(tiny_run, monkeypatch):
    """The primary table is written last, so a step in selectivity.parquet has its class means on disk."""
    from csn.runs.table import ResumableTable
    real, order = ResumableTable.add, []

    def add(self, df):
        order.append(self.name)
        if len(order) == 3:  # the second checkpoint's first write, then the process dies
            real(self, df)
            raise KeyboardInterrupt
        return real(self, df)

    monkeypatch.setattr(ResumableTable, "add", add)
    with pytest.raises(KeyboardInterrupt):
        selectivity_for_run(tiny_run, progress=False)
    assert order == ["class_means", "selectivity", "class_means"]
    sel, cm = tables(tiny_run)
    assert set(steps_of(sel)) <= set(steps_of(cm)) and steps_of(sel) == [0]


# ------------------------------------------------------------------------------------------------
# BatchNorm re-estimation policy
# ------------------------------------------------------------------------------------------------

def test_bn_policy_recorded_announced_once_and_checkpoints_untouched(tiny_run, computed):
    run = Run(tiny_run)
    digests = {c.file: sha256_file(run.ckpt_dir / c.file) for c in run.checkpoints}
    lines: list[str] = []
    sel, _ = selectivity_for_run(tiny_run, progress=False, log=lines.append)
    assert len(lines) == 1 and "BN statistics re-estimated from 8 training batches" in lines[0]
    assert "4 checkpoints before epoch 1" in lines[0] and "--bn-recalibrate 0" in lines[0]
    per_step = sel.groupby("step").agg(epoch=("epoch", "first"), bn=("bn_recalibrated", "first"))
    assert (per_step.loc[per_step["epoch"] < 1, "bn"] == 8).all()  # 16 asked; the tiny split has 8 batches
    assert (per_step.loc[per_step["epoch"] >= 1, "bn"] == 0).all()
    assert {c.file: sha256_file(run.ckpt_dir / c.file) for c in run.checkpoints} == digests
    assert [c.sha256 for c in run.checkpoints] == [digests[c.file] for c in run.checkpoints]

    with pytest.raises(CsnError, match="re-estimated from 8 batches.*asks for 0.*--tag"):
        selectivity_for_run(tiny_run, bn_recalibrate=0, progress=False)
    lines.clear()
    off, _ = selectivity_for_run(tiny_run, bn_recalibrate=0, tag="nobn", progress=False, log=lines.append)
    assert lines == [] and (off["bn_recalibrated"] == 0).all()
    late = sel["step"] >= 8
    np.testing.assert_array_equal(off.loc[late, "csi"].to_numpy(), sel.loc[late, "csi"].to_numpy())
    assert not np.allclose(off.loc[~late, "csi"].to_numpy(), sel.loc[~late, "csi"].to_numpy())
    pd.testing.assert_frame_equal(tables(tiny_run)[0], tables(computed)[0])  # default table untouched

    on, _ = selectivity_for_run(tiny_run, bn_recalibrate=3, tag="bn3", checkpoints="last", progress=False,
                                log=lines.append)
    assert (on["bn_recalibrated"] == 3).all() and "from 3 training batches for 1 checkpoint " in lines[-1]


# ------------------------------------------------------------------------------------------------
# bad input: one sentence, nothing partial
# ------------------------------------------------------------------------------------------------

def _poison(run_dir: Path, step: int, prefix: str) -> None:
    """Write NaN into the conv weights of one block of a checkpoint (manifest sha256 updated: a diverged run)."""
    run = Run(run_dir)
    ckpts = read_manifest(run.ckpt_dir)
    c = next(c for c in ckpts if c.step == step)
    state = run.load_state(c)
    for k, v in state.items():
        if k.startswith(prefix) and "conv" in k and k.endswith("weight"):
            state[k] = torch.full_like(v, float("nan"))
    c.sha256 = save_tensors(run.ckpt_dir / c.file, state)
    write_manifest(run.ckpt_dir, ckpts)


def test_nan_activations_name_layer_and_step_and_leave_no_rows(tiny_run):
    _poison(tiny_run, 12, "layer2.0.")
    with pytest.raises(CsnError) as e:
        selectivity_for_run(tiny_run, progress=False)
    msg = str(e.value)
    assert "'layer2.0'" in msg and "step 12" in msg and "NaN" in msg and "\n" not in msg
    sel, cm = tables(tiny_run)
    assert steps_of(sel) == [0, 1, 2, 4, 8] == steps_of(cm)


def test_labels_out_of_range_leave_no_table(tiny_run, monkeypatch):
    def bad_loader(run, data, split="test", **kw):
        x = torch.randn(8, 1, 8, 8)
        return [(x, torch.tensor([0, 1, 2, 3, 0, 1, 2, 9]))]

    monkeypatch.setattr(base, "eval_loader", bad_loader)
    with pytest.raises(CsnError, match=r"step 0 .*label 9 is out of range for num_classes=4"):
        selectivity_for_run(tiny_run, progress=False)
    assert tables(tiny_run) == (None, None)


def _no_checkpoints(run_dir: Path) -> None:
    write_manifest(Path(run_dir) / "checkpoints", [])


@pytest.mark.parametrize("extra, setup, message", [
    (["--layers", "layer9.*"], None, "matches no module; available names (closest first): layer"),
    (["--checkpoints", "7"], None, "for step 7 write step=7"),
    (["--checkpoints", "e1.x"], None, "'e1.x' is not a point in training"),
    (["--bn-recalibrate", "-1"], None, "--bn-recalibrate must be"),
    ([], _no_checkpoints, "has no checkpoints yet"),
])
def test_cli_errors_one_line_exit_2_no_table(tiny_run, extra, setup, message):
    if setup:
        setup(tiny_run)
    res = CliRunner().invoke(cli, ["selectivity", str(tiny_run), "--quiet"] + extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert not list((Path(tiny_run) / "tables").glob("selectivity*")) and not list(
        (Path(tiny_run) / "tables").glob("class_means*"))


def test_cli_unknown_layer_lists_names_before_any_work(tiny_run):
    res = CliRunner().invoke(cli, ["selectivity", str(tiny_run), "--layers", "layer1.*,lyer2.0", "--quiet"])
    assert res.exit_code == 2 and "'lyer2.0'" in res.output and "layer2.0" in res.output


# ------------------------------------------------------------------------------------------------
# CLI happy path and figures
# ------------------------------------------------------------------------------------------------

def test_cli_two_runs_plot_writes_tables_and_figures(tiny_run, computed, tmp_path):
    second = tmp_path / "seed1"
    shutil.copytree(computed, second)  # already computed: the CLI only plots it
    out = tmp_path / "figs"
    res = CliRunner().invoke(cli, ["selectivity", str(tiny_run), str(second), "--plot", "--quiet", "--out", str(out),
                                   "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "tables/selectivity.parquet (392 rows)" in res.output and "class_means.parquet (1568 rows)" in res.output
    assert "7 computed, 0 already" in res.output and "0 computed, 7 already" in res.output
    assert "mean CSI init" in res.output and "peak" in res.output and "across 2 runs" in res.output
    assert "BN statistics re-estimated" in res.stderr
    for d, names in ((tiny_run / "report", ["stages", "blocks", "distribution"]),
                     (second / "report", ["stages", "blocks", "distribution"]),
                     (out, ["seeds_stages", "seeds_blocks"])):
        for n in names:
            for ext in ("png", "svg"):
                f = d / f"selectivity_{n}.{ext}"
                assert f.is_file() and f.stat().st_size > 1000, f
    pd.testing.assert_frame_equal(tables(tiny_run)[0], tables(computed)[0])

    # a BN-off table beside the default one adds the comparison figure
    res = CliRunner().invoke(cli, ["selectivity", str(tiny_run), "--bn-recalibrate", "0", "--tag", "nobn",
                                   "--checkpoints", "0:1", "--plot", "--quiet", "--linear-epochs"])
    assert res.exit_code == 0, res.output
    assert "selectivity-nobn.parquet (280 rows)" in res.output
    f = tiny_run / "report" / "selectivity-nobn_bn_comparison.png"
    assert f.is_file() and f.stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# summaries and figures from tables alone
# ------------------------------------------------------------------------------------------------

def fake_table(seed: int = 0, steps=(0, 8, 16, 64, 256), dead_units=(0,)) -> pd.DataFrame:
    """A selectivity table without a model: 2 stages (2 blocks of 3 units, 1 block of 4), one dead unit."""
    rng = np.random.default_rng(seed)
    rows = []
    layers = [("s1", "s1.0", 3), ("s1", "s1.1", 3), ("s2", "s2.0", 4)]
    for step in steps:
        for stage, layer, u in layers:
            for unit in range(u):
                dead = layer == "s1.0" and unit in dead_units
                rows.append(dict(step=step, epoch=step / 128, layer=layer, stage=stage, unit=unit,
                                 csi=0.0 if dead else float(rng.uniform(0, 0.3 + step / 512)),
                                 pref_class=-1 if dead else int(rng.integers(0, 4)), mu_max=1.0, mu_rest=0.5,
                                 dead=dead, eta2=0.0 if dead else float(rng.uniform(0, 1)), split="test",
                                 bn_recalibrated=16 if step < 128 else 0, variant="mean", n_images=128))
    return pd.DataFrame(rows).assign(checkpoint_sha256=None)[SELECTIVITY_TABLE_COLUMNS]


def test_summarize_excludes_dead_units_and_gives_se_over_units():
    t = fake_table()
    s = summarize(t)
    assert list(s.columns[:9]) == ["step", "epoch", "stage", "csi_mean", "csi_se", "eta2_mean", "eta2_se", "n_units",
                                   "n_dead"]
    assert len(s) == 5 * 2 and s["stage"].tolist()[:2] == ["s1", "s2"]
    row = s[(s["step"] == 8) & (s["stage"] == "s1")].iloc[0]
    live = t[(t["step"] == 8) & (t["stage"] == "s1") & ~t["dead"]]
    assert row["n_units"] == 6 and row["n_dead"] == 1
    assert row["csi_mean"] == pytest.approx(live["csi"].mean())
    assert row["csi_se"] == pytest.approx(live["csi"].std(ddof=1) / np.sqrt(5))
    assert row["eta2_se"] == pytest.approx(live["eta2"].std(ddof=1) / np.sqrt(5))
    assert row["bn_recalibrated"] == 16 and s[s["step"] == 256]["bn_recalibrated"].eq(0).all()
    by_layer = summarize(t, by="layer")
    assert len(by_layer) == 5 * 3 and by_layer.loc[0, "layer"] == "s1.0" and by_layer.loc[0, "n_dead"] == 1


def test_summarize_runs_mean_and_se_over_seeds_at_matched_steps():
    a, b, c = fake_table(0), fake_table(1), fake_table(2, steps=(0, 8, 16))
    s = summarize_runs({"a": a, "b": b, "c": c})
    assert sorted(s["step"].unique()) == [0, 8, 16] and (s["n_runs"] == 3).all()
    per = [summarize(t).set_index(["step", "stage"]).loc[(8, "s2"), "csi_mean"] for t in (a, b, c)]
    row = s[(s["step"] == 8) & (s["stage"] == "s2")].iloc[0]
    assert row["csi_mean"] == pytest.approx(np.mean(per))
    assert row["csi_se"] == pytest.approx(np.std(per, ddof=1) / np.sqrt(3))
    allsteps = summarize_runs([summarize(a), summarize(c)], matched=False)
    assert set(allsteps.loc[allsteps["step"] == 256, "n_runs"]) == {1}
    with pytest.raises(CsnError, match="share no checkpoint step"):
        summarize_runs([fake_table(0, steps=(0,)), fake_table(0, steps=(8,))])


def test_figures_from_tables_alone(tmp_path):
    from csn.report import fig_selectivity as fs

    t = fake_table()
    off = t.assign(bn_recalibrated=0, csi=t["csi"] * 0.8)
    figs = [
        fs.stage_curves(summarize(t), tmp_path, title="fake"),
        fs.stage_curves(summarize_runs({"a": t, "b": fake_table(1)}), tmp_path, name="seeds", log_epochs=False),
        fs.block_curves(summarize(t, by="layer"), tmp_path),
        fs.csi_distribution(t, tmp_path),
        fs.csi_distribution(t, tmp_path, steps=[0, 256], name="dist2"),
        fs.bn_comparison(summarize(t), summarize(off), tmp_path),
    ]
    for f in figs:
        assert f.png.stat().st_size > 1000 and f.svg.stat().st_size > 1000
        assert f.caption.endswith(".") and f.caption.count(". ") == 0 and len(f.caption) > 40
    assert "over 2 seeds" in figs[1].caption and "over units" in figs[0].caption
    live = t[(t["stage"] == "s1") & ~t["dead"]]
    peak = int(live.groupby("step")["csi"].mean().idxmax())
    roles = fs.default_distribution_steps(t, "s1")
    assert roles[0].startswith("init") and roles[256].endswith("last") and "peak" in roles[peak]
    with pytest.raises(CsnError, match="step 5 is not in the selectivity table"):
        fs.csi_distribution(t, tmp_path, steps=[5])
