"""`csn experiment windows` end to end on the smoke preset: the plan, the runs (one resumed from an interrupted
start), selectivity where it is needed, the paired tables checked against the runs' own files, resume, refusal
of a changed experiment, one-line errors, and the report section (and its link from another experiment)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from csn.cli import main as cli
from csn.errors import CsnError
from csn.experiments import window_stats as ws
from csn.experiments.claims import Spread
from csn.experiments.windows import WindowsOptions, make_plan, parse_seeds
from csn.report.html import build_report
from csn.runs.run import Run
from csn.training.loop import train

ARGS = ["experiment", "windows", "--preset", "smoke", "--parallel", "1", "--quiet"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("windows") / "map"
    # an interrupted start: the baseline of seed 0 stopped after 5 of its 16 steps
    plan = make_plan(WindowsOptions(preset="smoke", out=str(out)))
    _cond, _seed, job = plan.jobs()[0]
    train(job.cfg, job.out, progress=False, stop_after_step=5)
    res = CliRunner().invoke(cli, ARGS + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.stdout, res.stderr


def test_plan_is_printed_first_with_an_estimate(experiment):
    _, stdout, stderr = experiment
    assert "6 conditions x 2 seeds (0, 1) = 12 runs, 12 to train" in stderr
    assert "estimated time: about" in stderr and "declared for preset smoke" in stderr
    assert "lr 0.05 constant" in stderr and "alpha per stage (reg_reduce=sum)" in stderr
    for name in ("baseline", "a-3_step0-step4", "a-3_step4-step8", "a-3_step8-step12", "a-3_step12-step16",
                 "a+3_step0-step4_layer3"):  # tile:4 and its first tile
        assert name in stderr
    assert "paired harm in points" in stdout and "early windows harm more than late ones" in stdout
    assert "rule (alpha < 0)" in stdout and "rule (alpha > 0)" in stdout


def test_every_run_trained_with_its_window_and_the_shared_seeds(experiment):
    out, _, _ = experiment
    runs = {p.name: Run(p) for p in out.iterdir() if (p / "run.json").is_file()}
    assert len(runs) == 12 and all(r.checkpoints[-1].step == 16 for r in runs.values())  # the interrupted one resumed
    assert all(r.config.reg_reduce == "sum" and r.config.lr_schedule == "constant" for r in runs.values())
    reg = runs["a-3_step4-step8-s1"]
    assert reg.config.reg_window == "step=4:step=8" and reg.config.reg_alpha == -3
    assert [w.to_dict() for w in reg.reg_windows] == [{"start_step": 4, "end_step": 8, "alpha": -3.0}]
    assert runs["a+3_step0-step4_layer3-s0"].config.reg_layers == ["layer3.0"]
    # the baseline has a checkpoint at every window boundary; a condition at its own
    assert {0, 4, 8, 12, 16} <= {c.step for c in runs["baseline-s0"].checkpoints}
    # same seed, same weights up to the window's start (bitwise), different after it
    base = {c.step: c.sha256 for c in runs["baseline-s1"].checkpoints}
    own = {c.step: c.sha256 for c in reg.checkpoints}
    assert own[0] == base[0] and own[4] == base[4] and own[8] != base[8]


def _live_mean(sel: pd.DataFrame, step: int, stages: list[str], col: str) -> float:
    d = sel[(sel["step"] == step) & sel["stage"].isin(stages) & ~sel["dead"]]
    return float(d[col].mean())


def test_tables_match_the_runs_own_files(experiment):
    out, _, _ = experiment
    per_seed = pd.read_parquet(out / "windows_runs.parquet")
    assert len(per_seed) == 12
    for r in per_seed.itertuples():
        run, base = Run(r.run), Run(out / f"baseline-s{r.seed}")
        final, base_final = run.checkpoints[-1].metrics["test_acc"], base.checkpoints[-1].metrics["test_acc"]
        assert r.final_test_acc_eval == final and r.harm_eval == pytest.approx(base_final - final, abs=1e-15)
        acc, base_acc = run.read("accuracy").set_index("step"), base.read("accuracy").set_index("step")
        assert r.final_test_acc == acc.loc[16, "acc"] and r.base_final_test_acc == base_acc.loc[16, "acc"]
        assert r.harm == pytest.approx(base_acc.loc[16, "acc"] - acc.loc[16, "acc"], abs=1e-15)  # BN re-estimated
        assert (acc["n_images"] == 256).all() and (acc["bn_recalibrated"] == 8).all()
        if r.alpha == 0:
            continue
        st = r.stages.split("+")
        sel, base_sel = run.read("selectivity"), base.read("selectivity")
        assert sorted(sel["step"].unique()) == sorted({r.end_step, 16})  # only where it is needed
        assert set(sel["stage"]) == set(st)  # only the regularized stages
        assert r.csi_end == pytest.approx(_live_mean(sel, r.end_step, st, "csi"), rel=1e-12)
        assert r.base_csi_end == pytest.approx(_live_mean(base_sel, r.end_step, st, "csi"), rel=1e-12)
        assert r.csi_reduction_end == pytest.approx(1 - r.csi_end / r.base_csi_end, rel=1e-12)
        ck = {c.step: c.metrics["test_acc"] for c in run.checkpoints}
        bk = {c.step: c.metrics["test_acc"] for c in base.checkpoints}
        assert r.early_gap_eval == pytest.approx(ck[r.end_step] - bk[r.end_step], abs=1e-15)  # the raw eval-mode gap
        assert sorted(acc.index) == sorted({r.end_step, 16})  # at the window's end and the end of training only
        assert r.end_test_acc == acc.loc[r.end_step, "acc"] and r.base_end_test_acc == base_acc.loc[r.end_step, "acc"]
        assert r.early_gap == pytest.approx(r.end_test_acc - r.base_end_test_acc, abs=1e-15)
        assert r.end_bn_batches == 8 and r.end_test_images == 256  # 16 asked, the smoke split has 8 batches
        assert r.reg_steps == r.end_step - r.start_step and r.reg_mean_abs_alpha == abs(r.alpha)
        assert r.reg_mean_lr == pytest.approx(0.05)  # constant learning rate
    base_sel = Run(out / "baseline-s0").read("selectivity")
    assert sorted(base_sel["step"].unique()) == [0, 4, 8, 12, 16] and set(base_sel["stage"]) == {"layer1", "layer2", "layer3"}
    assert sorted(Run(out / "baseline-s0").read("accuracy")["step"]) == [4, 8, 12, 16]  # every window's end


def test_condition_table_and_verdicts(experiment):
    out, _, _ = experiment
    per_seed = pd.read_parquet(out / "windows_runs.parquet")
    table = pd.read_parquet(out / "windows.parquet").set_index("condition")
    for name, g in per_seed[per_seed["alpha"] != 0].groupby("condition"):
        p = ws.paired(g["final_test_acc"].to_numpy(), g["base_final_test_acc"].to_numpy())
        assert table.loc[name, "harm_mean"] == pytest.approx(p["harm_mean"], abs=1e-15)
        assert table.loc[name, "harm_se_paired"] == pytest.approx(p["harm_se_paired"], abs=1e-15)
        assert table.loc[name, "harm_lo"] <= table.loc[name, "harm_mean"] <= table.loc[name, "harm_hi"]
    v = pd.read_parquet(out / "windows_verdicts.parquet")
    assert sorted(set(zip(v["alpha"], v["stage_set"]))) == [(-3.0, "default"), (3.0, "layer3")]
    assert sorted(v["question"]) == sorted([ws.Q_EARLIEST, ws.Q_MORE, ws.Q_LITTLE, ws.Q_PROMOTE_FINAL, ws.Q_PROMOTE_END])
    assert (v["verdict"] == ws.INCONCLUSIVE).all() and v["observed"].str.contains("fewer than 3").all()  # 2 seeds
    assert (v[v["kind"] == "suppress"]["n_windows"] == 4).all() and (v["rules_version"] == ws.RULES_VERSION).all()
    for col in ("reg_steps_mean", "reg_mean_lr_mean", "reg_mean_abs_alpha_mean", "csi_reduction_end_mean",
                "eta2_reduction_end_mean", "early_gap_eval_mean"):
        assert col in table.columns


def test_rerun_resumes_without_training_and_changed_windows_are_refused(experiment):
    out, _, _ = experiment
    before = {p.name: (p / "checkpoints" / "manifest.jsonl").read_text() for p in out.iterdir() if (p / "run.json").is_file()}
    table = pd.read_parquet(out / "windows.parquet")
    res = CliRunner().invoke(cli, ARGS + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "12 runs, 0 to train" in res.stderr and "median of 12 finished runs here" in res.stderr
    assert {p.name: (p / "checkpoints" / "manifest.jsonl").read_text() for p in out.iterdir()
            if (p / "run.json").is_file()} == before
    pd.testing.assert_frame_equal(pd.read_parquet(out / "windows.parquet"), table)
    res = CliRunner().invoke(cli, ARGS + ["--out", str(out), "--windows", "step=3:step=5"])  # new checkpoints
    assert res.exit_code == 2 and res.output.count("error:") == 1
    error = next(line for line in res.output.splitlines() if line.startswith("error:"))
    assert "baseline-s0 was trained with checkpoints" in error and "use another --out" in error


@pytest.mark.parametrize("args, message", [
    (["--alphas", "0"], "alpha 0 regularizes nothing"),
    (["--alphas", "-1", "--windows", "step=0:step=99"], "ends after the end of training"),
    (["--windows", "0.01:0.02"], "covers no optimizer step"),
    (["--windows", "2:end"], "starts at or after the end of training"),
    (["--stages", "layer9"], "unknown stage 'layer9'"),
    (["--seeds", "0,0"], "repeat a seed"),
    (["--preset", "smok"], "closest: 'smoke'"),
    (["--windows", "step=0:step=4,step=0:step=4"], "are the same"),
    (["--windows", "tile:99"], "asks for 99 tiles of a training of 16 steps"),
    (["--windows", "tile:4,tile:4:0"], "are the same"),
    (["reg_reduce=mean"], "is not the map's: preset smoke gives alpha"),
    (["epochs=x"], "epochs"),
])
def test_bad_requests_are_one_line_errors_before_any_work(tmp_path, args, message):
    res = CliRunner().invoke(cli, ARGS + ["--out", str(tmp_path / "x")] + args)
    assert res.exit_code == 2, res.output
    assert message in res.output and res.output.count("error:") == 1
    assert not (tmp_path / "x").exists()


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
    res = CliRunner().invoke(cli, ARGS + ["--out", str(tmp_path / "d"), "--dry-run", "--alphas", "-2,2",
                                          "--windows", "step=0:step=8,f0.5:end", "--stages", "default,each", "--seeds", "3"])
    assert res.exit_code == 0, res.output
    # 2 alphas x 2 windows x (default + 3 stages) = 16 conditions + the baseline, 3 seeds
    assert "17 conditions x 3 seeds (0, 1, 2) = 51 runs, 51 to train" in res.stderr
    assert "a+2_f0.5-end_layer2" in res.stderr and "[8, 16)" in res.stderr
    assert not (tmp_path / "d").exists()


def test_report_section_and_its_link_from_another_experiment(experiment, tmp_path):
    out, _, _ = experiment
    html = (out / "report" / "index.html").read_text()
    assert ">How early is early: the critical-period map</" in html
    assert "Suppressing selectivity: regularization onsets" not in html  # the windows are shown in their own section
    for fig in ("windows_heatmap", "windows_harm", "windows_csi", "windows_eta2", "windows_accuracy_gap"):
        assert f"{fig}.png" in html and (out / "report" / f"{fig}.png").stat().st_size > 1000
    assert ws.suppression_rule().split(";")[0] in html and "paired SE" in html and "unpaired SE" in html
    # another experiment beside the map (e.g. a reproduction) links it
    other = out.parent / "repro"
    shutil.copytree(out / "baseline-s0", other / "baseline-s0")
    page = build_report([other], progress=False)
    text = page.read_text()
    assert ">How early is early: the critical-period map</" in text and 'href="../../map/report/index.html"' in text
    assert "early windows harm more than late ones" in text
    # without any map: a one-line note naming the command
    lone = tmp_path / "lone"
    shutil.copytree(out / "baseline-s0", lone / "baseline-s0")
    assert "no critical-period map: run <code>csn experiment windows --preset fmnist</code>" in \
        build_report([lone], progress=False).read_text()


def test_figures_draw_from_frames_alone(experiment, tmp_path):
    from csn.experiments.windows import gap_curves, trajectories
    from csn.report.fig_windows import windows_figures

    out, _, _ = experiment
    table = pd.read_parquet(out / "windows.parquet")
    curves = trajectories(pd.read_parquet(out / "windows_selectivity.parquet"), table)
    gaps = gap_curves(pd.read_parquet(out / "windows_accuracy.parquet"))
    # the condition's curve starts at the baseline's value at its window's start
    c = curves[(curves["condition"] == "a-3_step4-step8") & (curves["metric"] == "csi")]
    own, base = c[c["curve"] == "condition"].set_index("step"), c[c["curve"] == "baseline"].set_index("step")
    assert own.loc[4, "mean"] == base.loc[4, "mean"] and list(own.index) == [4, 8, 16]
    assert np.isfinite(gaps["mean"]).all() and set(gaps["condition"]) == set(table["condition"]) - {"baseline"}
    figs = windows_figures(table, curves, gaps, tmp_path / "figs")
    assert len(figs) == 5 and all(f.png.stat().st_size > 1000 for f in figs)


def test_a_damaged_map_is_named_not_shown(experiment, tmp_path):
    from csn.errors import CsnError
    from csn.experiments.windows import read_map

    out, _, _ = experiment
    copy = tmp_path / "map"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("*.safetensors", "report"))
    (copy / "windows_verdicts.parquet").write_bytes(b"not parquet")
    with pytest.raises(CsnError, match="windows_verdicts.parquet"):
        read_map(copy)
    pd.read_parquet(out / "windows.parquet").drop(columns="harm_mean").to_parquet(copy / "windows.parquet")
    with pytest.raises(CsnError, match=r"lacks columns \['harm_mean'\]"):
        read_map(copy)
    html = build_report([copy], progress=False).read_text()
    assert "the map&#39;s tables cannot be shown" in html and "run the same" in html


def test_a_shortened_training_preset_drops_its_late_checkpoints_with_a_note(tmp_path):
    """As `csn train` does: the preset's checkpoints past the end of a shortened training are dropped (a note), and
    each condition's schedule is written as the remaining steps; the estimate scales with the training length."""
    res = CliRunner().invoke(cli, ["experiment", "windows", "--preset", "smoke", "--windows", "step=0:step=2",
                                   "--alphas", "-3", "--stages", "default", "--dry-run", "--out", str(tmp_path / "m"),
                                   "epochs=0.5"])
    assert res.exit_code == 0, res.output
    assert "of the preset's schedule reaches past the end of training" in res.stderr
    assert "2 conditions x 2 seeds" in res.stderr and "x 2 s per run" in res.stderr  # 6 s declared for 2 epochs
    plan = make_plan(WindowsOptions(preset="smoke", windows="step=0:step=2", alphas=[-3.0], stages=["default"]),
                     ["epochs=0.5"])
    assert plan.checkpoints(plan.conditions[1]).startswith("step=0,")
    assert max(plan.base_steps) == plan.total


