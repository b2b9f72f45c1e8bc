"""`csn reproduce --preset smoke` end to end: claims.json, the report and every figure it shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from csn.analysis.linearity import linear_model_path
from csn.cli import main as cli
from csn.errors import CsnError
from csn.experiments.claims import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, THRESHOLDS, peak_step
from csn.experiments.reproduce import _delete_reproduction, plan_text, reproduction
from csn.runs.io import checksum_problem, sha256_file
from csn.runs.run import Run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("repro") / "smoke"
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return out, res.output


def test_smoke_reproduction_prints_claims_and_report(smoke):
    out, output = smoke
    for claim in ("C1", "C2", "C3", "C4"):
        assert re.search(rf"^{claim}\s+inconclusive", output, re.M), output
    assert f"report: {out / 'report' / 'index.html'}" in output


def test_claims_json_structure(smoke):
    out, _ = smoke
    data = json.loads((out / "claims.json").read_text())
    assert data["thresholds"] == THRESHOLDS
    assert [c["claim"] for c in data["claims"]] == ["C1", "C2", "C3", "C4"]
    for c in data["claims"]:
        assert c["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
        assert c["statistic"] and c["rule"] and c["observed"]
        # smoke is declared too small to judge: inconclusive, saying what the rule alone gave
        assert c["verdict"] == INCONCLUSIVE and "too small" in c["observed"]
    for name in ("baseline-s0", "baseline-s1", "reg-from-0-s0", "reg-from-1-s1"):
        tables = out / name / "tables"
        assert (tables / "selectivity.parquet").is_file() and (tables / "training.parquet").is_file()
    assert (out / "baseline-s0" / "tables" / "ablation.parquet").is_file()
    assert (out / "baseline-s0" / "tables" / "linearity.parquet").is_file()
    assert (out / "reg-from-0-s0" / "tables" / "cka.parquet").is_file()


def test_the_plan_comes_first(smoke):
    _, output = smoke
    assert output.index("plan of study 'smoke'") < output.index("[1/16] train baseline-s0")
    # analyses start once the runs they read are trained (and the baseline's selectivity gives its peak); linearity
    # after the first seed's (the shared fit)
    def start(label: str) -> int:
        m = re.search(rf"^\[\d+/16\] {re.escape(label)}", output, re.M)
        assert m, (label, output)
        return m.start()

    assert start("final accuracy and selectivity of baseline-s0") > start("train baseline-s0")
    assert start("ablation of baseline-s0") > start("final accuracy and selectivity of baseline-s0")
    for cond in ("reg-from-0-s0", "reg-from-1-s1"):
        assert start(f"final accuracy, selectivity, CKA of {cond}") > start(f"train {cond}")
    assert start("linearity of baseline-s1") > start("linearity of baseline-s0")
    assert re.search(r"^median time per task: training .* \(planned .*\); baseline ", output, re.M), output
    assert output.index("claims (elapsed") < output.index("report (elapsed") < output.index("done (elapsed")
    assert "verdicts at 2 seeds" in output and "estimated time: about" in output


def _steps(run: Run, table: str) -> set[int]:
    t = run.read(table)
    return set() if t is None else set(t["step_a" if table == "cka" else "step"].unique().tolist())


def test_analyses_run_where_the_verdicts_read_them(smoke):
    """Baseline: selectivity from initialization through the first quarter and at the end, ablation and linearity at
    its selectivity peak and its end; regularized runs: selectivity and CKA at the end; one linear classifier fit,
    shared, checked by sha256."""
    out, output = smoke
    fits = []
    for seed in (0, 1):
        base = Run(out / f"baseline-s{seed}")
        steps = [c.step for c in base.checkpoints]
        peak = peak_step(base.read("selectivity"), steps[-1])
        assert 0 < peak < steps[-1] and _steps(base, "selectivity") == {s for s in steps if s <= steps[-1] / 4} | {
            steps[-1]} == {0, 2, 4, 16}
        assert _steps(base, "ablation") == _steps(base, "linearity") == {peak, steps[-1]}
        for cond in ("reg-from-0", "reg-from-1"):
            reg = Run(out / f"{cond}-s{seed}")
            assert _steps(reg, "selectivity") == {steps[-1]} == _steps(reg, "cka")
            assert not (reg.path / "tables" / "linearity.parquet").exists()
        path = linear_model_path(base)
        assert checksum_problem(path) is None
        fits.append(sha256_file(path))
    # one fit, in the first seed's task, copied to the other (analyses run in workers: their notes are not captured)
    assert fits[0] == fits[1]
    for seed in (0, 1):
        with safe_open(str(linear_model_path(Run(out / f"baseline-s{seed}"))), framework="pt") as f:
            assert json.loads(f.metadata()["csn_linear_model"])["fit_in"] == "baseline-s0"


def test_the_plan_of_a_finished_reproduction_has_nothing_left(smoke):
    out, _ = smoke
    rep = reproduction("smoke", out)
    assert all(w.todo == 0 for w in rep.work()) and rep.work()[0].total == 6
    text = plan_text(rep, power=[])
    assert "6 runs, 0 to train" in text and "median of 6 finished runs here" in text
    assert "analyses 0m00s" in text


def test_report_figures_exist_and_are_not_empty(smoke):
    out, _ = smoke
    page = out / "report" / "index.html"
    html = page.read_text()
    for heading in ("Claims and verdicts", "Class selectivity", "Ablation", "Linearity", "CKA"):
        assert heading in html
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert len(images) >= 8
    for src in images:
        f = page.parent / src
        assert f.is_file() and f.stat().st_size > 1000, src
    assert "http://" not in html and "https://" not in html


def test_existing_reproduction_needs_resume_and_resume_skips_done_work(smoke):
    out, _ = smoke
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smoke", "--out", str(out), "--quiet"])
    assert res.exit_code == 2 and "--resume" in res.output
    before = (out / "baseline-s0" / "checkpoints" / "manifest.jsonl").read_text()
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smoke", "--out", str(out), "--quiet", "--resume"])
    assert res.exit_code == 0, res.output
    assert (out / "baseline-s0" / "checkpoints" / "manifest.jsonl").read_text() == before
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smok", "--out", str(out)])
    assert res.exit_code == 2 and "closest: 'smoke'" in res.output


def _fake_reproduction(root: Path) -> Path:
    out = root / "study"
    for rel in ("reproduce.json", "claims.json", "regularize.parquet", "report/index.html", "report/c1.png",
                "baseline-s0/run.json", "baseline-s0/checkpoints/manifest.jsonl",
                "baseline-s0/checkpoints/step-00000000.safetensors", "baseline-s0/tables/selectivity.parquet",
                "notes.txt", "baseline-s0/mine.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("{}")
    return out


def test_force_deletes_only_what_csn_wrote_and_never_through_a_link(tmp_path):
    out = _fake_reproduction(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(out)
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smoke", "--out", str(link), "--force", "--quiet"])
    assert res.exit_code == 2 and "symbolic link" in res.output, res.output
    assert (out / "baseline-s0" / "checkpoints" / "step-00000000.safetensors").is_file()  # untouched
    before = sorted(p for p in out.rglob("*") if p.is_file())
    with pytest.raises(CsnError, match="keep your file .*mine.txt inside a run folder.*Nothing was deleted"):
        _delete_reproduction(out)  # the run could not be trained again beside the user's file: refused up front
    assert sorted(p for p in out.rglob("*") if p.is_file()) == before
    (out / "baseline-s0" / "mine.txt").rename(out / "mine.txt")
    _delete_reproduction(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == ["mine.txt", "notes.txt"]
