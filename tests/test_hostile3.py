"""Hostile input, third round (issue 26): code named by data, memory after a raised limit, paths, rows with
provenance, a report while an analysis writes, file modes, and messages that named the wrong cause.

Every case is a command that ends in one `error:` line and exit status 2 (1 for `csn verify` findings), with
nothing half-written and no traceback; every hostile file is generated here (tests/test_hostile.py's style).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from csn.cli import main
from csn.errors import CsnError
from csn.models import trusting_code
from csn.runs.config import check_model, data_info, load_data
from tests.conftest import tiny_config
from tests.test_hostile import SMOKE, listing, refused

# ============================================================================ 1. code named by data
FACTORIES = '''
import pathlib, sys
import torch
from torch import nn

pathlib.Path(__file__).with_name("imported.txt").write_text("the module's top-level code ran")


class Net(nn.Module):
    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, num_classes)
        self.csn_stages = {"a": ["features.1"], "b": ["features.3"]}

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(num_classes, in_channels, width=1.0):
    return Net(num_classes, in_channels)


def exits():
    sys.exit(0)


def asks():
    return Net(4, int(input("channels? ")))


def debugs():
    breakpoint()
    return Net(4, 1)


def pdb_debugs():
    import pdb
    pdb.set_trace()
    return Net(4, 1)


def interrupts():
    raise KeyboardInterrupt


def three():
    return 3


def four_classes():
    return Net(4, 1)


class NotAModule:
    pass


instance = Net(4, 1)
'''


@pytest.fixture()
def factories(tmp_path, monkeypatch):
    """A module `hostile_nets` on sys.path whose import leaves imported.txt beside it (so a test can tell
    whether csn ran its top-level code)."""
    d = tmp_path / "code"
    d.mkdir()
    (d / "hostile_nets.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(d))
    sys.modules.pop("hostile_nets", None)
    yield d
    sys.modules.pop("hostile_nets", None)


def test_code_named_by_a_config_file_needs_trust_code(tmp_path, monkeypatch, factories):
    """A config file naming 'package.module:factory' runs nothing without --trust-code (the module is not even
    imported); the file cannot grant it; with the flag on the command line it trains."""
    monkeypatch.chdir(tmp_path)
    Path("c.toml").write_text('preset = "smoke"\nmodel = "hostile_nets:build"\nepochs = 0.25\ntrust_code = true\n')
    assert "unknown config key 'trust_code'" in refused(["train", "--config", "c.toml", "--out", "r", "--quiet"])
    Path("c.toml").write_text('preset = "smoke"\nmodel = "hostile_nets:build"\nepochs = 0.25\n')
    msg = refused(["train", "--config", "c.toml", "--out", "r", "--quiet"])
    assert msg == ("error: config file c.toml names the model 'hostile_nets:build', Python code csn would import and "
                   "run; if you trust it, pass --trust-code on the command line (a file can never grant it; in Python: "
                   "`with csn.models.trusting_code(): ...`)."), msg
    Path("this.toml").write_text('preset = "smoke"\nmodel = "this:s"\n')  # importing `this` prints the Zen of Python
    assert "names the model 'this:s', Python code" in refused(["train", "--config", "this.toml", "--out", "r"])
    assert "this" not in sys.modules or sys.modules["this"] is not None
    assert not (factories / "imported.txt").exists() and not Path("r").exists()
    out = refused(["train", "--config", "c.toml", "--out", "r", "--quiet", "--threads", "1", "--trust-code"], code=0)
    assert "run written to r" in out and (factories / "imported.txt").exists()


def test_code_typed_on_the_command_line_is_explicit(tmp_path, monkeypatch, factories):
    monkeypatch.chdir(tmp_path)
    out = refused([*SMOKE, "--out", "r", "--model", "hostile_nets:build", "epochs=0.25", "width=1"], code=0)
    assert "run written to r" in out
    out = refused([*SMOKE, "--out", "r2", "model=hostile_nets:build", "epochs=0.25", "width=1"], code=0)
    assert "run written to r2" in out


@pytest.mark.parametrize("spec, pattern", [
    ("sys:exit", r"model 'sys:exit': sys\.exit is a built-in function, not a Python function or nn\.Module class"),
    ("builtins:input", r"builtins\.input is a built-in function"),
    ("builtins:breakpoint", r"builtins\.breakpoint is a built-in function"),
    ("builtins:dict", r"builtins\.dict is the class dict, which is no nn\.Module"),
    ("hostile_nets:NotAModule", r"is the class NotAModule, which is no nn\.Module"),
    ("hostile_nets:instance", r"hostile_nets\.instance is a Net object, not a Python function"),
    ("hostile_nets:exits", r"model 'hostile_nets:exits' called sys\.exit\(0\) while it was imported or built; a "
                           r"factory must return the model, not stop csn: fix the factory\."),
    ("hostile_nets:interrupts", r"raised KeyboardInterrupt while it was imported or built"),
    ("hostile_nets:debugs", r"called breakpoint\(\) while it was imported or built; csn builds models without a debugger"),
    ("hostile_nets:three", r"returned int, not a torch\.nn\.Module"),
])
def test_factories_that_are_no_model_factory(tmp_path, monkeypatch, factories, spec, pattern):
    """Builtins are refused before they are called; a Python factory that exits, waits on stdin, enters the
    debugger or is interrupted is one error (stdin reads from /dev/null while it runs); nothing is written."""
    import re

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    msg = refused([*SMOKE, "--out", "r", "--model", spec, "width=1"])
    assert re.search(pattern, msg), msg
    assert listing(tmp_path / "work") == []
    assert sys.breakpointhook is sys.__breakpointhook__ or "pytest" in repr(sys.breakpointhook)


def test_the_debugger_and_stdin_in_a_real_process(tmp_path, factories):
    """pdb.set_trace() in a factory (pytest's own pdb hooks stay out of a subprocess) and a stdin that never
    ends: one error each, at once."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(factories), *sys.path])}
    for spec, pattern in (("hostile_nets:pdb_debugs", "entered the debugger and quit it while it was imported or built"),
                          ("hostile_nets:asks", "(EOFError: EOF when reading a line)")):
        with subprocess.Popen([sys.executable, "-m", "csn", *SMOKE, "--out", str(tmp_path / "r"), "--model", spec,
                               "width=1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env, text=True) as p:  # stdin stays open: a prompt would wait for ever
            out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "Traceback" not in err and pattern in err.strip().splitlines()[-1], (out, err)
    assert not (tmp_path / "r").exists()


def test_a_run_that_names_code_is_read_back_only_with_trust_code(tmp_path, monkeypatch, factories):
    """run.json is data too: the analyses and verify build its model only with --trust-code."""
    monkeypatch.chdir(tmp_path)
    refused([*SMOKE, "--out", "r", "--model", "hostile_nets:build", "epochs=0.25", "width=1"], code=0)
    msg = refused(["selectivity", "r", "--checkpoints", "last"])
    assert msg.startswith("error: r/run.json names the model 'hostile_nets:build', Python code csn would import"), msg
    assert not Path("r/tables/selectivity.parquet").exists()
    assert "--trust-code" in refused(["ablate", "r", "--checkpoints", "last", "--draws", "1"])
    refused(["selectivity", "r", "--checkpoints", "last", "--trust-code", "--quiet"], code=0)
    assert Path("r/tables/selectivity.parquet").is_file()
    msg = refused(["selectivity", "r", "--checkpoints", "first"])  # the flag held for that command only
    assert "names the model 'hostile_nets:build'" in msg
    out = refused(["verify", "r"], code=0)
    assert "r: ok" in out and "not against the model: pass --trust-code to build it" in out, out
    out = refused(["verify", "r", "--trust-code"], code=0)
    assert "r: ok" in out and "note" not in out, out
    msg = refused(["train", "--resume", "--out", "r", "--quiet"])
    assert "r/run.json names the model 'hostile_nets:build'" in msg, msg


def test_check_model_for_the_study_side(factories):
    """What a study loader calls for every model before any run starts."""
    cfg = tiny_config(model="hostile_nets:build", width=1.0)
    info = data_info(load_data(cfg))
    with pytest.raises(CsnError, match="study file s.toml names the model 'hostile_nets:build'"):
        check_model(cfg, info, trust_code=False, where="study file s.toml")
    assert not (factories / "imported.txt").exists()
    check_model(cfg, info, trust_code=True, where="study file s.toml")
    check_model(tiny_config(), info, trust_code=False, where="study file s.toml")  # csn's own model: no flag needed
    with pytest.raises(CsnError, match="called sys.exit"):
        check_model(tiny_config(model="hostile_nets:exits", width=1.0), info, trust_code=True, where="s.toml")
    with pytest.raises(CsnError, match=r"returns \(2, 4\) for 2 images, not logits of shape \(2, 3\)"):
        check_model(tiny_config(model="hostile_nets:four_classes", width=1.0), {**info, "num_classes": 3},
                    trust_code=True, where="s.toml")
    with trusting_code():
        from csn.runs.config import build_model_for

        assert build_model_for(cfg, info) is not None


# ============================================================================ 2. memory after a raised limit
def test_ablation_memory_and_disk_bound_whatever_the_count_limit(tiny_run, monkeypatch):
    """--max-points raises the count limit, never what memory and disk can hold: 87 billion points (60.9 TB of
    rows in memory) are refused at once instead of growing until the OOM killer ends the process."""
    import time

    from csn.core import resources

    t0 = time.perf_counter()
    msg = refused(["ablate", tiny_run, "--draws", "1000000000", "--max-points", "1000000000000"])
    assert time.perf_counter() - t0 < 60
    assert "x 1,000,000,002 orders and draws = 203,000,000,406 points) needs about 142.1 TB of memory, but this machine " \
           "has" in msg and "available; fewer --draws, --checkpoints or --stages, or a coarser --grid (--max-points " \
           "raises the count limit only)." in msg, msg
    monkeypatch.setattr(resources, "available_memory", lambda: 10**15)  # memory enough: the disk is next
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: type("U", (), {"free": 10**6})())
    msg = refused(["ablate", tiny_run, "--draws", "100000", "--max-points", "1000000000000"])
    assert "not enough free disk space in" in msg and "the rows of this ablation request" in msg \
           and "= 20,300,406 points) need about 512.6 MB but only 1 MB are free" in msg, msg
    assert not (Path(tiny_run) / "tables" / "ablation.parquet").exists()


# ============================================================================ 3. paths
@pytest.mark.parametrize("case", ["300-byte name", "4,421-byte path", "/proc/self", "newline in --out", "newline in name="])
def test_out_paths_refused_before_any_work(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    deep = "/".join(["d" * 200] * 22)  # 4,421 bytes: every name fits, the path does not
    args = {"300-byte name": ["--out", "a" * 300], "4,421-byte path": ["--out", deep],
            "/proc/self": ["--out", "/proc/self/csnrun"], "newline in --out": ["--out", "new\nline"],
            "newline in name=": ["name=new\nline"]}[case]
    want = {"300-byte name": "error: --out has a folder name of 300 bytes (aaaaaaaaaaaaaaaaaaaaaaaa...); this file system "
                             "takes at most 255 a name: choose a shorter name.",
            "4,421-byte path": f"error: --out is {len(str(tmp_path / deep).encode()):,} bytes long as an absolute path; "
                               "with the files csn writes inside it (up to 128 bytes more) it must stay under 4,096: "
                               "choose a shorter path.",
            "/proc/self": "error: --out /proc/self/csnrun cannot be made: /proc/self takes no new folder (No such file or "
                          "directory); choose a folder on a disk you can write to.",
            "newline in --out": "error: --out 'new\\nline' holds a control character ('\\n'); csn writes this path into "
                                "run.json, tables and messages: choose a name without control characters.",
            "newline in name=": "error: run name 'new\\nline' holds a control character ('\\n'), which would become "
                                "part of the folder runs/<name>; choose a plain name (letters, digits, '-', '_', '.') or "
                                "pass --out DIR."}[case]
    if case == "/proc/self" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc")
    assert refused([*SMOKE, *args]) == want
    assert listing(tmp_path) == []


def test_an_empty_out_folder_is_a_new_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    assert "run written to empty" in refused([*SMOKE, "--out", "empty", "epochs=0.25"], code=0)
    assert Path("empty/run.json").is_file()


def test_force_refuses_a_linked_run_json(tiny_run, tmp_path):
    """--force never says it kept run.json and then replaces the link: a link where csn writes its own file
    stops it before anything is deleted."""
    run_dir = Path(tiny_run)
    mine = tmp_path / "mine.json"
    (run_dir / "run.json").rename(mine)
    (run_dir / "run.json").symlink_to(mine)
    before = listing(run_dir)
    msg = refused([*SMOKE, "--out", run_dir, "--force"])
    assert msg == (f"error: {run_dir}/run.json is a symbolic link where csn writes its own file; csn never deletes or "
                   "writes through a link: remove the link yourself (what it points to stays) or choose another "
                   "directory."), msg
    assert listing(run_dir) == before and (run_dir / "run.json").is_symlink() and mine.is_file()


# ============================================================================ 4. rows with provenance
def _sha_by_step(run_dir) -> dict[int, str]:
    from csn.runs import Run

    return {c.step: c.sha256 for c in Run(run_dir).checkpoints}


def test_rows_record_their_checkpoint_and_a_replaced_checkpoint_is_recomputed(tiny_run):
    """A checkpoint replaced after `csn selectivity` (its manifest sha256 updated too): verify names the stale rows
    (exit 1), and a re-run recomputes them with one note."""
    import pandas as pd

    from tests.test_hostile import _rewrite_checkpoint

    run_dir = Path(tiny_run)
    refused(["selectivity", run_dir, "--checkpoints", "first,last", "--quiet"], code=0)
    sel = pd.read_parquet(run_dir / "tables" / "selectivity.parquet")
    shas = _sha_by_step(run_dir)
    assert (sel["checkpoint_sha256"] == sel["step"].map(shas)).all()
    assert pd.read_parquet(run_dir / "tables" / "class_means.parquet")["checkpoint_sha256"].notna().all()
    last = max(shas)
    _rewrite_checkpoint(run_dir, lambda t: {k: (v * 1.5 if k.startswith("layer1") and v.is_floating_point() else v)
                                            for k, v in t.items()})
    out = refused(["verify", run_dir], code=1)
    assert (f"table {run_dir}/tables/selectivity.parquet holds rows of step(s) {last} computed from other weights than "
            "the checkpoint now in the manifest (their checkpoint_sha256 differs): run the analysis that wrote it again "
            "to recompute them.") in out and "class_means.parquet holds rows of step(s)" in out, out
    r = CliRunner().invoke(main, ["selectivity", str(run_dir), "--checkpoints", "first,last", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (f"note: {run_dir}/tables/selectivity.parquet holds rows computed from other weights than the checkpoints now "
            f"at step(s) {last} (their sha256 changed since): recomputing them.") in r.output, r.output
    again = pd.read_parquet(run_dir / "tables" / "selectivity.parquet")
    new = _sha_by_step(run_dir)
    assert (again["checkpoint_sha256"] == again["step"].map(new)).all() and len(again) == len(sel)
    first = min(shas)
    assert again[again["step"] == first]["csi"].tolist() == sel[sel["step"] == first]["csi"].tolist()
    assert again[again["step"] == last]["csi"].tolist() != sel[sel["step"] == last]["csi"].tolist()
    assert refused(["verify", run_dir], code=0).strip().endswith("ok")


def test_tables_written_before_provenance_are_read_and_get_the_column(tiny_run):
    import pandas as pd

    run_dir = Path(tiny_run)
    refused(["selectivity", run_dir, "--checkpoints", "last", "--quiet"], code=0)
    refused(["ablate", run_dir, "--checkpoints", "last", "--draws", "1", "--quiet"], code=0)
    for name in ("selectivity", "class_means", "ablation"):  # as an older csn wrote them: no column
        p = run_dir / "tables" / f"{name}.parquet"
        pd.read_parquet(p).drop(columns=["checkpoint_sha256"]).to_parquet(p, index=False)
    assert refused(["verify", run_dir], code=0).strip().endswith("ok")
    assert refused(["report", run_dir, "--quiet"], code=0)
    r = CliRunner().invoke(main, ["ablate", str(run_dir), "--checkpoints", "last", "--draws", "1", "--quiet"])
    assert r.exit_code == 0 and "ablation.parquet was written before csn recorded each row's checkpoint; its rows of 1 " \
                                "checkpoint(s) now record the sha256 of the checkpoints in the manifest" in r.output, r.output
    shas = _sha_by_step(run_dir)
    ab = pd.read_parquet(run_dir / "tables" / "ablation.parquet")
    assert (ab["checkpoint_sha256"] == ab["step"].map(shas)).all()


def test_verify_finds_non_finite_weights(tiny_run):
    from tests.test_hostile import _nan_fc, _rewrite_checkpoint

    assert refused(["verify", tiny_run], code=0).strip().endswith("ok")
    _rewrite_checkpoint(Path(tiny_run), _nan_fc)
    out = refused(["verify", tiny_run], code=1)
    assert "holds non-finite values (NaN or inf) in fc." in out and "the run diverged at or before this step" in out, out


def test_run_json_size_is_bounded_before_parsing(tiny_run):
    import json

    f = Path(tiny_run) / "run.json"
    info = json.loads(f.read_text())
    info["note"] = "x" * 20_000_000
    f.write_text(json.dumps(info))
    msg = refused(["info", tiny_run])
    assert msg == (f"error: {f} is 20 MB, more than a run.json csn writes ever holds (16 MB at most): it is corrupt or "
                   "not csn's; restore it or re-create the run with `csn train --force`."), msg
    assert "is 20 MB, more than a run.json" in refused(["verify", tiny_run], code=1)


# ============================================================================ 5. a report while an analysis writes
def test_report_while_an_analysis_holds_the_lock_says_so(tiny_run):
    """The page is built from the tables as they are, with one note on stderr and in the page naming the process
    that writes; with the lock free there is no note."""
    import os
    import subprocess

    code = ("import sys, time\nfrom csn.runs.lock import run_lock\nwith run_lock(sys.argv[1], 'selectivity'):\n"
            "    print('held', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", code, str(tiny_run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = CliRunner().invoke(main, ["report", str(tiny_run), "--quiet"])
    finally:
        holder.kill()
        holder.wait()
    text = (f"{tiny_run} is being written by another csn process (pid {holder.pid}: selectivity); this page shows its "
            "tables as they are now, and a table being written may be partial: run `csn report` again when it has "
            "finished.")
    assert r.exit_code == 0 and f"note: {text}" in r.output, r.output
    page = (Path(tiny_run) / "report" / "index.html").read_text()
    assert "Runs being written" in page and f"pid {holder.pid}: selectivity" in page
    r = CliRunner().invoke(main, ["report", str(tiny_run), "--quiet"])
    assert r.exit_code == 0 and "being written" not in r.output
    assert "Runs being written" not in (Path(tiny_run) / "report" / "index.html").read_text()


# ============================================================================ 6. file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_csn_writes_honour_the_umask(tmp_path, umask):
    """The temporary file's 0600 does not survive the atomic rename: run.json, checkpoints, tables, the report and
    the fmnist-pairs cache get 0o666 less the umask, like any other file the user writes."""
    import os
    import stat

    from csn.data.pairs import _atomic
    from csn.training.loop import train

    old = os.umask(umask)
    try:
        train(tiny_config(epochs=0.5, checkpoints="0,f0.5,end"), tmp_path / "r", progress=False)
        refused(["report", tmp_path / "r", "--quiet"], code=0)
        with _atomic(tmp_path / "cache.npz") as f:
            f.write(b"x")
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]
    assert len(files) > 8 and any(p.name == "index.html" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(want)}, modes


# ============================================================================ 7. messages that named the wrong cause
def _odd_root(tmp_path: Path, kind: str) -> Path:
    import os

    p = tmp_path / kind
    if kind == "loop":
        p.symlink_to(p)
    elif kind == "fifo":
        os.mkfifo(p)
    else:
        p.symlink_to("/dev/zero")
    return p


@pytest.mark.parametrize("dataset", ["idx", "npz"])
@pytest.mark.parametrize("kind, problem", [("loop", "is a symbolic link loop (it leads back to itself)"),
                                           ("fifo", "is a FIFO (named pipe), not a {want}"),
                                           ("zero", "is a character device (a link to /dev/zero), not a {want}")])
def test_a_data_root_that_is_no_file_or_folder_says_what_it_is(tmp_path, monkeypatch, dataset, kind, problem):
    if kind == "zero" and not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    monkeypatch.chdir(tmp_path)
    _odd_root(tmp_path, kind)
    want = "directory" if dataset == "idx" else "file"
    fix = ("point --data-root at a directory that holds the IDX files." if dataset == "idx" else
           "pass --data-root FILE.npz written with numpy.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...).")
    msg = refused(["train", "--dataset", dataset, "--data-root", kind, "--model", "mlp", "--out", "r", "--quiet"])
    assert msg == f"error: data root {kind} {problem.format(want=want)}; {fix}", msg
    assert not Path("r").exists()


def test_an_idx_file_linked_to_dev_zero(tmp_path, monkeypatch):
    if not Path("/dev/zero").exists():
        pytest.skip("no /dev/zero")
    monkeypatch.chdir(tmp_path)
    Path("d").mkdir()
    Path("d/train-images-idx3-ubyte").symlink_to("/dev/zero")
    msg = refused(["train", "--dataset", "idx", "--data-root", "d", "--model", "mlp", "--out", "r", "--quiet"])
    assert msg == ("error: IDX file d/train-images-idx3-ubyte is a character device (a link to /dev/zero), not a file; "
                   "replace it with the file itself."), msg


def test_config_files_with_a_bom_or_nothing_in_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bom.toml").write_bytes('\ufeffpreset = "smoke"\nepochs = 0.25\n'.encode())
    assert "run written to r" in refused(["train", "--config", "bom.toml", "--out", "r", "--quiet", "--threads", "1"],
                                         code=0)
    for name, text in (("empty.toml", ""), ("comments.yaml", "# nothing yet\n"), ("blank.toml", "\n\n")):
        Path(name).write_text(text)
        msg = refused(["train", "--config", name, "--out", "e", "--quiet"])
        assert msg == (f"error: config file {name} sets no key (it is empty or holds only comments), so it would train "
                       'the full default run; write the keys to use (e.g. preset = "smoke"), or pass --preset NAME.'), msg
    assert not Path("e").exists()


def test_the_inline_table_that_print_config_writes_is_an_override(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config().override(["synthetic={num_train = 512, num_test = 256, num_classes = 4, channels = 1, size = 8}",
                                  "milestones=[1, 2]"])
    assert cfg.synthetic == {"num_train": 512, "num_test": 256, "num_classes": 4, "channels": 1, "size": 8}
    assert list(cfg.milestones) == [1, 2]
    out = refused([*SMOKE, "--out", "r", "epochs=0.25", "synthetic={num_train=256,num_test=128,num_classes=4,channels=1,"
                   "size=12}"], code=0)
    assert "run written to r" in out
    assert "expects a table" in refused([*SMOKE, "--out", "r2", "synthetic={num_train=}"])


def test_samples_names_the_subset_not_the_split(tiny_run):
    msg = refused(["selectivity", tiny_run, "--samples", "3", "--checkpoints", "last"])
    assert msg.startswith("error: the 3-image subset of the test split (--samples 3; the split itself holds every class) "
                          "has no example of 2 classes 0, 2 (of 4)") and msg.endswith(
        "raise --samples so that every class has an example, or leave it out to measure on the whole split."), msg
    assert not (Path(tiny_run) / "tables" / "selectivity.parquet").exists()


def test_cka_reference_checked_before_work(tiny_run):
    msg = refused(["cka", tiny_run, "--mode", "across", "--reference", "step=12345"])
    assert msg == ("error: --reference step=12345 is after the run's last checkpoint (step 16); choose a point up to "
                   "step=16 (or 'end')."), msg
    assert "--reference 'yes' is not a point in training" in refused(["cka", tiny_run, "--mode", "across", "--reference", "yes"])
    assert "--reference 4 applies to --mode across only (this is --mode within)" in refused(
        ["cka", tiny_run, "--reference", "4"])
    assert not (Path(tiny_run) / "tables" / "cka.parquet").exists()


def test_a_stage_given_twice(tiny_run):
    assert refused(["ablate", tiny_run, "--stages", "layer1,layer1", "--checkpoints", "last"]) == \
        "error: stage 'layer1' is given twice in --stages; name each stage once."


# ============================================================================ 8. the study and experiment side
def test_a_study_file_naming_code_needs_trust_code_and_every_model_is_checked_first(tmp_path, monkeypatch, factories):
    """`csn reproduce --config` naming code: refused without --trust-code before the module is imported (also in
    --dry-run); with it, a model that cannot train (here: no width parameter for the study's width) is one error
    before any run starts, and nothing is written."""
    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text('preset = "smoke"\n[train]\nmodel = "hostile_nets:build"\n')
    for extra in ([], ["--dry-run"]):
        msg = refused(["reproduce", "--config", "s.toml", "--out", "o", "--quiet", *extra])
        assert "study file s.toml names the model 'hostile_nets:build', Python code" in msg
    assert not (factories / "imported.txt").exists()
    Path("s.toml").write_text('preset = "smoke"\n[train]\nmodel = "hostile_nets:four_classes"\n')
    msg = refused(["reproduce", "--config", "s.toml", "--out", "o", "--quiet", "--trust-code"])
    assert "hostile_nets:four_classes" in msg and not Path("o").exists()


@pytest.mark.parametrize("study, pattern", [
    ('[study.ablation]\ngrid = "f:1,0.5,banana"\n', "study key 'ablation.grid': bad grid 'f:1,0.5,banana'"),
    ('[study.ablation]\ngrid = "f:1,0.5"\n', "study key 'ablation.grid': grid 'f:1,0.5' is not increasing"),
    ('[study]\njudge = "yes"\n', "study key 'judge' expects a boolean"),
    ('[study.cka]\nreference = "step=12345"\n', "cka.reference are set by the study"),
    ("# only a comment\n", "sets no key"),
])
def test_a_study_file_is_checked_before_any_work(tmp_path, monkeypatch, study, pattern):
    monkeypatch.chdir(tmp_path)
    Path("s.toml").write_text(('preset = "smoke"\n' if "comment" not in study else "") + study)
    assert pattern in refused(["reproduce", "--config", "s.toml", "--out", "o", "--quiet"])
    assert not Path("o").exists()


def test_reproduce_force_never_leaves_a_run_it_cannot_train(tmp_path):
    """A user file inside a run folder: --force refuses before deleting anything (the run could not be trained
    again in a folder holding it), naming the file; after it is moved out, --force proceeds."""
    out = tmp_path / "o"
    (out / "baseline-s0").mkdir(parents=True)
    (out / "reproduce.json").write_text("{}")
    (out / "baseline-s0" / "run.json").write_text("{}")
    (out / "baseline-s0" / "NOTES.txt").write_text("mine")
    before = listing(out)
    msg = refused(["reproduce", "--preset", "smoke", "--out", out, "--force", "--quiet"])
    assert "--force would keep your file" in msg and "NOTES.txt" in msg and "Nothing was deleted" in msg
    assert listing(out) == before


@pytest.mark.parametrize("args, pattern", [
    (["--stages", "layer1+layer1"], "stage set 'layer1+layer1' names a stage twice"),
    (["--alphas=" + ",".join(str(-a) for a in range(1, 70)), "--windows", "tile:16"], "runs, more than 1,000"),
    (["--out", "a\nb"], "holds a control character"),
])
def test_a_map_request_is_checked_before_any_work(tmp_path, monkeypatch, args, pattern):
    monkeypatch.chdir(tmp_path)
    assert pattern in refused(["experiment", "windows", "--preset", "smoke", "--dry-run", *args])
    assert listing(tmp_path) == []
