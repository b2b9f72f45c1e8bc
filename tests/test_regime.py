"""`csn experiment regime`: the grid and its names, the paired cell table against a hand computation, the per-image
sparsity against a naive float64 reference, the command end to end on synthetic data (tables, report section,
resume without retraining, --dry-run writes nothing, the pilot), and `csn experiment regularize` unchanged."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.analysis.base import run_analysis
from csn.analysis.sparsity import SPARSITY_SEED, Sparsity, group_csi_sum, image_sparsity, summarize_sparsity
from csn.cli import main as cli
from csn.core.trace import TraceDict
from csn.core.units import resolve_layers
from csn.data import BatchLoader
from csn.experiments import claims, runner
from csn.experiments import regime as rg
from csn.experiments.conditions import onset_condition
from csn.experiments.regularize import conditions
from csn.report.html import build_report
from csn.runs.config import preset
from csn.runs.io import read_table
from csn.runs.run import Run

ARGS = ["experiment", "regime", "--preset", "smoke", "--seeds", "2", "--parallel", "1", "--quiet", "epochs=0.5"]


# ------------------------------------------------------------------------------------------------
# the grid
# ------------------------------------------------------------------------------------------------

def test_grid_names_and_configs():
    plan = rg.make_plan(rg.RegimeOptions(preset="fmnist"))
    names = [c.name for c in plan.conditions]
    assert names == ["fmnist-baseline", "fmnist-csn-from0", "fmnist-csn-late", "fmnist-study-from0", "fmnist-study-late",
                     "pairs-baseline", "pairs-csn-from0", "pairs-csn-late", "pairs-study-from0", "pairs-study-late"]
    assert plan.seeds == [0, 1, 2, 3, 4] and len(plan.jobs()) == 50
    assert plan.base.epochs == 2 and plan.base.lr_schedule == "constant" and plan.base.model == "resnet8"
    assert plan.late_onset == 0.5
    by = {c.name: c for c in plan.conditions}
    cfg = by["pairs-study-late"].apply(plan.base, 3)
    assert (cfg.name, cfg.seed, cfg.dataset, cfg.reg_mode, cfg.reg_window) == ("pairs-study-late-s3", 3, "fmnist-pairs",
                                                                                "study", "0.5:end")
    assert cfg.reg_resolved["statistic"] == "sums" and cfg.reg_resolved["group"] == 32
    cfg = by["fmnist-csn-from0"].apply(plan.base, 0)
    assert (cfg.dataset, cfg.reg_window, cfg.reg_resolved["statistic"], cfg.reg_resolved["group"]) == \
        ("fashion-mnist", "0:end", "means", "batch")
    base = by["fmnist-baseline"].apply(plan.base, 0)
    assert base.reg_alpha is None and base.dataset == "fashion-mnist"
    # the baseline is shared by both regularizers of a dataset; every cell names its three conditions
    assert [(c.dataset, c.regularizer) for c in plan.cells] == [("fmnist", "csn"), ("fmnist", "study"),
                                                                ("pairs", "csn"), ("pairs", "study")]
    assert {c.name("baseline") for c in plan.cells if c.dataset == "pairs"} == {"pairs-baseline"}
    assert plan.dataset_of(by["pairs-csn-late"]) == "pairs"
    # same alpha within a cell; alphas of the preset (fixed by the pilot) are negative
    assert all(by[c.name("from0")].alpha == by[c.name("late")].alpha == c.alpha < 0 for c in plan.cells)
    assert by["pairs-study-late"].record()["overrides"] == {"dataset": "fmnist-pairs", "reg_mode": "study"}


def test_condition_extension_keeps_regularize():
    """Condition without label or overrides names and configures runs exactly as before."""
    base = preset("smoke")
    conds = conditions(-2.0, [0.0, 1.0])
    assert [c.name for c in conds] == ["baseline", "reg-from-0", "reg-from-1"]
    cfg = conds[2].apply(base, 1)
    assert (cfg.name, cfg.seed, cfg.reg_alpha, cfg.reg_window, cfg.dataset) == ("reg-from-1-s1", 1, -2.0, "1:end", "synthetic")
    assert conds[0].apply(base, 0).reg_alpha is None
    labeled = onset_condition(1.0, -2.0, label="mine", overrides=(("reg_mode", "study"),))
    assert labeled.name == "mine" and labeled.apply(base, 0).reg_mode == "study"
    assert labeled.record() == {"name": "mine", "onset": 1.0, "alpha": -2.0, "overrides": {"reg_mode": "study"}}


def test_bad_preset_alpha_and_regularizer_overrides():
    pre = rg.get_regime_preset("smoke")
    bad = pre.replace(alphas={"csn": {"few": 0.0, "many": -1.0}, "study": {"few": -1.0, "many": -1.0}})
    with pytest.raises(rg.CsnError, match="negative alpha"):
        rg.grid(bad, 1.0)
    with pytest.raises(rg.CsnError, match="already has a regularizer"):
        rg.make_plan(rg.RegimeOptions(preset="smoke"), ["reg_alpha=-1"])
    with pytest.raises(rg.CsnError, match="regime preset"):
        rg.make_plan(rg.RegimeOptions(preset="nope"))


# ------------------------------------------------------------------------------------------------
# the cell table against a hand computation
# ------------------------------------------------------------------------------------------------

def _per_seed() -> pd.DataFrame:
    acc = {"baseline": [0.90, 0.91, 0.92], "from0": [0.88, 0.885, 0.90], "late": [0.899, 0.905, 0.921]}
    rows = []
    for role, vals in acc.items():
        name = "d-baseline" if role == "baseline" else f"d-study-{role}"
        for seed, a in enumerate(vals):
            reg = role != "baseline"
            rows.append({"condition": name, "onset": {"baseline": None, "from0": 0.0, "late": 0.5}[role],
                         "alpha": -20.0 if reg else 0.0, "seed": seed, "final_test_acc": a,
                         "final_test_acc_eval": a - (0.05 if reg else 0.0),
                         "reg_steps": {"baseline": 0, "from0": 100, "late": 75}[role],
                         "reg_mean_lr": 0.1 if reg else math.nan,
                         "final_csi": {"baseline": 0.4, "from0": 0.3, "late": 0.35}[role] + 0.01 * seed,
                         "final_eta2": {"baseline": 0.5, "from0": 0.25, "late": 0.4}[role],
                         "final_sparsity": {"baseline": 0.6, "from0": 0.3, "late": 0.45}[role],
                         "final_group_csi": {"baseline": 0.5, "from0": 0.1, "late": 0.2}[role],
                         "final_group_csi_excess": {"baseline": 0.3, "from0": 0.06, "late": 0.12}[role],
                         "final_batch_csi": 0.2})
    rows.append(dict(rows[0], condition="other-baseline"))  # another cell's rows are ignored
    return pd.DataFrame(rows)


def test_cell_row_against_hand_computation():
    row = rg.cell_row(rg.Cell("d", "study", -20.0), _per_seed())
    t975_df2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom (printed tables: 4.303)
    b, f, lt = np.array([0.90, 0.91, 0.92]), np.array([0.88, 0.885, 0.90]), np.array([0.899, 0.905, 0.921])
    for key, diff in (("early_harm", b - f), ("contrast", lt - f), ("late_harm", b - lt)):
        mean = sum(diff) / 3
        sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 2)
        assert row[f"{key}_mean"] == pytest.approx(mean, abs=1e-12)
        assert row[f"{key}_lo"] == pytest.approx(mean - t975_df2 * sd / math.sqrt(3), abs=1e-9)
        assert row[f"{key}_hi"] == pytest.approx(mean + t975_df2 * sd / math.sqrt(3), abs=1e-9)
    # early harm 0.0217 [0.0155, 0.0278] >= 0.0025: reproduced; contrast 0.0200 [0.0121, 0.0279] and late harm
    # 0.0017 [-0.0027, 0.0060]: its interval is not below 0.005, so the late part is inconclusive
    assert (row["early_verdict"], row["late_verdict"], row["verdict"]) == ("reproduced", "inconclusive", "inconclusive")
    assert row["verdict"] == claims.CLAIM_WORDS[int(claims.c4_parts(b, f, lt)["codes"])]
    assert row["seeds"] == "0,1,2" and row["n_seeds"] == 3
    assert row["acc_baseline"] == pytest.approx(0.91) and row["acc_from0"] == pytest.approx(0.8883333333)
    assert (row["from0_reg_steps"], row["late_reg_steps"]) == (100, 75) and row["from0_reg_mean_lr"] == pytest.approx(0.1)
    assert row["from0_csi_reduction"] == pytest.approx(1 - 0.31 / 0.41)
    assert row["from0_eta2_reduction"] == pytest.approx(0.5)
    assert row["late_sparsity_reduction"] == pytest.approx(0.25)
    assert row["own_measure"] == "group_csi_excess" and row["own_reduction_from0"] == pytest.approx(0.8)
    assert row["from0_group_csi_reduction"] == pytest.approx(0.8)
    assert row["from0_batch_csi_reduction"] == pytest.approx(0.0)
    # the checkpoints' eval-mode accuracy is described beside, not judged
    assert row["acc_from0_eval"] == pytest.approx(row["acc_from0"] - 0.05)
    assert row["early_harm_eval_mean"] == pytest.approx(row["early_harm_mean"] + 0.05)


def test_cell_row_pairs_only_common_seeds():
    df = _per_seed()
    df = df[~((df["condition"] == "d-study-late") & (df["seed"] == 2))]
    row = rg.cell_row(rg.Cell("d", "study", -20.0), df)
    assert row["seeds"] == "0,1" and row["early_harm_mean"] == pytest.approx((0.02 + 0.025) / 2)


# ------------------------------------------------------------------------------------------------
# per-image sparsity against a naive float64 reference
# ------------------------------------------------------------------------------------------------

def _naive_floor(labels: np.ndarray, group: int) -> float:
    """The study's class-sums CSI of a unit that responds 1 to every image: from the class counts of each group."""
    vals = []
    for g0 in range(0, len(labels), group):
        counts = [int(c) for c in np.bincount(labels[g0:g0 + group]) if c > 0]
        if len(counts) >= 2:
            top = max(counts)
            rest = (sum(counts) - top) / (len(counts) - 1)
            vals.append((top - rest) / (top + rest + 1e-6))
    return sum(vals) / len(vals)