@pytest.mark.parametrize("seeds, message", [("100000", "more than 100"), ("0,99999999999999999999", "out of [0, 2**63)"),
                                            ("0,0", "repeat a seed"), ("x", "not a count")])
def test_seeds_are_bounded_before_anything_is_planned(seeds, message):
    with pytest.raises(CsnError, match=re.escape(message)):
        parse_seeds(seeds)


def test_a_list_of_seeds_is_a_list_even_of_one():
    """[3] is seed 3 (a preset file's `seeds = [3]`), '3' and 3 are a count: seeds 0, 1, 2."""
    assert parse_seeds([3]) == [3] and parse_seeds([0]) == [0] and parse_seeds("3") == parse_seeds(3) == [0, 1, 2]


def test_windows_json_and_tables_record_the_design(experiment):
    """The map of the whole smoke preset (the earlier separate map of its suppression family trained the same runs)."""
    smoke_map = experiment[0]
    info = json.loads((smoke_map / "windows.json").read_text())
    assert info["reg_reduce"] == "sum" and info["lr_schedule"] == "constant" and info["end_bn_batches"] == 16
    assert "alpha_per_stage" in info["design"] and info["run_sd"] == Spread().c4_run_sd
    assert [c["start_fraction"] for c in info["conditions"] if c["alpha"] < 0] == [0, 0.25, 0.5, 0.75]
    table = pd.read_parquet(smoke_map / "windows.parquet")
    reg = table[table["alpha"] < 0].sort_values("start_step")
    assert (reg["reg_steps_mean"] == 4).all() and np.allclose(reg["reg_mean_lr_mean"], 0.05)
    assert np.allclose(reg["reg_mean_abs_alpha_mean"], 3.0) and reg["csi_reduction_end_mean"].notna().all()
