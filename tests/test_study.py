"""A study as a config file: the shipped presets, the file format, time points, shortcuts, --set, --print-config,
`csn claims`, and `csn reproduce --dataset idx` end to end on a small IDX folder."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from csn.analysis.ablation import AblationOptions
from csn.analysis.cka import CkaOptions
from csn.analysis.linearity import LinearityOptions
from csn.cli import main as cli
from csn.core.times import onset_epoch
from csn.data import write_idx
from csn.errors import CsnError
from csn.experiments.claims import INCONCLUSIVE, planned_power
from csn.experiments.conditions import onset_condition
from csn.experiments.study import (
    Study,
    StudyConfig,
    load_study,
    select_steps,
    select_times,
    study_names,
    to_toml,
    uses_peak,
)
from csn.runs.config import preset
from csn.runs.run import Checkpoint, nearest_checkpoint, select_checkpoints

FMNIST_SPE, FMNIST_EPOCHS = 468, 3  # Fashion-MNIST: 60,000 // 128 steps per epoch (the last partial batch dropped)


def _ckpts(steps: list[int], spe: int) -> list[Checkpoint]:
    return [Checkpoint(s, s / spe, f"step-{s:08d}.safetensors", "0" * 64) for s in steps]


# ------------------------------------------------------------------------------------------------
# the shipped studies
# ------------------------------------------------------------------------------------------------

def test_shipped_studies_load_and_round_trip_through_print_config(tmp_path):
    assert study_names() == ["fmnist", "fmnist-vit", "imagenet", "smoke"]
    for name in study_names():
        _, cfg = load_study(name)
        path = tmp_path / f"{name}.toml"
        path.write_text(to_toml(cfg, f"{name}\nsecond line"))
        tomllib.loads(path.read_text())
        assert load_study(config=path)[1] == cfg, name


def test_fmnist_study_defaults_decide_c4_at_half_a_point():
    """The fmnist study: 5 seeds in every condition, so C4 has power >= 0.8 at its declared 0.5-point effect under the
    recorded spread (claims.planned_power), 2 epochs to keep 15 runs within 30 minutes; the analyses where the
    verdicts read them."""
    _, cfg = load_study("fmnist")
    st = cfg.study
    assert cfg.train == preset("fmnist").replace(epochs=2.0)
    assert (st.seeds, st.reg_seeds, st.alpha, st.parallel, st.judge) == (5, 5, -1.0, 2, True)
    assert st.ablation == AblationOptions(draws=3, orders=("selective", "random"), grid="f:0,0.0625,0.125,0.25,0.5,1",
                                          samples=1000)
    assert st.linearity == LinearityOptions(samples=1000) and st.cka == CkaOptions(samples=1000)
    assert st.ablation_checkpoints == st.linearity_checkpoints == ("peak", "end")
    assert st.selectivity_checkpoints == ("0:f0.25", "end") and st.reg_selectivity_checkpoints == ("end",)
    assert st.cka_checkpoints == ("end",)
    assert st.spread == Study().spread
    c4 = {r["claim"]: r for r in planned_power(st.seeds, st.spread)}["C4"]
    assert c4["declared"] == 0.005 and c4["power"] >= 0.8 and c4["seeds_needed"] <= st.seeds


@pytest.mark.parametrize("spe", [FMNIST_SPE, 469])
def test_fmnist_times_resolve_to_the_former_epochs_on_fashion_mnist(spe):
    """On Fashion-MNIST (468 steps x 3 epochs; 469 too): the former checkpoint schedule, late onset epoch 1, early
    checkpoint = the one nearest epoch 0.125, ablation checkpoints = the former selector e0.03,e0.125,last."""
    from csn.core.checkpoint_schedule import checkpoint_steps

    _, cfg = load_study("fmnist")
    st, total = cfg.study, spe * FMNIST_EPOCHS
    steps = checkpoint_steps(cfg.train.checkpoints, spe, FMNIST_EPOCHS)
    former = "step=8,step=16,step=32,step=64,step=128,step=256,0.75:1:0.25,1:end:0.5"
    assert steps == checkpoint_steps(former, spe, FMNIST_EPOCHS)
    ckpts = _ckpts(steps, spe)
    assert onset_epoch(st.late_onset, spe, total) == 1.0
    old = [c.step for c in select_checkpoints(ckpts, "e0.03,e0.125,last")]
    assert select_times(ckpts, ("step=16", "step=64", "end"), spe, total) == old == [16, 64, total]
    assert select_times(ckpts, st.ablation_checkpoints, spe, total, peak=32) == [32, total]
    with pytest.raises(CsnError, match="no selectivity peak"):
        select_times(ckpts, st.ablation_checkpoints, spe, total)
    cond = onset_condition(onset_epoch(st.late_onset, spe, total), st.alpha)
    assert cond.name == "reg-from-1" and cond.apply(cfg.train, 0).reg_window == "1:end"
    # smoke: 8 steps x 2 epochs; the former e0.25,last and late onset 1.0
    _, smoke = load_study("smoke")
    sck = _ckpts(checkpoint_steps(smoke.train.checkpoints, 8, 2), 8)
    assert select_times(sck, smoke.study.ablation_checkpoints, 8, 16, peak=4) == [4, 16]
    assert onset_epoch(smoke.study.late_onset, 8, 16) == 1.0


def test_the_fmnist_study_on_fashion_mnist():
    """2 epochs of 468 steps: the late onset is step 312 (epoch 0.667); the selectivity peak is searched in the first
    234 steps, where 6 of the 13 checkpoints lie."""
    from csn.core.checkpoint_schedule import checkpoint_steps

    _, cfg = load_study("fmnist")
    total = FMNIST_SPE * 2
    steps = checkpoint_steps(cfg.train.checkpoints, FMNIST_SPE, cfg.train.epochs)
    assert steps == [0, 8, 16, 32, 64, 128, 234, 256, 312, 468, 624, 780, total]
    assert round(onset_epoch(cfg.study.late_onset, FMNIST_SPE, total) * FMNIST_SPE) == 312
    assert [s for s in steps if 0 < s <= 0.25 * total] == [8, 16, 32, 64, 128, 234]


def test_peak_is_a_study_time():
    """`peak` (each baseline run's selectivity peak) in checkpoint lists, also in ranges; not a training time."""
    st = Study.parse({"ablation_checkpoints": "PEAK, end", "linearity_checkpoints": ["0:peak"], "cka_checkpoints": []})
    assert st.ablation_checkpoints == ("peak", "end") and st.linearity_checkpoints == ("0:peak",)
    assert st.cka_checkpoints == () and uses_peak(st.linearity_checkpoints) and not uses_peak(("end", "f0.5"))
    steps = [0, 8, 16, 32, 64, 100]
    assert select_steps(steps, st.linearity_checkpoints, 50, 100, peak=16) == [0, 8, 16]
    assert select_steps(steps, ("peak", "step=60", "end"), 50, 100, peak=8) == [8, 64, 100]
    for bad in ({"late_onset": "peak"}, {"ablation_checkpoints": ["peek"]}, {"ablation_checkpoints": []}):
        with pytest.raises(CsnError, match="point in training"):
            Study.parse(bad)
    with pytest.raises(CsnError, match="cannot name 'peak': the peak is found in the baseline's selectivity"):
        Study.parse({"selectivity_checkpoints": ["0:peak"]})


def test_keys_of_earlier_studies(tmp_path, capsys):
    """early_checkpoint is ignored with a one-line note (C2 and C3 read each run's peak); reg_seeds too when it
    equals seeds (every condition has the seeds), and refused otherwise, naming the fix."""
    old = _write(tmp_path, '[study]\nseeds = 3\nreg_seeds = 3\nearly_checkpoint = "step=64"\n')
    assert load_study(config=old)[1].study == Study(seeds=3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "early_checkpoint is no longer used and was ignored" in err[0] and "peak" in err[0]
    assert "reg_seeds is no longer used" in err[1]
    with pytest.raises(CsnError, match=r"reg_seeds is no longer used.*delete reg_seeds = 2") as e:
        load_study(config=_write(tmp_path, "[study]\nseeds = 3\nreg_seeds = 2\n", "two.toml"))
    assert "\n" not in str(e.value)


def test_times_transfer_across_dataset_sizes():
    _, cfg = load_study("fmnist")
    spe = 469 // 8  # a dataset 8x smaller
    total = spe * 3
    assert onset_epoch(cfg.study.late_onset, spe, total) == pytest.approx(1.0, abs=1 / spe)
    ckpts = _ckpts(list(range(0, total, 4)) + [total], spe)
    assert select_times(ckpts, ("step=16", "f0.5", "end"), spe, total) == [16, 88, total]
    assert select_times(ckpts, ("0:1", "end"), spe, total) == [c.step for c in ckpts if c.step <= spe] + [total]
    assert onset_condition(onset_epoch("f0.3", spe, total), -1.0).apply(preset("fmnist"), 0).reg_window == f"{52 / 58!r}:end"
    with pytest.raises(CsnError, match="strictly inside training"):
        onset_epoch("end", spe, total)
    with pytest.raises(CsnError, match="strictly inside training"):
        onset_epoch("step=0", spe, total)


# ------------------------------------------------------------------------------------------------
# the file format, shortcuts and --set
# ------------------------------------------------------------------------------------------------

def _write(tmp_path: Path, text: str, name: str = "study.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_a_study_file_starts_from_a_preset_and_merges_nested_tables(tmp_path):
    p = _write(tmp_path, 'preset = "fmnist"\n[train]\nwidth = 0.5\n[study]\nseeds = 1\n[study.ablation]\ndraws = 5\n')
    name, cfg = load_study(config=p)
    assert name == "study" and cfg.train.width == 0.5 and cfg.train.model == "resnet8"
    assert cfg.study.seeds == 1 and cfg.study.ablation.draws == 5
    assert cfg.study.ablation.samples == 1000 and cfg.study.ablation.orders == ("selective", "random")  # kept
    own = _write(tmp_path, 'preset = "fmnist"\n[train]\npreset = "smoke"\n', "own.toml")
    assert load_study(config=own)[1].train == preset("smoke")  # a training preset of its own starts afresh
    yml = _write(tmp_path, "train:\n  preset: smoke\nstudy:\n  alpha: -2\n  late_onset: f0.5\n", "s.yaml")
    cfg = load_study(config=yml)[1]
    assert cfg.train == preset("smoke") and cfg.study.alpha == -2 and cfg.study.late_onset == "f0.5"
    bare = load_study(config=_write(tmp_path, "[study]\nseeds = 2\n", "bare.toml"))[1]
    assert bare.train.model == "resnet20" and bare.study.ablation_checkpoints == ("peak", "end")  # the defaults


def test_shortcuts_and_sets(tmp_path):
    _, cfg = load_study("fmnist", dataset="idx", data_root=str(tmp_path), model="vit-tiny",
                        sets=["study.alpha=-2", "train.width=0.5", "study.ablation.draws=5", "study.late_onset=1.5",
                              "train.layers=blocks.0,blocks.1"])
    assert (cfg.train.dataset, cfg.train.data_root, cfg.train.model, cfg.train.width) == ("idx", str(tmp_path),
                                                                                        "vit-tiny", 0.5)
    assert cfg.train.layers == ["blocks.0", "blocks.1"]
    assert cfg.study.alpha == -2 and cfg.study.ablation.draws == 5 and cfg.study.late_onset == "1.5"
    assert cfg.study.ablation.samples == 1000


@pytest.mark.parametrize("text, match", [
    ('[study]\nseed = 3\n', r"unknown study key 'seed' \(closest: 'seeds'\)"),
    ('[study.ablation]\ndrows = 3\n', r"unknown study key 'ablation.drows' \(closest: 'ablation.draws'\)"),
    ('[train]\nepoch = 3\n', r"unknown config key 'epoch' \(closest: 'epochs'\)"),
    ('[tarin]\nepochs = 3\n', r"unknown top-level key 'tarin' \(closest: 'train'\)"),
    ('preset = "fmnst"\n', r"unknown study preset 'fmnst' \(closest: 'fmnist'\)"),
    ('[study]\nalpha = 0\n', "alpha 0 regularizes nothing"),
    ('[study]\nlate_onset = "soon"\n', r"late_onset.*not a point in training"),
    ('[study]\nablation_checkpoints = ["step=16", "f2"]\n', "outside"),
    ('[study.cka]\nmode = "within"\n', "set by the study"),
    ('[study]\nseeds = 0\n', "must be >= 1"),
    ('study = 3\n', r"\[study\] must be a table"),
])
def test_bad_study_files_are_one_line_naming_the_fix(tmp_path, text, match):
    p = _write(tmp_path, text)
    with pytest.raises(CsnError, match=match) as e:
        load_study(config=p)
    assert "\n" not in str(e.value)
    assert str(p) in str(e.value) or "unknown study preset" in str(e.value)


def test_bad_sets():
    with pytest.raises(CsnError, match=r"names no table; write train.KEY=VALUE or study.KEY=VALUE .*--set train.width"):
        load_study("smoke", sets=["width=0.5"])
    with pytest.raises(CsnError, match=r"unknown study key 'ablation.draw' \(closest: 'ablation.draws'\)"):
        load_study("smoke", sets=["study.ablation.draw=3"])
    with pytest.raises(CsnError, match="is a value, not a table"):
        load_study("smoke", sets=["study.alpha.x=3"])
    with pytest.raises(CsnError, match="either --preset or --config"):
        load_study("smoke", "x.toml")


def test_print_config_and_preset_errors_from_the_cli(tmp_path):
    res = CliRunner().invoke(cli, ["reproduce", "--print-config", "fmnist"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("# csn study preset 'fmnist'") and "[study.ablation]" in res.output
    p = _write(tmp_path, res.output)
    assert load_study(config=p)[1] == load_study("fmnist")[1]
    res = CliRunner().invoke(cli, ["reproduce", "--print-config", "vit"])
    assert res.exit_code == 2 and "closest: 'fmnist-vit'" in res.output
    res = CliRunner().invoke(cli, ["reproduce", "--config", str(p), "--set", "study.seed=1", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "closest: 'seeds'" in res.output and not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, ["reproduce", "--help"])
    for text in ("--config", "--print-config", "--dataset", "--data-root", "--model", "--set", "f0.33", "csn claims"):
        assert text in res.output


def test_study_config_is_a_schema():
    cfg = StudyConfig(train=preset("smoke"), study=Study(seeds=1))
    assert StudyConfig.parse(cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------------------------
# end to end: csn reproduce on an IDX folder, then csn claims
# ------------------------------------------------------------------------------------------------

TINY_STUDY = """
[train]
preset = "smoke"

[study]
seeds = 1
late_onset = "f0.5"
ablation_checkpoints = ["peak", "end"]
linearity_checkpoints = ["peak", "end"]
parallel = 1
judge = false

[study.ablation]
draws = 1
grid = "f:0,1"
samples = 64

[study.linearity]
samples = 64
fit_epochs = 1

[study.cka]
samples = 64
"""


def _idx_folder(root: Path, classes: int = 4, size: int = 12) -> Path:
    """A small learnable MNIST-format folder: each class a bright square in its own corner, plus noise."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 256), ("t10k", 128)):
        y = np.arange(n) % classes
        x = rng.integers(0, 60, size=(n, size, size))
        for k in range(classes):
            r, c = divmod(k, 2)
            x[y == k, r * 6:r * 6 + 6, c * 6:c * 6 + 6] += 150
        write_idx(root / f"{split}-images-idx3-ubyte", x.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte", y.astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def idx_study(tmp_path_factory) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("idxstudy")
    data = _idx_folder(tmp / "mnist-like")
    cfg = _write(tmp, TINY_STUDY, "tiny.toml")
    out = tmp / "out"
    res = CliRunner().invoke(cli, ["reproduce", "--dataset", "idx", "--data-root", str(data), "--config", str(cfg),
                                   "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_reproduce_on_an_idx_folder_writes_claims_and_report(idx_study):
    out, output = idx_study
    claims = json.loads((out / "claims.json").read_text())
    assert [c["claim"] for c in claims["claims"]] == ["C1", "C2", "C3", "C4"]
    assert all(c["verdict"] == INCONCLUSIVE and "too small" in c["observed"] for c in claims["claims"])
    assert claims["runs"]["baseline"] == ["baseline-s0"] and "selectivity_peak_step" in claims["runs"]
    assert claims["rules_version"] == 2 and claims["rules_declared"] == "2026-12-05"
    rec = json.loads((out / "reproduce.json").read_text())
    assert rec["train_config"]["dataset"] == "idx" and rec["settings"]["study"] == "tiny"
    assert rec["resolved"] == {"steps_per_epoch": 4, "total_steps": 8, "late_onset_step": 4, "late_onset_epoch": 1.0}
    run = json.loads((out / "baseline-s0" / "run.json").read_text())
    assert run["data"]["num_classes"] == 4 and run["data"]["image_size"] == 12 and run["data"]["in_channels"] == 1
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["baseline-s0", "reg-from-0-s0", "reg-from-1-s0",
                                                                   "report"]
    html = (out / "report" / "index.html").read_text()
    assert "Claims and verdicts" in html and "too small to test" in html
    assert f"report: {out / 'report' / 'index.html'}" in output


def test_csn_claims_recomputes_the_same_verdicts(idx_study, tmp_path):
    out, _ = idx_study
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = json.loads((copy / "claims.json").read_text())
    res = CliRunner().invoke(cli, ["claims", str(copy), "--no-report"])
    assert res.exit_code == 0, res.output
    after = json.loads((copy / "claims.json").read_text())
    assert after["claims"] == before["claims"] and after["thresholds"] == before["thresholds"]


def test_csn_claims_on_an_interrupted_study(idx_study, tmp_path):
    """No reproduce.json, no linearity table, one run unfinished: still judged, each gap named."""
    out, _ = idx_study
    copy = tmp_path / "hand"
    shutil.copytree(out, copy)
    (copy / "reproduce.json").unlink()
    (copy / "baseline-s0" / "tables" / "linearity.parquet").unlink()
    manifest = copy / "reg-from-1-s0" / "checkpoints" / "manifest.jsonl"
    manifest.write_text("".join(manifest.read_text().splitlines(keepends=True)[:-1]))  # its last checkpoint lost
    res = CliRunner().invoke(cli, ["claims", str(copy)])
    assert res.exit_code == 0, res.output
    data = json.loads((copy / "claims.json").read_text())
    by = {c["claim"]: c for c in data["claims"]}
    assert by["C3"]["verdict"] == INCONCLUSIVE and "no linearity table" in by["C3"]["observed"]
    assert by["C4"]["verdict"] == INCONCLUSIVE and "missing" in by["C4"]["observed"]
    assert data["runs"]["unfinished"] == ["reg-from-1-s0"] and (copy / "report" / "index.html").is_file()
    res = CliRunner().invoke(cli, ["claims", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "not a folder" in res.output
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(cli, ["claims", str(empty)])
    assert res.exit_code == 2 and "no finished runs" in res.output


def test_a_shortened_preset_trains(tmp_path):
    """`csn train --preset smoke epochs=0.5`: the preset's checkpoints past the end are dropped with a note."""
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--out", str(tmp_path / "r"), "--quiet",
                                   "epochs=0.5"])
    assert res.exit_code == 0, res.output
    assert "steps:0:8:2 of the preset's schedule reaches past the end of training (0.5 epochs = 4 steps)" in res.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "checkpoints" / "manifest.jsonl").read_text().splitlines()]
    assert steps == [0, 2, 3, 4]  # steps 0, 2, 4 of steps:0:8:2, and f0.5, f0.75, end of 4 steps
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--out", str(tmp_path / "u"), "--quiet", "epochs=0.5",
                                   "checkpoints=step=6"])
    assert res.exit_code == 2 and "after the end of training" in res.output


def test_the_onsets_are_read_from_run_json_not_from_names():
    """An onset resolved from a fraction (step 156 of 469 per epoch: 0.3326... epochs) is read back exactly from the
    run's recorded regularizer window, whatever its folder is called; judge pairs it with the late onset exactly."""
    from types import SimpleNamespace

    from csn.experiments.judge import StudyRuns, _late_condition
    from csn.runs.run import RegWindow

    def run(start, alpha=-1.0):
        windows = [] if start is None else [RegWindow(start_step=start, end_step=938, alpha=alpha)]
        return SimpleNamespace(reg_windows=windows, info={"steps_per_epoch": 469})

    onset = onset_epoch("f0.16631", 469, 938)
    assert onset == 156 / 469
    found = StudyRuns({("baseline", 0): run(None), ("reg-from-0", 0): run(0), ("late-any-name", 0): run(156)})
    conds, late = _late_condition(found, onset)
    assert late == onset and [(c.name, c.onset, c.alpha) for c in conds] == [
        ("baseline", None, 0.0), ("reg-from-0", 0.0, -1.0), ("late-any-name", onset, -1.0)]
    assert _late_condition(found, None)[1] == onset  # inferred: the one nonzero onset
    assert _late_condition(found, 2.0)[1] == 2.0  # no such condition: C4 then says one is missing
    with pytest.raises(CsnError, match="trained differently"):  # seeds of one condition must agree
        _late_condition(StudyRuns({("late", 0): run(156), ("late", 1): run(157)}), None)


def test_nearest_checkpoint_by_step_or_epoch_takes_the_earlier_on_a_tie():
    rng = np.random.default_rng(3)
    for _ in range(200):
        steps = sorted(set(rng.integers(0, 500, size=rng.integers(1, 12)).tolist()))
        ckpts = [Checkpoint(s, s / 50, f"step-{s:08d}.safetensors", "0" * 64, {}) for s in steps]
        want_step = int(rng.integers(-20, 520))
        best = min(abs(s - want_step) for s in steps)  # naive reference: the first step at the smallest distance
        assert nearest_checkpoint(ckpts, step=want_step).step == next(s for s in steps if abs(s - want_step) == best)
        e = float(rng.uniform(-1, 11))
        best_e = min(abs(s / 50 - e) for s in steps)
        assert nearest_checkpoint(ckpts, epoch=e).step == next(s for s in steps if abs(s / 50 - e) == best_e)
    two = [Checkpoint(s, s / 50, f"step-{s:08d}.safetensors", "0" * 64, {}) for s in (10, 20)]
    assert nearest_checkpoint(two, step=15).step == 10 and nearest_checkpoint(two, epoch=0.3).step == 10
    with pytest.raises(TypeError):
        nearest_checkpoint(two)
    with pytest.raises(TypeError):
        nearest_checkpoint(two, step=1, epoch=1.0)
