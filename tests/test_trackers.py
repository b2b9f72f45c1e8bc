"""Trackers (csn.runs.trackers): TensorBoard and Weights & Biases see the numbers of the run's own tables."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from csn.cli import main as cli
from csn.errors import CsnError
from csn.runs.config import TrainConfig
from csn.runs.run import Run, delete_run_files
from csn.training.loop import train
from tests.conftest import tiny_config

tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# TINY: 8 steps per epoch, 16 in all, a log line every 2 steps; the regularizer on so alpha and R are logged
REG = dict(reg_alpha=-1.0, reg_window="0:end", threads=1)
TRAIN_TAGS = {"train/loss": "train_loss", "train/acc": "train_acc", "train/lr": "lr", "train/alpha": "alpha",
              "train/reg_value": "reg_value"}


def _scalars(folder: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a TensorBoard log folder, read as TensorBoard reads it (orphaned points purged)."""
    acc = tb.EventAccumulator(str(folder), size_guidance={tb.SCALARS: 0})
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        assert len(steps) == len(set(steps)), f"{tag} is logged twice at a step: {steps}"
        out[tag] = {e.step: e.value for e in events}
    return out


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory) -> Path:
    """A TINY run trained with tracker=tensorboard (do not modify)."""
    return train(tiny_config(tracker="tensorboard", **REG), tmp_path_factory.mktemp("tb") / "run", progress=False).path


def test_tensorboard_holds_the_training_table_and_the_checkpoint_metrics(tb_run):
    run = Run(tb_run)
    logged = _scalars(tb_run / "tracker" / "tensorboard" / "train")
    table = run.read("training")
    assert len(table) >= 8 and table["alpha"].eq(-1.0).all() and table["reg_value"].gt(0).all()
    for tag, col in TRAIN_TAGS.items():  # every log line, at its optimizer step, to float32 (TensorBoard's storage)
        assert logged[tag] == {int(s): _f32(v) for s, v in zip(table["step"], table[col])}, tag
    for tag, key in (("test/acc", "test_acc"), ("test/loss", "test_loss")):
        assert logged[tag] == {c.step: _f32(c.metrics[key]) for c in run.checkpoints}, tag


def test_tensorboard_logs_the_config_as_hyperparameters(tb_run):
    acc = tb.EventAccumulator(str(tb_run / "tracker" / "tensorboard" / "train"), size_guidance={tb.TENSORS: 0})
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"reg_alpha": -1.0' in text and '"tracker": "tensorboard"' in text
    plugins = acc.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins
    assert b"reg_alpha" in plugins["_hparams_/session_start_info"]


def test_selectivity_logs_each_stage_mean_of_its_table(tb_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tb_run, run_dir)
    res = CliRunner().invoke(cli, ["selectivity", str(run_dir), "--quiet"])
    assert res.exit_code == 0, res.output
    sel = Run(run_dir).read("selectivity")
    logged = _scalars(run_dir / "tracker" / "tensorboard" / "selectivity")
    means = sel.groupby(["stage", "step"])[["csi", "eta2"]].mean()
    assert set(sel["stage"]) == {"layer1", "layer2", "layer3"}
    assert set(logged) == {f"selectivity/{s}/{m}" for s in ("layer1", "layer2", "layer3") for m in ("csi", "eta2")}
    for (stage, step), row in means.iterrows():
        for m in ("csi", "eta2"):
            assert logged[f"selectivity/{stage}/{m}"][step] == _f32(row[m])
    assert set(next(iter(logged.values()))) == {c.step for c in Run(run_dir).checkpoints}


def test_a_resumed_run_logs_each_step_once(tb_run, tmp_path):
    cfg = tiny_config(tracker="tensorboard", **REG)
    out = tmp_path / "resumed"
    train(cfg, out, progress=False, stop_after_step=11)  # last checkpoint at 8: steps 10 logged, then logged again
    first = _scalars(out / "tracker" / "tensorboard" / "train")
    assert max(first["train/loss"]) == 10
    train(cfg, out, progress=False, resume=True)
    logged = _scalars(out / "tracker" / "tensorboard" / "train")  # _scalars refuses a step logged twice
    assert logged == _scalars(tb_run / "tracker" / "tensorboard" / "train")  # the uninterrupted run's
    assert len(list((out / "tracker" / "tensorboard" / "train").glob("events.out.tfevents.*"))) == 2


def test_the_tracker_changes_no_checkpoint_and_no_run_identity(tb_run, tmp_path):
    plain = train(tiny_config(**REG), tmp_path / "plain", progress=False)
    tracked = Run(tb_run)
    assert [c.sha256 for c in plain.checkpoints] == [c.sha256 for c in tracked.checkpoints]
    assert tracked.config.tracker == "tensorboard" and plain.config.tracker == "none"
    assert plain.config.diff(tracked.config) == {}  # resume and the experiments accept either
    resumed = train(tiny_config(tracker="tensorboard", **REG), plain.path, progress=False, resume=True)
    assert resumed.config.tracker == "tensorboard"  # a finished run may be watched from now on


