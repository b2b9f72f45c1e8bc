"""The HTML report: discovery and grouping of runs, sections from tables, claims, missing-table notes,
relative figure paths, the `csn report` command, and a real headless-browser check (chromium)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity
from csn.cli import main as cli
from csn.errors import CsnError
from csn.experiments.claims import THRESHOLDS, Verdict
from csn.report.html import build_report, discover_runs, group_runs
from csn.runs import Run, write_json, write_table

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "scripts" / "check_report.py"
CHROMIUM = Path("/usr/bin/chromium")


def _refs(html: str) -> list[str]:
    """Every src= and href= of the page (anchors excluded)."""
    return [unquote(u) for u in re.findall(r'(?:src|href)="([^"#][^"]*)"', html)]


def _assert_self_contained(index: Path) -> str:
    html = index.read_text()
    refs = _refs(html)
    assert refs, "the page references no figure"
    for u in refs:
        assert not re.match(r"^[a-z]+:", u) and not u.startswith("//") and not u.startswith("/"), u
        f = index.parent / u
        assert f.is_file() and f.stat().st_size > 0, f"{u} is missing or empty"
    assert "<script" not in html.lower() and "http://" not in html and "https://" not in html
    assert "could not be drawn" not in html
    return html


@pytest.fixture(scope="module")
def selectivity_run(tiny_run_master, tmp_path_factory) -> Path:
    """A copy of the tiny run with a selectivity table."""
    dst = tmp_path_factory.mktemp("report") / "tiny"
    shutil.copytree(tiny_run_master, dst)
    # init, an early checkpoint (BN re-estimated), epoch 1 and the last: enough for every figure, and fast
    run_analysis(dst, Selectivity(), checkpoints="step=0,step=2,step=8,step=16", progress=False, log=lambda s: None)
    return dst


@pytest.fixture(scope="module")
def single_report(selectivity_run) -> Path:
    return build_report([selectivity_run], progress=False)


def test_single_run_report(single_report, selectivity_run):
    assert single_report == selectivity_run / "report" / "index.html"
    html = _assert_self_contained(single_report)
    for heading in ("Runs, configuration and versions", "Training", "Class selectivity (C1)", "Not in this report"):
        assert f">{heading}</" in html, heading
    assert "training.png" in html and "selectivity_stages.png" in html and "selectivity_distribution.png" in html
    # missing tables: one-line notes naming the command
    assert "no ablation table: run <code>csn ablate RUN</code>." in html
    assert "no linearity table: run <code>csn linearity RUN</code>." in html
    assert "no CKA table" in html and "no regularized runs" in html
    # versions, configuration, BN re-estimation as recorded in the table
    assert "torch 2." in html and "resnet8" in html and "steps/epoch" in html
    assert "selectivity: BatchNorm statistics re-estimated from" in html
    assert "Claims and verdicts" not in html  # no claims given, no claims.json
    assert ">CSI peak<" in html and ">layer3<" in html  # the key-number table per stage


def test_claims_table_and_out_paths(tiny_run, tmp_path):
    verdicts = [
        Verdict("C1", "reproduced", "mean CSI per stage", "peak early", "layer1 peaks at 0.12 <then> recedes"),
        Verdict("C2", "not reproduced", "area gap", "gap < -0.02", "gap +0.01"),
        {"claim": "C3", "verdict": "inconclusive", "statistic": "linearity", "rule": "drop >= 0.05",
         "observed": "no linearity table was found."},
    ]
    out = tmp_path / "elsewhere"
    index = build_report(tiny_run, out=out, claims=verdicts, title="My <report>", progress=False)
    assert index == out / "index.html"
    html = _assert_self_contained(index)
    assert "<title>My &lt;report&gt;</title>" in html
    assert 'class="verdict ok">reproduced<' in html
    assert 'class="verdict bad">not reproduced<' in html
    assert 'class="verdict warn">inconclusive<' in html
    assert "0.12 &lt;then&gt; recedes" in html  # escaped, never raw markup
    assert html.index("Claims and verdicts") < html.index("Runs, configuration and versions")
    for k in THRESHOLDS:  # every threshold printed with the claims
        assert f"<code>{k}</code>" in html
    assert "no selectivity table: run <code>csn selectivity RUN</code>." in html
    # an explicit .html path
    page = build_report([tiny_run], out=tmp_path / "x" / "page.html", progress=False)
    assert page.name == "page.html" and (page.parent / "training.png").is_file()


def _synthetic_tables(run: Run, seed: int) -> None:
    """Small ablation and linearity tables (no model runs) so every section is exercised cheaply."""
    rng = np.random.default_rng(seed)
    ck = run.checkpoints
    first, last = ck[0], ck[-1]
    rows = []
    for c in (first, last):
        for stage in ("layer1", "layer2"):
            for order, draws in (("selective", [0]), ("random", [0, 1])):
                for d in draws:
                    for n in range(5):
                        acc = 0.9 * (1 - n / 5 * (0.8 if order == "selective" and c is first else 0.4)) + rng.normal(0, .01)
                        rows.append(dict(step=c.step, epoch=c.epoch, stage=stage, order=order, n=n, fraction=n / 4,
                                         draw=d, top1=acc, top5=np.nan, loss=1.0, correct=int(acc * 128), total=128,
                                         rank_split="test", score_split="test", bn_recalibrated=8 if c is first else 0,
                                         mode="zero", seed=0))
    run.write("ablation", pd.DataFrame(rows))
    lin = []
    for i, c in enumerate(ck):
        for m, v in (("acc", 0.3 + 0.1 * i), ("linear_agreement", 0.9 - 0.1 * i), ("linearized_agreement_init", 1 - 0.1 * i),
                     ("relu_same_as_init", 1 - 0.05 * i)):
            lin.append(dict(step=c.step, epoch=c.epoch, measure=m, value=v + rng.normal(0, .01), split="test",
                            samples=128, bn_recalibrated=8 if c.epoch < 1 else 0))
    run.write("linearity", pd.DataFrame(lin))


@pytest.fixture()
def experiment(tiny_run_master, tmp_path) -> Path:
    """An experiment directory: baseline-s0, baseline-s1, reg-from-0-s0 (copies of the tiny run), with
    synthetic analysis tables, a CKA table between runs, regularize.parquet and claims.json."""
    exp = tmp_path / "exp"
    for name in ("baseline-s0", "baseline-s1", "reg-from-0-s0"):
        shutil.copytree(tiny_run_master, exp / name, ignore=shutil.ignore_patterns("*.safetensors"))
    for i, name in enumerate(("baseline-s0", "baseline-s1")):
        _synthetic_tables(Run(exp / name), i)
    ck = Run(exp / "reg-from-0-s0").checkpoints
    cka = [dict(run_a="reg-from-0-s0", step_a=c.step, layer_a=l, run_b="baseline-s0", step_b=c.step, layer_b=l,
                cka=1 - 0.05 * i, epoch_a=c.epoch, epoch_b=c.epoch, comparison="runs", split="test", samples=128,
                bn_recalibrated=0, bn_recalibrated_b=0) for i, c in enumerate(ck) for l in ("layer1.0", "logits")]
    Run(exp / "reg-from-0-s0").write("cka", pd.DataFrame(cka))
    write_table(exp / "regularize.parquet", pd.DataFrame([
        dict(condition="baseline", onset=np.nan, alpha=0.0, seeds=2, final_test_acc_mean=0.9, final_test_acc_se=0.01,
             final_csi_mean=0.3, final_csi_se=0.01, final_eta2_mean=0.5, final_eta2_se=0.01,
             final_test_acc_per_seed="0.8900, 0.9100"),
        dict(condition="reg-from-0", onset=0.0, alpha=-2.0, seeds=1, final_test_acc_mean=0.85, final_test_acc_se=np.nan,
             final_csi_mean=0.1, final_csi_se=np.nan, final_eta2_mean=0.5, final_eta2_se=np.nan,
             final_test_acc_per_seed="0.8500")]))
    write_json(exp / "claims.json", {"thresholds": THRESHOLDS, "claims": [
        Verdict("C4", "not reproduced", "final accuracy", "harm >= 0.005", "from 0 costs 0.05").to_dict()]})
    return exp


def test_experiment_report(experiment):
    index = build_report([experiment], progress=False)
    assert index == experiment / "report" / "index.html"
    html = _assert_self_contained(index)
    assert "3 runs in 2 conditions" in html and "baseline (2 seeds)" in html
    assert "from 0 costs 0.05" in html and "(from claims.json)" in html  # claims.json picked up
    for heading in ("Ablation: selective vs random units (C2)", "Linearity (C3)",
                    "Suppressing selectivity: regularization onsets (C4)", "Representational similarity (CKA)"):
        assert f">{heading}</" in html, heading
    assert "regularize.parquet" in html and "0.8900, 0.9100" in html
    assert "reg-from-0 vs baseline" in html  # CKA between conditions, grouped by run name
    assert "figures of baseline-s1" in html  # the second seed's ablation figures, folded
    assert "gap (selective − random)" in html
    assert "no selectivity table: run <code>csn selectivity RUN</code>." in html


def _run_json(seed: int) -> dict:
    """A minimal valid run.json (csn validates run.json against its schema on opening a run)."""
    from tests.conftest import tiny_config

    data = {"name": "synthetic", "num_classes": 4, "in_channels": 1, "image_size": 8,
            "class_names": ["a", "b", "c", "d"], "num_train": 256, "num_test": 128}
    return {"config": tiny_config(seed=seed).to_dict(), "data": data, "seed": seed, "steps_per_epoch": 8,
            "total_steps": 16}


def test_discovery_and_grouping(tmp_path):
    for name, seed in (("reg-from-1-s0", 0), ("baseline-s10", 10), ("baseline-s2", 2), ("reg-from-0.5-s1", 1),
                       ("custom", 7)):
        (tmp_path / "e" / name).mkdir(parents=True)
        (tmp_path / "e" / name / "run.json").write_text(json.dumps(_run_json(seed)))
    (tmp_path / "e" / "report").mkdir()  # not a run: ignored
    runs, exp = discover_runs([tmp_path / "e"])
    assert exp == tmp_path / "e" and len(runs) == 5
    groups = group_runs(runs)
    assert [g.name for g in groups] == ["baseline", "reg-from-0.5", "reg-from-1", "custom"]
    assert [r.name for r in groups[0].runs] == ["baseline-s2", "baseline-s10"] and groups[0].seeds == [2, 10]
    assert groups[3].seeds == [7]  # a lone run: its own group, seed from run.json
    # the same run given twice counts once; a run dir and its experiment dir together too
    runs2, _ = discover_runs([tmp_path / "e" / "custom", tmp_path / "e"])
    assert len(runs2) == 5
    with pytest.raises(CsnError, match="holds no csn run"):
        discover_runs([tmp_path / "e" / "report"])
    with pytest.raises(CsnError, match="does not exist"):
        discover_runs([tmp_path / "nope"])


def test_cli_report(tiny_run, tmp_path):
    res = CliRunner().invoke(cli, ["report", str(tiny_run), "--out", str(tmp_path / "r"), "--title", "T", "--quiet"])
    assert res.exit_code == 0, res.output
    index = Path(res.output.strip().splitlines()[-1])
    assert index == tmp_path / "r" / "index.html" and index.is_file()
    assert "<h1>T</h1>" in index.read_text()
    assert CliRunner().invoke(cli, ["report", "--help"]).exit_code == 0


@pytest.mark.parametrize("make", ["missing", "file", "empty_dir"])
def test_cli_report_bad_path(tmp_path, make):
    p = tmp_path / "x"
    if make == "file":
        p.write_text("hi")
    elif make == "empty_dir":
        p.mkdir()
    res = CliRunner().invoke(cli, ["report", str(p)])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert not (tmp_path / "x" / "report").exists()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="/usr/bin/chromium is not installed (scripts/setup.sh installs it)")
def test_report_in_headless_chromium(single_report, tmp_path):
    shot = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(CHECK), str(single_report), "--screenshot", str(shot), "--min-images", "3"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "images loaded" in proc.stdout and shot.is_file() and shot.stat().st_size > 10_000
    # the checker does fail on a broken image and a console error
    bad = tmp_path / "bad" / "index.html"
    bad.parent.mkdir()
    bad.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>b</title></head><body><h1>b</h1>'
                   '<p>enough text to count as a rendered page, more than fifty characters.</p>'
                   '<img src="missing.png"><script>console.error("boom")</script></body></html>')
    proc = subprocess.run([sys.executable, str(CHECK), str(bad)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 1
    assert "image did not load: missing.png" in proc.stderr and "console.error: boom" in proc.stderr


def test_cli_report_corrupt_claims(tiny_run_master, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(tiny_run_master, exp / "baseline-s0", ignore=shutil.ignore_patterns("*.safetensors"))
    (exp / "claims.json").write_text("{not json")
    res = CliRunner().invoke(cli, ["report", str(exp)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "claims.json is unreadable" in res.output, res.output
    assert not (exp / "report").exists()  # nothing written