def _naive(acts: np.ndarray, labels: np.ndarray, group: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Loops over groups and units: sparsity (every image its own class), the study's class-sums CSI, csn's
    class-means CSI (one group = `group` images here)."""
    n, u = acts.shape
    sp, cs, cm, n_sp, n_c = np.zeros(u), np.zeros(u), np.zeros(u), 0, 0
    for g0 in range(0, n, group):
        a, y = acts[g0:g0 + group].astype(np.float64), labels[g0:g0 + group]
        if len(a) >= 2:
            n_sp += 1
            for j in range(u):
                m = max(a[:, j])
                rest = (sum(a[:, j]) - m) / (len(a) - 1)
                sp[j] += (m - rest) / (m + rest + 1e-6)
        present = sorted(set(y.tolist()))
        if len(present) >= 2:
            n_c += 1
            for j in range(u):
                sums = [sum(a[y == c, j]) for c in present]
                means = [s / sum(y == c) for s, c in zip(sums, present)]
                for vals, out, eps in ((sums, cs, 1e-6), (means, cm, 1e-7)):
                    top = max(vals)
                    i = vals.index(top)
                    rest = sum(v for t, v in enumerate(vals) if t != i) / (len(vals) - 1)
                    out[j] += (top - rest) / (top + rest + eps)
    return sp / n_sp, cs / n_c, cm / n_c


def test_image_sparsity_and_group_csi_match_naive_reference():
    rng = np.random.default_rng(0)
    acts = np.maximum(rng.normal(size=(77, 6)), 0)  # 3 groups of 32, 32, 13
    acts[:, 5] = 0.0  # a dead unit
    acts[40:64, 4] = 0.0  # zero on a whole group
    labels = rng.integers(0, 5, size=77)
    labels[64:] = 2  # the last group holds one class: no CSI there
    sp, cs, cm = _naive(acts, labels, 32, 5)
    t, y = torch.tensor(acts, dtype=torch.float32), torch.tensor(labels)
    s, n = image_sparsity(t, 32)
    assert int(n) == 3 and np.allclose(s.numpy() / 3, sp, atol=1e-6)
    c, k = group_csi_sum(t, y, 5, 32, class_sums=True)
    assert int(k) == 2 and np.allclose(c.numpy() / 2, cs, atol=1e-6)
    c, k = group_csi_sum(t, y, 5, 32, class_sums=False)
    assert np.allclose(c.numpy() / 2, cm, atol=1e-6)
    assert s[5] == 0 and c[5] == 0
    floor, k = group_csi_sum(torch.ones(77, 1), y, 5, 32, class_sums=True)
    assert float(floor[0]) / int(k) == pytest.approx(_naive_floor(labels, 32), abs=1e-9)


def test_sparsity_analysis_against_naive_reference(tiny_run):
    res = run_analysis(tiny_run, Sparsity(), checkpoints="last", progress=False)
    rows = res.rows
    run = Run(tiny_run)
    batch = run.config.batch_size  # 32: batch_csi in groups of the training batch
    assert set(rows["group"]) == {32} and set(rows["batch"]) == {batch} and set(rows["n_images"]) == {128}
    model = run.load_model(run.checkpoints[-1]).eval()
    layers = resolve_layers(model, None)
    data = run.dataset()
    acts, labels = {n: [] for n in layers}, []
    with torch.no_grad(), TraceDict(model, layers) as cache:
        for x, y in BatchLoader(data.test, 64, shuffle=True, seed=SPARSITY_SEED):  # the analysis's order
            model(x)
            for n in layers:
                acts[n].append(cache[n].numpy())
            labels.append(y.numpy())
    y = np.concatenate(labels)
    for n in layers:
        a = np.concatenate(acts[n])
        sp, cs, _ = _naive(a, y, 32, 4)
        _, _, cm = _naive(a, y, batch, 4)
        got = rows[rows["layer"] == n].sort_values("unit")
        dead = ~(a != 0).any(0)
        assert np.array_equal(got["dead"].to_numpy(), dead)
        assert np.allclose(got["sparsity"], np.where(dead, 0, sp), atol=1e-5)
        assert np.allclose(got["group_csi"], np.where(dead, 0, cs), atol=1e-5)
        assert np.allclose(got["batch_csi"], np.where(dead, 0, cm), atol=1e-5)
        assert np.allclose(got["group_csi_floor"], _naive_floor(y, 32), atol=1e-9)
    # resumable: a second call computes nothing; the summary averages live units
    assert run_analysis(tiny_run, Sparsity(), checkpoints="last", progress=False).computed == []
    summ = summarize_sparsity(rows)
    assert set(summ.columns) >= {"sparsity_mean", "group_csi_mean", "batch_csi_mean", "n_units", "n_dead"}


# ------------------------------------------------------------------------------------------------
# the command end to end (smoke preset, synthetic 4 vs 16 classes)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("regime") / "study"
    res = CliRunner().invoke(cli, ARGS + ["--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_end_to_end_tables_and_report(study):
    out, output = study
    runs = read_table(out / "regime_runs.parquet")
    assert len(runs) == 20 and sorted(set(runs["role"])) == ["baseline", "from0", "late"]
    assert set(runs["reg_statistic"][runs["regularizer"] == "study"]) == {"sums"}
    assert set(runs["reg_group"][runs["regularizer"] == "study"]) == {"32"}
    assert set(runs["reg_group"][runs["regularizer"] == "csn"]) == {"batch"}
    for r in runs.itertuples():  # the per-seed table is the runs' own files
        run = Run(r.run)
        assert r.final_test_acc_eval == run.checkpoints[-1].metrics["test_acc"]  # eval mode, the checkpoint's BN
        acc = run.read("accuracy")  # C4's accuracy: BatchNorm statistics re-estimated (rule set 2 as amended)
        assert r.final_test_acc == acc["acc"].iloc[-1] and set(acc["bn_recalibrated"]) == {4}  # 4 batches in smoke
        for table in ("selectivity", "sparsity"):
            assert set(run.read(table)["bn_recalibrated"]) == {4}
    cells = read_table(out / "regime.parquet")
    assert [(r.dataset, r.regularizer) for r in cells.itertuples()] == [("few", "csn"), ("few", "study"),
                                                                        ("many", "csn"), ("many", "study")]
    assert set(cells["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}
    for cell in rg.grid(rg.get_regime_preset("smoke"), 0.5)[1]:  # the table is cell_row of the written runs table
        got = cells[(cells["dataset"] == cell.dataset) & (cells["regularizer"] == cell.regularizer)].iloc[0]
        want = rg.cell_row(cell, runs)
        assert got["early_harm_mean"] == pytest.approx(want["early_harm_mean"], nan_ok=True)
        assert got["verdict"] == want["verdict"]
    info = json.loads((out / "regime.json").read_text())
    assert info["rules_version"] == claims.RULES_VERSION and info["seeds"] == [0, 1]
    assert len(info["conditions"]) == 10 and info["conditions"][3]["overrides"]["reg_mode"] == "study"
    page = (out / "report" / "index.html").read_text()
    assert 'id="regime"' in page and "Which regularizer, which regime" in page and "regime_harm.png" in page
    assert "early harm" in output and "regime.json" in output


def test_resume_retrains_nothing(study, monkeypatch):
    """The same study again: every run is found finished (nothing trains), the analyses are found done, and the
    tables come out the same (the report, drawn by the command, is left out here: it is the slow part)."""
    out, _ = study
    before = read_table(out / "regime.parquet")

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runner, "_train_job", refuse)
    plan = rg.make_plan(rg.RegimeOptions(preset="smoke", seeds=2, parallel=1, out=str(out)), ["epochs=0.5"])
    assert "0 to train" in rg.plan_text(plan)
    tables = rg.run_regime(plan, progress=False)
    pd.testing.assert_frame_equal(before, tables["regime"])
    pd.testing.assert_frame_equal(before, read_table(out / "regime.parquet"))


def test_changed_study_is_refused(study):
    out, _ = study
    res = CliRunner().invoke(cli, ARGS[:-1] + ["epochs=0.75", "--out", str(out)])
    assert res.exit_code == 2 and "this study needs" in res.output


def test_dry_run_writes_nothing(tmp_path):
    for extra in ([], ["--pilot"]):
        res = CliRunner().invoke(cli, ARGS + ["--out", str(tmp_path / "d"), "--dry-run"] + extra)
        assert res.exit_code == 0, res.output
        assert not (tmp_path / "d").exists()
    res = CliRunner().invoke(cli, ["experiment", "regime", "--dry-run", "--out", str(tmp_path / "f")])
    assert res.exit_code == 0 and "50 runs" in res.output and "power" in res.output and "estimated time" in res.output
    assert not (tmp_path / "f").exists()


def test_report_links_a_regime_study_beside_another_experiment(study, tmp_path):
    out, _ = study
    other = out.parent / "other"
    (other / "r").mkdir(parents=True, exist_ok=True)
    first = next(p for p in out.iterdir() if (p / "run.json").is_file())
    shutil.copytree(first, other / "r", dirs_exist_ok=True)
    page = build_report([other], out=tmp_path / "page", progress=False).read_text()
    assert "Regime studies found with this experiment" in page and "study" in page


def test_pilot_smoke(tmp_path):
    res = CliRunner().invoke(cli, ARGS + ["--out", str(tmp_path / "p"), "--pilot"])
    assert res.exit_code == 0, res.output
    table = read_table(tmp_path / "p" / "pilot" / "pilot.parquet")
    assert len(table) == 4 and set(table["own_measure"]) == {"batch_csi", "group_csi_excess"}
    row = table.iloc[0]
    assert row["own_reduction"] == pytest.approx(1 - row[row["own_measure"]] / row["base_" + row["own_measure"]])
    assert "own statistic" in res.output


def test_regularize_command_unchanged(tmp_path):
    res = CliRunner().invoke(cli, ["experiment", "regularize", "--preset", "smoke", "--alpha", "-1", "--onsets", "0",
                                   "--seeds", "2", "--parallel", "1", "--quiet", "--out", str(tmp_path / "r"), "epochs=0.5"])
    assert res.exit_code == 0, res.output
    runs = read_table(tmp_path / "r" / "regularize_runs.parquet")
    assert list(runs.columns) == ["condition", "onset", "alpha", "seed", "run", "final_epoch", "final_test_acc",
                                  "final_test_acc_eval", "reg_steps", "reg_mean_lr", "reg_mean_abs_alpha", "final_csi", "final_eta2", "final_csi_all",
                                  "final_eta2_all"]
    assert runs["final_test_acc"].notna().all()  # after BatchNorm re-estimation (tables/accuracy.parquet)
    table = read_table(tmp_path / "r" / "regularize.parquet")
    assert list(table["condition"]) == ["baseline", "reg-from-0"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if (p / "run.json").is_file()) == \
        ["baseline-s0", "baseline-s1", "reg-from-0-s0", "reg-from-0-s1"]


def test_c4_power_per_cell():
    """The dry run's power is the claims' own simulation (rule set 2); a large spread leaves C4 unreachable (the late
    part cannot hold) while the early harm stays measurable."""
    rec = rg.c4_power(claims.Spread().c4_run_sd, 5)
    planned = next(p for p in claims.planned_power(5) if p["claim"] == "C4")
    assert rec["power"] == pytest.approx(planned["power"]) and rec["early_power"] >= rec["power"]
    wide = rg.c4_power(0.0031, 5)
    assert wide["power"] < 0.3 and math.isinf(wide["mde"]) and 0.004 < wide["early_mde"] < 0.02
    assert math.isnan(rg.c4_power(0.001, 1)["power"])
