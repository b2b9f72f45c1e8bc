"""`csn reproduce`'s plan: --dry-run prints the runs, the analyses and where, the estimated time and each verdict's
power, minimal detectable effect and seeds needed (claims.planned_power at the study's seeds and spread), and writes
nothing; the runner's bar counts optimizer steps across runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from csn.cli import main as cli
from csn.errors import CsnError
from csn.experiments.claims import Spread, planned_power
from csn.experiments.reproduce import StudyRequest, reproduction
from csn.experiments.runner import Job, Progress, train_task
from csn.runs.config import preset
from csn.runs.run import Checkpoint, write_manifest

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _rows(text: str) -> dict[str, list[str]]:
    """The verdict rows of a plan: claim -> [power, MDE, seeds needed]."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^\s{4}(C[1-4])\s+\S+ .+?\s+(\d\.\d\d)\s+(\S+)\s+(\S+( \d+)?)$", line)
        if m:
            rows[m.group(1)] = [m.group(2), m.group(3), m.group(4)]
    return rows


def _expected(seeds: int, spread: Spread = Spread()) -> dict[str, list[str]]:
    out = {}
    for r in planned_power(seeds, spread):
        mde = "-" if r["mde"] == float("inf") else f"{r['mde']:.4g}"
        out[r["claim"]] = [f"{r['power']:.2f}", mde, "> 50" if r["seeds_needed"] is None else str(r["seeds_needed"])]
    return out


def _dry(tmp_path: Path, *args: str) -> str:
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["reproduce", "--dry-run", "--out", str(out), *args])
    assert res.exit_code == 0, res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, here or in ./runs
    return res.output


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _dry(tmp_path, "--preset", "smoke")
    assert "plan of study 'smoke'" in text and "3 conditions x 2 seeds = 6 runs, 6 to train, 2 at a time" in text
    # smoke: 7 checkpoints per run (0, 2, 4, 6, 8, 12, 16); selectivity 2 x 4 (0, 2, 4 = the first quarter, and 16)
    # + 4 x 1, ablation and linearity 2 x 2, CKA 4 x 1
    for what, n in (("selectivity", 12), ("ablation", 4), ("linearity", 4), ("linear_fit", 1), ("cka", 4)):
        assert re.search(rf"^  {what} .* {n}\s+{n}$", text, re.M), (what, text)
    assert "estimated time: about" in text and "judge = false" in text
    assert _rows(text) == _expected(2)
    text = _dry(tmp_path, "--preset", "smoke", "--seeds", "3", "--set", "study.cka_checkpoints=[]",
                "--set", "study.spread.c4_run_sd=0.003")
    assert "3 conditions x 3 seeds = 9 runs" in text and re.search(r"^  cka +off .* 0\s+0$", text, re.M)
    assert _rows(text) == _expected(3, Spread(c4_run_sd=0.003))


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_the_fmnist_plan_decides_c4_at_its_seeds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = _dry(tmp_path)
    assert "3 conditions x 5 seeds = 15 runs, 15 to train" in text and "2 epochs x 468 steps = 936 steps" in text
    rows = _rows(text)
    assert rows == _expected(5) and float(rows["C4"][0]) >= 0.8


def _job(root: Path, name: str, steps: list[int]) -> Job:
    out = root / name
    (out / "checkpoints").mkdir(parents=True)
    write_manifest(out / "checkpoints", [Checkpoint(s, s / 10, f"step-{s:08d}.safetensors", "0" * 64) for s in steps])
    return Job(preset("smoke"), out)


def test_the_runner_counts_optimizer_steps_from_the_manifests(tmp_path, monkeypatch):
    """Parallel runs report progress through their manifests (the parent reads them; training is not touched)."""
    monkeypatch.setenv("CSN_NO_PROGRESS", "0")
    a, b = _job(tmp_path, "a", [0, 8, 16]), _job(tmp_path, "b", [0])
    c = Job(preset("smoke"), tmp_path / "c")  # not started: no folder yet
    tasks = [train_task(j, steps=16) for j in (a, b, c)]
    for t in tasks:
        t.kind = "training runs"
    bars = Progress(tasks, {str(a.out)}, "", progress=True, unit="step")
    assert (bars.pbar.total, bars.pbar.n) == (48, 16) and "training runs 1/3" in bars.pbar.desc
    write_manifest(b.out / "checkpoints", [Checkpoint(s, s / 10, "x", "0" * 64) for s in (0, 4, 8)])
    bars.poll()
    assert bars.pbar.n == 24
    bars.task_done(str(b.out))
    assert "training runs 2/3" in bars.pbar.desc and bars.pbar.n == 32
    bars.close()
    runs = Progress([train_task(j) for j in (a, b)], {str(a.out)}, "runs", progress=True, unit="run")
    assert (runs.pbar.total, runs.pbar.n) == (2, 1) and runs.pbar.desc.startswith("runs training 1/2")
    runs.task_done(str(b.out))
    assert runs.pbar.n == 2
    runs.close()


def test_reproduction_takes_its_options_as_one_study_request(tmp_path):
    """reproduce/reproduction take a StudyRequest's keys as keywords (no function of 9+ parameters); a misspelt one
    is one sentence naming the closest, before anything is read."""
    with pytest.raises(CsnError, match=r"unknown reproduce option 'sedes' \(closest: 'seeds'\)"):
        reproduction("smoke", tmp_path / "out", sedes=2)
    req = StudyRequest(model=None, sets=("train.model=resnet8",), config=None)
    assert req.model_typed and req.source("smoke") == "study preset smoke"
    assert StudyRequest(config="s.toml").source(None) == "study file s.toml" and not StudyRequest().model_typed
    rep = reproduction("smoke", tmp_path / "out", seeds=1, progress=False, config=None)
    assert rep.study.seeds == 1 and not rep.progress
