"""Messages that say the true cause (issue 15, item 8): Ctrl-C names the command line that continues THIS command;
`csn report` fails at once, in one line, where it cannot write, and on a full disk exits non-zero without leaving
a half page; `--parallel 0` is a one-line error. Each case ends in one `error:` line (or the interrupt line) and
a non-zero exit, with nothing half-written."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import matplotlib.figure
import pytest
from click.testing import CliRunner

import csn.cli.ablate
import csn.cli.experiment
import csn.cli.reproduce
import csn.experiments.runner as runner
from csn.cli import main
from csn.errors import CsnError
from csn.training import loop


def _interrupt(*a, **k):
    raise KeyboardInterrupt


# ============================================================================ Ctrl-C: how to continue THAT command
@pytest.mark.parametrize("argv, patch, again", [
    (["train", "--preset", "smoke", "--out", "r x", "--force", "epochs=3"], (loop, "train"),
     "run `csn train --preset smoke --out 'r x' epochs=3 --resume` to continue where it stopped."),
    (["reproduce", "--preset", "smoke", "--out", "rep"], (csn.cli.reproduce, "run"),
     "run `csn reproduce --preset smoke --out rep --resume` to continue where it stopped."),
    (["reproduce", "--preset", "smoke", "--resume"], (csn.cli.reproduce, "run"),
     "run `csn reproduce --preset smoke --resume` to continue where it stopped."),
    (["experiment", "regularize", "--preset", "smoke", "--seeds", "2", "--out", "exp"],
     (csn.cli.experiment, "regularize_experiment"),
     "run `csn experiment regularize --preset smoke --seeds 2 --out exp` to continue where it stopped."),
    (["ablate", "RUN", "--draws", "2"], (csn.cli.ablate, "run_analysis"),
     "run `csn ablate RUN --draws 2` to continue where it stopped."),
])
def test_interrupt_says_how_to_continue_that_command(tiny_run, monkeypatch, tmp_path, argv, patch, again):
    """The hint is the command line as typed, minus --force (it would delete the work), plus --resume where the
    command has that flag (train, reproduce); the other commands continue by themselves."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(*patch, _interrupt)
    argv = [str(tiny_run) if a == "RUN" else a for a in argv]
    again = again.replace("RUN", str(tiny_run))
    res = CliRunner().invoke(main, argv)
    assert res.exit_code == 130, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1] == f"interrupted: finished checkpoints and table rows are saved; {again}", res.output


def test_disk_full_names_the_command_that_continues(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rep" / "x.tmp"))

    monkeypatch.setattr(csn.cli.reproduce, "run", full)
    res = CliRunner().invoke(main, ["reproduce", "--preset", "smoke", "--out", str(tmp_path / "rep"), "--force"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == [
        f"error: the disk is full while writing {tmp_path / 'rep' / 'x.tmp'}; nothing half-written was kept (writes "
        f"are atomic), so free some space and run `csn reproduce --preset smoke --out {tmp_path / 'rep'} --resume` "
        "to continue where it stopped."]


# ============================================================================ report: cannot write, full disk
def _refuse_files_in(monkeypatch, folder: Path, code: int) -> None:
    """Every new file under `folder` fails with `code` (EACCES: a read-only folder even for root, who ignores
    permission bits). csn creates files only through tempfile.mkstemp (atomic writes), so this reaches them all."""
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(Path(dir) / "x"))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def _fill_disk_after(monkeypatch, n_ok: int) -> None:
    """The disk fills up after `n_ok` figure files were saved (savefig raises ENOSPC, as when writing a PNG)."""
    real, calls = matplotlib.figure.Figure.savefig, []

    def savefig(self, fname, *a, **k):
        calls.append(fname)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device", str(fname))
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["read-only folder", "read-only run", "full disk", "full disk, old page"])
def test_report_that_cannot_be_written_fails_at_once_and_leaves_no_half_page(tiny_run, monkeypatch, case):
    run = Path(tiny_run)
    out = run / "report"
    if case == "full disk, old page":  # an earlier page stays whole
        assert CliRunner().invoke(main, ["report", str(run), "--quiet"]).exit_code == 0
    elif case == "read-only folder":
        out.mkdir()
        (out / "index.html").write_text("old page")
    before = _files(run)
    if case.startswith("read-only"):
        _refuse_files_in(monkeypatch, out, errno.EACCES)
        if case == "read-only run":  # report/ cannot even be made
            real_mkdir = Path.mkdir

            def mkdir(self, *a, **k):
                if self == out:
                    raise PermissionError(errno.EACCES, "Permission denied", str(self))
                return real_mkdir(self, *a, **k)

            monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        _fill_disk_after(monkeypatch, 1)  # the first figure's PNG fits, its SVG does not
    res = CliRunner().invoke(main, ["report", str(run), "--quiet"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output  # at once: no "not drawn" lines first
    if case.startswith("read-only"):
        assert f"Permission denied: {out}" in lines[0] and "choose a location you can write to" in lines[0]
    else:
        assert lines[0].startswith("error: the disk is full while writing ")
        assert lines[0].endswith(f"run `csn report {run} --quiet` to continue where it stopped.")
    assert _files(run) == before  # no half page: no new figure, no index.html, no temporary file
    assert out.exists() == ("read-only folder" in case or "old page" in case)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_report_into_a_really_read_only_folder(tiny_run):
    out = Path(tiny_run) / "report"
    out.mkdir()
    out.chmod(0o555)
    try:
        res = CliRunner().invoke(main, ["report", str(tiny_run), "--quiet"])
    finally:
        out.chmod(0o755)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "Permission denied" in res.output, res.output
    assert list(out.iterdir()) == []


def test_a_figure_that_fails_for_another_reason_is_still_a_note(tiny_run, monkeypatch):
    """Only a write the system refuses stops the page; a figure that fails on its data stays a note on the page."""
    real, calls = matplotlib.figure.Figure.savefig, []

    def savefig(self, fname, *a, **k):
        calls.append(fname)
        if len(calls) == 1:
            raise ValueError("a bad panel")
        return real(self, fname, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    res = CliRunner().invoke(main, ["report", str(tiny_run), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "could not be drawn: a bad panel" in (Path(tiny_run) / "report" / "index.html").read_text()


# ============================================================================ --parallel
@pytest.mark.parametrize("value, message", [
    ("0", "--parallel must be >= 1, got '0'."),
    ("-2", "--parallel must be >= 1, got '-2'."),
    ("two", "--parallel expects an integer, got 'two'."),
    ("1.5", "--parallel expects an integer, got '1.5'."),
])
def test_parallel_below_one_is_an_error(tmp_path, value, message):
    out = tmp_path / "exp"
    res = CliRunner().invoke(main, ["experiment", "regularize", "--preset", "smoke", "--parallel", value,
                                    "--out", str(out), "--seeds", "1", "--quiet"])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"error: {message}"]
    assert not out.exists()


def test_run_jobs_refuses_parallel_below_one(tmp_path):
    from tests.conftest import tiny_config

    with pytest.raises(CsnError, match=r"option 'parallel' must be >= 1, got 0"):
        runner.run_jobs([runner.Job(tiny_config(), tmp_path / "r")], parallel=0, progress=False)
    assert not (tmp_path / "r").exists()
    assert runner.RunnerOptions().parallel == 2  # the CLI's default comes from the schema
