"""Hostile input, second round (issue 15): every case is a command that ends in one `error:` line and exit
status 2 (1 for `csn verify` findings), with nothing half-written. Every hostile file is generated here.

Classes: values validated by the schemas (ranges, seeds, devices, paths), config files (YAML aliases and
duplicate keys), resource bounds checked before any allocation (synthetic sizes, model size, ablation
points, reproduction seeds), dataset files through the command line, files csn reads back (optimizer
state, cached linear model, run.json, manifest, checkpoints, tables) and `csn verify`, results from a
diverged model, and `--force` (never through a link, only csn's files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from csn.cli import main
from csn.errors import CsnError
from csn.runs import MANIFEST, Run, read_manifest, save_tensors, sha256_file, write_manifest
from csn.runs.io import sidecar
from csn.training.loop import train
from tests.conftest import tiny_config
from tests.test_data import IDX_HOSTILE, NAMES, _base, _write_dir

SMOKE = ["train", "--preset", "smoke", "--threads", "1", "--quiet"]


def refused(args, code: int = 2) -> str:
    """Run `csn ARGS` in-process: it must exit with `code`, end in exactly one `error:` line (exit 2) and
    print no traceback; returns the output."""
    r = CliRunner().invoke(main, [str(a) for a in args])
    out = r.output
    assert r.exit_code == code, (args, out, r.exception)
    assert "Traceback" not in out and not isinstance(r.exception, (AssertionError, TypeError, ValueError)), out
    if code == 2:
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines and lines[-1].startswith("error: "), out
        assert sum(line.startswith("error:") for line in lines) == 1, out
        return lines[-1]
    return out


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# ============================================================================ item 1: values, devices, paths
TRAIN_REFUSED = {
    "lr=-1": (["lr=-1"], r"config key 'lr' must be > 0, got -1\."),
    "lr=0": (["lr=0"], r"config key 'lr' must be > 0"),
    "momentum=-2": (["momentum=-2"], r"config key 'momentum' must be >= 0, got -2\."),
    "momentum=1": (["momentum=1"], r"config key 'momentum' must be < 1, got 1\."),
    "weight_decay=-1": (["weight_decay=-1"], r"config key 'weight_decay' must be >= 0"),
    "log_every=0": (["log_every=0"], r"config key 'log_every' must be >= 1, got 0\."),
    "seed=1e23": (["seed=100000000000000000000000"], r"config key 'seed' must be < 2\*\*63"),
    "--seed 1e23": (["--seed", "100000000000000000000000"], r"config key 'seed' must be < 2\*\*63"),
    "seed=-1": (["seed=-1"], r"config key 'seed' must be >= 0"),
    "--threads -3": (["--threads", "-3"], r"config key 'threads' must be >= 1"),
    "batch_size=0": (["batch_size=0"], r"config key 'batch_size' must be >= 1"),
    "epochs=0": (["--epochs", "0"], r"config key 'epochs' must be > 0"),
    "nesterov without momentum": (["nesterov=true", "momentum=0"], r"'nesterov' needs momentum > 0"),
    "unknown lr schedule": (["lr_schedule=bogus"], r"unknown learning-rate schedule 'bogus'"),
    "warm-up longer than training": (["warmup_epochs=5"], r"longer than training"),
    "synthetic bogus key": (['synthetic={"bogus":1}'], r"unknown synthetic key 'bogus'"),
    "synthetic size='big'": (['synthetic={"size":"big"}'], r"synthetic key 'size' must be a positive integer"),
    "synthetic num_classes=1e9": (['synthetic={"num_classes":1e9}'], r"1,000,000,000 class prototypes needs 576 GB; the limit is 8 GB \(set "
                                                                      r"CSN_MAX_DATA_GB to raise it\)"),
    "synthetic num_train=2e9": (['synthetic={"num_train":2e9}'], r"2,000,000,256 x 1 x 12 x 12 .* the limit is 8 GB"),
    "synthetic size=1e5": (['synthetic={"size":1e5}'], r"x 100000 x 100000 .* the limit is 8 GB"),
    "model width 1000": (["width=1000"], r"76,289,744,013 parameters .* the limit is 16 GB \(lower width, or set "
                                         r"CSN_MAX_MODEL_GB"),
    "a device that does not exist": (["--device", "cuda:99"], r"device 'cuda:99' (is not available|does not exist)"),
    "an unknown device": (["--device", "tpu9"], r"unknown device 'tpu9'|device 'tpu9' is not available"),
}


@pytest.mark.parametrize("case", list(TRAIN_REFUSED))
def test_train_refuses_bad_values_and_writes_nothing(tmp_path, monkeypatch, case):
    """Each value is refused by the schema or the set-up before the run directory exists: no empty or
    half-written run is left behind."""
    args, pattern = TRAIN_REFUSED[case]
    monkeypatch.chdir(tmp_path)
    msg = refused([*SMOKE, "--out", "r", *args])
    assert re.search(pattern, msg), msg
    assert listing(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable GPU")
def test_cuda_on_a_cpu_only_machine(tmp_path, monkeypatch, tiny_run):
    monkeypatch.chdir(tmp_path)
    msg = refused([*SMOKE, "--out", "r", "--device", "cuda"])
    assert "device 'cuda' is not available" in msg and "--device cpu or auto" in msg
    assert not Path("r").exists()
    for command in ("selectivity", "ablate", "linearity", "cka"):  # analyses resolve devices the same way
        assert "device 'cuda' is not available" in refused([command, tiny_run, "--device", "cuda"])
    assert not list((Path(tiny_run) / "tables").glob("*.parquet"))[1:]  # only training.parquet


@pytest.mark.parametrize("case", ["inside a file", "not UTF-8"])
def test_out_paths_that_cannot_be_a_run_directory(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    Path("afile.txt").write_text("mine")
    out = {"inside a file": "afile.txt/sub", "not UTF-8": os.fsdecode(b"bad\xff")}[case]
    msg = refused([*SMOKE, "--out", out])
    assert {"inside a file": "lies inside afile.txt, which is a file",
            "not UTF-8": r"b'bad\xff' is not valid UTF-8"}[case] in msg, msg
    assert listing(tmp_path) == ["afile.txt"] and Path("afile.txt").read_text() == "mine"
    with pytest.raises(CsnError, match="afile.txt is a file; pass a folder path"):  # (the CLI's --out says so itself)
        train(tiny_config(), "afile.txt", progress=False)


def test_commands_refuse_a_run_whose_path_is_not_utf8(tiny_run, tmp_path):
    bad = tmp_path / os.fsdecode(b"run\xff")
    shutil.copytree(tiny_run, bad)
    for cmd in (["info", bad], ["report", bad], ["selectivity", bad], ["verify", bad]):
        assert "is not valid UTF-8" in refused(cmd)


def test_force_with_a_refused_config_deletes_nothing(tiny_run):
    before = {p: sha256_file(p) for p in Path(tiny_run).rglob("*") if p.is_file()}
    refused([*SMOKE, "--out", tiny_run, "--force", "lr=-1"])
    refused([*SMOKE, "--out", tiny_run, "--force", 'synthetic={"size":"big"}'])  # refused at data set-up
    assert {p: sha256_file(p) for p in Path(tiny_run).rglob("*") if p.is_file()} == before


def test_ablate_seed_out_of_range(tiny_run):
    assert "--seed must be < 2**63" in refused(["ablate", tiny_run, "--seed", "100000000000000000000000"])
    assert not Run(tiny_run).table_path("ablation").exists()


@pytest.mark.parametrize("selector, pattern", [("e-1", "'e-1' is not a point in training"),
                                               ("e99", "'e99' is epoch 99, after the run's last checkpoint (epoch 2,")])
def test_epoch_selectors_outside_the_run(tiny_run, selector, pattern):
    assert pattern in refused(["selectivity", tiny_run, "--checkpoints", selector])


# ============================================================================ config files
BOMB = "\n".join(["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
                 + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
                 + ["milestones: *a11"])  # 10**12 values once expanded
CONFIG_REFUSED = {
    "toml synthetic size='big'": ("c.toml", 'preset = "smoke"\n[synthetic]\nsize = "big"\n',
                                  r"synthetic key 'size' must be a positive integer .*got 'big'"),
    "yaml nested aliases (a bomb)": ("c.yaml", BOMB, r"uses a YAML anchor &a0 at line 1; csn refuses anchors and aliases"),
    "yaml alias": ("c.yaml", "preset: smoke\nmilestones: *x\n", r"(alias \*x at line 2|not valid YAML)"),
    "yaml anchor": ("c.yaml", "preset: smoke\nname: &n smoke2\n", r"uses a YAML anchor &n at line 2"),
    "yaml duplicate key": ("c.yaml", "preset: smoke\nlr: 0.1\nepochs: 1\nlr: 0.5\n",
                           r"sets the key 'lr' twice \(lines 2 and 4\); YAML would silently keep the last value"),
    "yaml duplicate nested key": ("c.yml", "preset: smoke\nsynthetic: {size: 8, size: 9}\n",
                                  r"sets the key 'size' twice \(line 2\)"),
    "two spellings of a key": ("c.yaml", "preset: smoke\nlr-schedule: cosine\nlr_schedule: step\n",
                               r"sets 'lr_schedule' twice \(as 'lr-schedule' and 'lr_schedule'\)"),
    "toml duplicate key": ("c.toml", 'preset = "smoke"\nlr = 0.1\nlr = 0.2\n', r"is not valid: .*; fix the syntax"),
    "out of range in a file": ("c.yaml", "preset: smoke\nmomentum: 1.5\n", r"config key 'momentum' must be < 1"),
}


@pytest.mark.parametrize("case", list(CONFIG_REFUSED))
def test_config_files_refused_in_one_line(tmp_path, monkeypatch, case):
    name, text, pattern = CONFIG_REFUSED[case]
    monkeypatch.chdir(tmp_path)
    Path(name).write_text(text)
    t0 = time.perf_counter()
    msg = refused(["train", "--config", name, "--out", "r", "--quiet"])
    assert time.perf_counter() - t0 < 30  # the bomb is refused before anything is expanded
    assert re.search(pattern, msg), msg
    assert listing(tmp_path) == [name]


# ============================================================================ item 2: dataset files, end to end
ISSUE_DATA_CASES = ["negative int8 label", "dims whose product wraps to 0", "zero images", "test 16x16, train 12x12",
                    "float labels 0.7", "int16 pixels beyond 255", "one stray label 200", "standardized float images",
                    "single class"]


@pytest.mark.parametrize("case", ISSUE_DATA_CASES)
def test_hostile_dataset_files_through_the_cli(tmp_path, monkeypatch, case):
    """The issue's dataset files (generated by tests/test_data.py's IDX_HOSTILE): one error naming the file,
    exit 2, and no run directory. (Float images in [0, 1] are read as intensities: test_data.py.)"""
    changes, culprit, pattern = IDX_HOSTILE[case]
    (tmp_path / "data").mkdir()
    data = _write_dir(tmp_path / "data", {**_base(), **changes})
    monkeypatch.chdir(tmp_path)
    msg = refused(["train", "--dataset", "idx", "--data-root", data, "--model", "mlp", "--out", "r", "--quiet"])
    assert NAMES[culprit] in msg and re.search(pattern, msg), msg
    assert not Path("r").exists()


# ============================================================================ item 3: resource bounds
def test_ablation_points_bounded_before_any_allocation(tiny_run, monkeypatch):
    msg = refused(["ablate", tiny_run, "--draws", "1000000000"])
    assert "x 1,000,000,002 orders and draws" in msg and "TB of rows" in msg, msg
    assert "the limit is 1,000,000 points" in msg and "--max-points N or CSN_MAX_ABLATION_POINTS" in msg, msg
    huge_grid = "f:" + ",".join(repr(i / 10**5) for i in range(10**5 + 1))  # every count of each block
    msg = refused(["ablate", tiny_run, "--grid", huge_grid, "--draws", "10000", "--checkpoints", "step=0,step=1,step=2,step=4"])
    assert "(4 checkpoints x (layer1 x 9 grid points + layer2 x 17 grid points + layer3 x 33 grid points) x 10,002 " \
           "orders and draws" in msg and "needs 2,360,472 points; the limit is 1,000,000 points" in msg, msg
    assert "the limit is 10 points" in refused(["ablate", tiny_run, "--checkpoints", "last", "--max-points", "10"])
    monkeypatch.setenv("CSN_MAX_ABLATION_POINTS", "10")
    assert "the limit is 10 points" in refused(["ablate", tiny_run, "--checkpoints", "last"])
    monkeypatch.setenv("CSN_MAX_ABLATION_POINTS", "lots")
    assert "CSN_MAX_ABLATION_POINTS='lots' is not a positive number" in refused(["ablate", tiny_run])
    assert not Run(tiny_run).table_path("ablation").exists()


def test_reproduce_seeds_bounded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = refused(["reproduce", "--preset", "smoke", "--seeds", "100000", "--out", "rep"])
    assert "'seeds' must be <= 100, got 100000 (each seed is one training run per condition" in msg, msg
    assert listing(tmp_path) == []


# ============================================================================ item 4: files csn reads back
def _rewrite_checkpoint(run_dir: Path, change, step: int | None = None) -> None:
    """Replace a checkpoint's tensors by change(tensors) and update the manifest's sha256 (a consistent forgery)."""
    run = Run(run_dir)
    c = run.checkpoints[-1] if step is None else run.checkpoint(step)
    path = run.ckpt_dir / c.file
    digest = save_tensors(path, change(load_file(str(path))))
    write_manifest(run.ckpt_dir, [replace(x, sha256=digest) if x.step == c.step else x for x in run.checkpoints])


def _header_bomb(run_dir: Path) -> None:
    run = Run(run_dir)
    c = run.checkpoints[-1]
    path = run.ckpt_dir / c.file
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])
    write_manifest(run.ckpt_dir, [replace(x, sha256=sha256_file(path)) if x.step == c.step else x
                                  for x in run.checkpoints])


def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _manifest_step(run_dir: Path, step: int) -> None:
    m = Path(run_dir) / "checkpoints" / MANIFEST
    lines = m.read_text().splitlines()
    d = json.loads(lines[-1])
    d["step"] = step
    m.write_text("\n".join(lines[:-1] + [json.dumps(d)]) + "\n")


def _table(run_dir: Path, df: pd.DataFrame, name: str = "selectivity") -> None:
    (Path(run_dir) / "tables" / f"{name}.parquet").write_bytes(b"")
    df.to_parquet(Path(run_dir) / "tables" / f"{name}.parquet", index=False)


def _csi_as_strings(run_dir: Path) -> None:
    from csn.analysis.selectivity import SELECTIVITY

    row = {c: {"int64": 0, "float64": 0.5, "bool": False, "str": "x"}[t] for c, t in SELECTIVITY.columns.items()}
    _table(run_dir, pd.DataFrame([{**row, "csi": "0.5"}]))


def _no_key(key):
    return lambda d: d.pop(key)


RUN_FILES = {
    # case: (damage, command that reads the file, its error, verify's finding)
    "wrong-shape tensor": (lambda r: _rewrite_checkpoint(r, lambda t: {**t, "fc.weight": torch.zeros(3, 3)}),
                           ["selectivity", "--checkpoints", "last"], r"holds fc\.weight of shape \[3, 3\] where the model",
                           r"holds fc\.weight of shape \[3, 3\] where the model has"),
    "missing tensor": (lambda r: _rewrite_checkpoint(r, lambda t: {k: v for k, v in t.items() if k != "fc.bias"}),
                       ["selectivity", "--checkpoints", "last"], r"lacks 1 of the model's tensors \(first: fc\.bias\)",
                       r"does not fit the model run\.json describes \(lacks fc\.bias\)"),
    "header claiming 2**62 bytes": (_header_bomb, ["selectivity", "--checkpoints", "last"],
                                    r"cannot be read \(SafetensorError", r"has a damaged header"),
    "run.json without data": (lambda r: _edit_json(r / "run.json", _no_key("data")), ["info"],
                              r"run\.json is not a valid run\.json \(key 'data' is required", r"key 'data' is required"),
    "run.json without config.model": (lambda r: _edit_json(r / "run.json", lambda d: d["config"].pop("model")), ["info"],
                                      r"config names no model", r"config names no model"),
    "run.json with a wrong num_classes": (
        lambda r: _edit_json(r / "run.json", lambda d: d["data"].update(num_classes=3, class_names=["a", "b", "c"])),
        ["selectivity", "--checkpoints", "last"], r"run\.json records num_classes 3, but the run's dataset",
        r"holds fc\.(weight|bias) of shape \[4(, \d+)?\] where the model has \[3(, \d+)?\]"),
    "run.json config out of range": (lambda r: _edit_json(r / "run.json", lambda d: d["config"].update(lr=-1)), ["info"],
                                     r"holds an invalid config \(config key 'lr' must be > 0", r"'lr' must be > 0"),
    "manifest step 10**30": (lambda r: _manifest_step(r, 10**30), ["info"],
                             r"line \d+ is malformed \(key 'step' must be < 2\*\*62", r"key 'step' must be < 2\*\*62"),
    "manifest step beyond training": (lambda r: _manifest_step(r, 10**6), ["info"],
                                      r"lists step 1000000, beyond the run's 16 training steps", r"beyond the run's 16"),
    "table with wrong columns": (lambda r: _table(r, pd.DataFrame({"x": [1]})), ["report"],
                                 r"selectivity\.parquet lacks the columns step, epoch, layer", r"lacks the columns"),
    "csi stored as strings": (_csi_as_strings, ["selectivity", "--checkpoints", "last"],
                              r"holds the column 'csi' as string, but it must be float64 .*; delete it and run the "
                              r"analysis that wrote it again", r"'csi' as string"),
    "training table mistyped": (lambda r: _table(r, pd.DataFrame({c: ["x"] for c in (
        "step", "epoch", "lr", "alpha", "train_loss", "train_acc", "reg_value", "reg_skipped", "time_s")}), "training"),
        ["report"], r"training\.parquet holds the column 'step' as string.*\(`csn train --force`", r"'step' as string"),
}


@pytest.mark.parametrize("case", list(RUN_FILES))
def test_damaged_run_files_refused_and_found_by_verify(tiny_run, case):
    damage, command, pattern, finding = RUN_FILES[case]
    run_dir = Path(tiny_run)
    assert refused(["verify", run_dir], code=0).strip().endswith("ok")
    damage(run_dir)
    msg = refused([command[0], run_dir, *command[1:]])
    assert re.search(pattern, msg), msg
    out = refused(["verify", run_dir], code=1)
    assert re.search(finding, out), out


def test_optimizer_state_is_checksummed(tiny_run):
    """One flipped byte in the optimizer state: --resume refuses it (it would silently diverge from the
    uninterrupted run), and verify finds it."""
    run = Run(tiny_run)
    *rest, last = run.checkpoints
    write_manifest(run.ckpt_dir, rest)  # as if killed before the last checkpoint: --resume reads this state
    state = run.ckpt_dir / f"state-{rest[-1].step:08d}.safetensors"
    shutil.copy(run.ckpt_dir / f"state-{last.step:08d}.safetensors", state)
    shutil.copy(sidecar(run.ckpt_dir / f"state-{last.step:08d}.safetensors"), sidecar(state))
    sidecar(state).write_text(sidecar(state).read_text().replace(f"state-{last.step:08d}", state.stem))
    assert refused(["verify", tiny_run], code=0).strip().endswith("ok")
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x01
    state.write_bytes(bytes(data))
    with pytest.raises(CsnError, match=rf"optimizer state {state} is corrupt \(its sha256 differs from "
                                       rf"{state.name}\.sha256.*cannot resume exactly: restart it with --force"):
        train(tiny_config(), tiny_run, resume=True, progress=False)
    assert f"optimizer state {state.name} is corrupt" in refused(["verify", tiny_run], code=1)
    sidecar(state).unlink()
    assert "has no checksum" in refused(["verify", tiny_run], code=1)


def test_cached_linear_model_is_checksummed(tiny_run):
    """Negated weights in tables/linear_model.safetensors would turn mu_y_share from 1.0 into 0.40 silently."""
    from csn.analysis.linearity import linear_model_for_run, linear_model_path

    run = Run(tiny_run)
    linear_model_for_run(run, run.dataset(), log=lambda s: None)
    path = linear_model_path(run)
    assert sidecar(path).is_file() and refused(["verify", tiny_run], code=0).strip().endswith("ok")
    t = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_tensors(path, {k: -v for k, v in t.items()}, metadata=meta)  # the sidecar still holds the old sha256
    msg = refused(["linearity", tiny_run, "--checkpoints", "last"])
    assert "the cached linear classifier" in msg and "is corrupt" in msg and "refit" in msg, msg
    assert "linear_model.safetensors is corrupt" in refused(["verify", tiny_run], code=1)
    assert not run.table_path("linearity").exists()


# ============================================================================ csn verify on experiment directories
def test_verify_experiment_and_reproduction_directories(tiny_run, tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    for name in ("baseline-s0", "baseline-s1"):
        shutil.copytree(tiny_run, exp / name)
    (exp / "reproduce.json").write_text(json.dumps({"settings": {}}))
    (exp / "claims.json").write_text(json.dumps({"claims": []}))
    pd.DataFrame({"condition": ["baseline"], "final_test_acc_mean": [0.5]}).to_parquet(exp / "regularize.parquet")
    out = refused(["verify", exp], code=0)
    assert "experiment directory with 2 run(s)" in out and out.count(": ok") == 3, out
    (exp / "claims.json").write_text("{half")
    _manifest_step(exp / "baseline-s1", 10**30)
    (exp / "regularize.parquet").write_bytes(b"PAR1 garbage")
    out = refused(["verify", exp], code=1)
    assert "claims.json is corrupt" in out and "regularize.parquet is unreadable" in out, out
    assert "baseline-s0: ok" in out and "baseline-s1: 1 problem(s)" in out, out
    (tmp_path / "empty").mkdir()
    assert "holds no csn run" in refused(["verify", tmp_path / "empty"])


# ============================================================================ item 5: results from a broken model
def _nan_fc(t):
    return {k: (torch.full_like(v, float("nan")) if k.startswith("fc.") else v) for k, v in t.items()}


def _huge(t):
    return {k: (v * 1e30 if v.is_floating_point() and "running" not in k else v) for k, v in t.items()}


@pytest.mark.parametrize("command", ["selectivity", "ablate", "linearity", "cka"])
@pytest.mark.parametrize("damage", [_nan_fc, _huge], ids=["nan-in-fc", "diverged"])
def test_diverged_checkpoint_refused_by_every_analysis(tiny_run, command, damage):
    _rewrite_checkpoint(Path(tiny_run), damage)
    msg = refused([command, tiny_run, "--checkpoints", "last"])
    assert "produced NaN or infinite activations; check the model's weights (a diverged checkpoint?)" in msg, msg
    table = {"ablate": "ablation"}.get(command, command)
    assert not list((Path(tiny_run) / "tables").glob(f"{table}*.parquet"))  # no row was written


# ============================================================================ item 6: --force
def test_force_never_deletes_through_a_link(tiny_run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tiny_run, target_is_directory=True)
    before = listing(Path(tiny_run))
    assert "is a symbolic link" in refused([*SMOKE, "--out", link, "--force"])
    assert listing(Path(tiny_run)) == before and Run(tiny_run).checkpoints


def test_force_refuses_a_linked_layout_folder(tiny_run, tmp_path):
    from csn.training.loop import _prepare_dir

    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(Path(tiny_run) / "tables"), elsewhere)
    (Path(tiny_run) / "tables").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CsnError, match="tables is a symbolic link; csn never deletes through a link"):
        _prepare_dir(tiny_config(), Path(tiny_run), resume=False, force=True)
    assert (elsewhere / "training.parquet").is_file()


def test_force_deletes_only_what_csn_wrote(tiny_run, tmp_path, capsys):
    from csn.training.loop import _prepare_dir

    run_dir = Path(tiny_run)
    mine = {"notes.txt": "my notes", "report/analysis.ipynb": "{}", "tables/extra.csv": "a,b", "checkpoints/README": "x"}
    for rel, text in mine.items():
        (run_dir / rel).parent.mkdir(exist_ok=True)
        (run_dir / rel).write_text(text)
    (run_dir / "report" / "index.html").write_text("<html>")
    target = tmp_path / "target.parquet"
    target.write_text("not mine to delete")
    (run_dir / "tables" / "linked.parquet").symlink_to(target)
    _prepare_dir(tiny_config(), run_dir, resume=False, force=True)
    left = listing(run_dir)
    assert left == sorted(["checkpoints", "checkpoints/README", "notes.txt", "report", "report/analysis.ipynb",
                           "tables", "tables/extra.csv", "tables/linked.parquet"]), left
    assert all((run_dir / rel).read_text() == text for rel, text in mine.items()) and target.read_text()
    assert "kept 5 other file(s) there" in capsys.readouterr().err


@pytest.mark.parametrize("interrupt_at", [1, 2, 3, 8])
def test_force_interrupted_while_deleting_can_be_repeated(tiny_run, monkeypatch, interrupt_at):
    """--force deletes results first and run.json last: stopped part-way, the directory is still a run whose
    results go first (never a new run mixed with old tables), and --force again finishes the job."""
    from csn.training.loop import _prepare_dir

    out = Path(tiny_run)
    real, calls = Path.unlink, []

    def flaky_unlink(self, *a, **k):
        calls.append(self)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", flaky_unlink)
    with pytest.raises(KeyboardInterrupt):
        _prepare_dir(tiny_config(), out, resume=False, force=True)
    monkeypatch.setattr(Path, "unlink", real)
    assert (out / "run.json").is_file()
    if interrupt_at > 1:  # the tables go first, then the manifest
        assert not (out / "tables" / "training.parquet").exists()
    if interrupt_at > 2:
        assert read_manifest(out / "checkpoints") == []
    _prepare_dir(tiny_config(), out, resume=False, force=True)
    assert out.is_dir() and not any(out.iterdir())


def test_a_fresh_run_stopped_before_its_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    """A failure after the directory is made (here: the disk check) removes what the run wrote, and the folder."""
    from csn.training import loop

    def no_space(*a, **k):
        raise CsnError("not enough free disk space (simulated)")

    monkeypatch.setattr(loop, "check_disk_space", no_space)
    out = tmp_path / "a" / "r"
    with pytest.raises(CsnError, match="simulated"):
        loop.train(tiny_config(), out, progress=False)
    assert listing(tmp_path) == []  # the folders it made are gone too