def test_force_deletes_the_trackers_files(tb_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tb_run, run_dir)
    (run_dir / "notes.txt").write_text("mine")
    assert delete_run_files(run_dir) == [run_dir / "notes.txt"]
    assert not (run_dir / "tracker").exists()


def test_an_unknown_tracker_names_the_valid_ones():
    with pytest.raises(CsnError, match="config key 'tracker' expects one of 'none', 'tensorboard' or 'wandb', got 'tb'"):
        TrainConfig.from_dict({"tracker": "tb"})


@pytest.mark.parametrize("name, module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_one_sentence_naming_pip(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    out = tmp_path / "run"
    with pytest.raises(CsnError) as e:
        train(tiny_config(tracker=name, threads=1), out, progress=False)
    msg = str(e.value)
    assert msg == (f"tracker {name!r} needs the {module} package, which is not installed; install it with pip install "
                   f"'csn[{name}]' (or choose tracker=none).")
    assert not out.exists()  # nothing partial


def test_the_train_command_takes_tracker(tmp_path):
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--out", str(tmp_path / "r"), "--tracker", "tensorbord",
                                   "--quiet"])
    assert res.exit_code == 2 and "'tensorbord' is not one of 'none', 'tensorboard', 'wandb'" in res.output


# ------------------------------------------------------------------------------------------------ Weights & Biases

def _wandb_records(run_dir: Path) -> list[dict]:
    """Every history record of the run's offline W&B files, in order, read with W&B's own reader of its
    transaction log (`wandb leet inspect --json`: wandb 0.31 has no Python reader of offline runs)."""
    files = sorted((run_dir / "tracker" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files
    records = []
    for f in files:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(f)], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        start = next(r["run"]["start_time"] for r in lines if r["type"] == "run")
        records += [(start, r["history"]["item"]) for r in lines if r["type"] == "history"]
    return [item for _, item in sorted(records, key=lambda r: r[0])]


def test_wandb_offline_holds_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run = train(tiny_config(tracker="wandb", **REG), out, progress=False, stop_after_step=11)
    run = train(tiny_config(tracker="wandb", **REG), out, progress=False, resume=True)
    res = CliRunner().invoke(cli, ["selectivity", str(out), "--checkpoints", "end", "--quiet"])
    assert res.exit_code == 0, res.output
    rid = (out / "tracker" / "wandb-id").read_text().strip()
    assert len(list((out / "tracker" / "wandb").glob(f"offline-run-*-{rid}*"))) == 3  # train, resumed, selectivity
    history = _wandb_records(out)
    last = {}
    for item in history:  # the latest value of each metric at each step
        last.update({(k, item["step"]): v for k, v in item.items() if not k.startswith("_") and k != "step"})
    table = run.read("training")
    for tag, col in TRAIN_TAGS.items():  # W&B keeps float64: exactly the table's values
        assert {s: v for (k, s), v in last.items() if k == tag} == dict(zip(table["step"], table[col])), tag
    end = run.checkpoints[-1]
    assert last[("test/acc", end.step)] == end.metrics["test_acc"]
    sel = run.read("selectivity")
    assert last[("selectivity/layer2/csi", end.step)] == pytest.approx(sel[sel.stage == "layer2"]["csi"].mean(), abs=0)


@pytest.mark.parametrize("command", [
    ["experiment", "regularize", "--preset", "smoke", "--alpha", "-1", "--onsets", "step=0", "--seeds", "1"],
    ["experiment", "windows", "--preset", "smoke", "--dry-run"],
    ["experiment", "regime", "--preset", "smoke", "--dry-run"],
    ["reproduce", "--preset", "smoke", "--dry-run"],
])
def test_the_commands_that_train_pass_tracker_into_every_runs_config(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, [*command, "--tracker", "tensorbord"])
    assert res.exit_code == 2 and "'tracker' expects one of 'none', 'tensorboard' or 'wandb'" in res.output, res.output
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_experiments_and_reproduce_reuse_runs_trained_with_another_tracker(tb_run, tmp_path):
    from csn.experiments.conditions import check_existing, onset_condition
    from csn.experiments.reproduce import _comparable
    from csn.experiments.runner import Job

    baseline = onset_condition(None)
    job = Job(tiny_config(**REG), tb_run)  # the run was trained with tracker=tensorboard; the request names none
    check_existing([(baseline, job)])  # no refusal
    with pytest.raises(CsnError, match="was trained with seed 0, this experiment needs 1"):
        check_existing([(baseline, Job(tiny_config(**{**REG, "seed": 1}), tb_run))])
    record = {"train_config": tiny_config().to_dict(), "settings": {"seeds": 2}}
    watched = {**record, "train_config": {**record["train_config"], "tracker": "wandb"}}
    assert _comparable(record) == _comparable(watched)


def test_an_analysis_without_the_runs_tracker_installed_notes_it_and_computes(tb_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(tb_run, run_dir)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    res = CliRunner().invoke(cli, ["selectivity", str(run_dir), "--checkpoints", "end", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "note: selectivity of run is not logged to its tracker: tracker 'tensorboard' needs the tensorboard" in res.output
    assert Run(run_dir).read("selectivity") is not None and not (run_dir / "tracker" / "tensorboard" / "selectivity").exists()
