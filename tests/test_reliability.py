"""Reliability: nothing lost or silently corrupted under crashes, damaged files, hostile data or two writers.

1. Crash consistency: `csn train`, `csn selectivity` and `csn ablate` run as subprocesses, are killed
   with SIGKILL at seeded random moments, resumed, and must end bitwise equal to an uninterrupted run
   (checkpoint sha256s, manifest, tables), with no half-written file under a final name at any time.
   CI uses a few kill points per command; benchmarks/soak_kill_resume.py runs >= 20 per command with
   the same harness (also here as a @slow test). SIGINT: exit 130, a resume hint, identical result.
2. Integrity: damaged checkpoints/tables/manifests are reported by name with what to do, never loaded.
3. No code execution from data: a scan of src/ for unsafe loaders; YAML python tags are refused.
4. Concurrency: a second writer gets "another csn process is writing ... (pid N)"; stale locks recover.
6. Resource limits: the free-disk check before training; halving batches on out-of-memory.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from csn.errors import CsnError
from csn.runs import MANIFEST, Run, lock_holder, read_manifest, read_table, run_lock, sha256_file, write_manifest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "csn"

# ============================================================================ kill/resume harness
# A run small enough that one command takes seconds (most of it Python start-up), with a checkpoint
# every 2 steps so that kills land between many atomic writes.
HARNESS_CONFIG = """\
name = "killme"
dataset = "synthetic"
model = "resnet8"
width = 0.5
epochs = 2.0
batch_size = 32
lr = 0.05
checkpoints = "steps:0:end:2"
eval_batch_size = 64
log_every = 2
channels_last = false
seed = 0
threads = 1
device = "cpu"

[synthetic]
num_train = 256
num_test = 128
num_classes = 4
channels = 1
size = 8
"""
WALL_CLOCK_COLUMNS = {"time_s"}
COMMAND_TIMEOUT = 600


def child_env() -> dict[str, str]:
    """One thread per child: deterministic, and no oversubscription on a shared machine."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CSN_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    return env


def interruptible() -> None:
    """preexec_fn of a child the test interrupts: SIGINT as a terminal delivers it. A shell starts background jobs
    with SIGINT ignored and children inherit that, so a suite started with `&` would see Ctrl-C ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def csn_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "csn", *args]


@dataclass
class Command:
    """One csn command under test: how to run it first, how to resume it, what its outputs are."""

    name: str
    first: list[str]
    resume: list[str]
    tables: list[str]  # tables it writes (compared after resume)
    unit_key: str = "step"  # a table's rows come in complete groups per value of this column

    def argv(self, run_dir: Path, resume: bool) -> list[str]:
        args = self.resume if resume else self.first
        return csn_argv(*[str(run_dir) if a == "{run}" else a for a in args])


def commands(config_path: Path) -> dict[str, Command]:
    return {
        "train": Command("train", ["train", "--config", str(config_path), "--out", "{run}", "--quiet"],
                         ["train", "--config", str(config_path), "--out", "{run}", "--quiet", "--resume"],
                         ["training"]),
        "selectivity": Command("selectivity", ["selectivity", "{run}", "--device", "cpu"],
                               ["selectivity", "{run}", "--device", "cpu"], ["selectivity", "class_means"]),
        "ablate": Command("ablate", ["ablate", "{run}", "--device", "cpu", "--draws", "2", "--grid", "0,2,4"],
                          ["ablate", "{run}", "--device", "cpu", "--draws", "2", "--grid", "0,2,4"], ["ablation"]),
    }


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """A table without wall-clock columns, rows sorted by every column, for equality checks."""
    df = df.drop(columns=[c for c in df.columns if c in WALL_CLOCK_COLUMNS])
    cols = sorted(df.columns)
    return df[cols].sort_values(cols, kind="stable").reset_index(drop=True)


def snapshot(run_dir: Path, cmd: Command) -> dict:
    """Everything an uninterrupted run must reproduce: checkpoints (sha256), manifest, tables."""
    run_dir = Path(run_dir)
    out: dict = {"tables": {}}
    if cmd.name == "train":
        ckpts = read_manifest(run_dir / "checkpoints")
        out["manifest"] = [c.to_json() for c in ckpts]
        out["sha256"] = {c.file: sha256_file(run_dir / "checkpoints" / c.file) for c in ckpts}
        out["weight_files"] = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*.safetensors"))
        info = json.loads((run_dir / "run.json").read_text())
        out["run"] = {k: info[k] for k in ("config", "data", "checkpoint_steps", "total_steps", "steps_per_epoch")}
    for t in cmd.tables:
        out["tables"][t] = tidy(read_table(run_dir / "tables" / f"{t}.parquet"))
    return out


def compare(ref: dict, got: dict) -> list[str]:
    """Differences between two snapshots (empty = identical)."""
    diffs = []
    for key in ("manifest", "sha256", "weight_files", "run"):
        if key in ref and ref[key] != got.get(key):
            diffs.append(f"{key} differs")
    for name, df in ref["tables"].items():
        other = got["tables"].get(name)
        try:
            pd.testing.assert_frame_equal(df, other, check_exact=True)
        except AssertionError as e:
            diffs.append(f"table {name} differs: {str(e).splitlines()[0:3]}")
    return diffs


def check_consistent(run_dir: Path, cmd: Command, ref: dict | None = None) -> tuple[list[str], int]:
    """Invariants that must hold at ANY moment, e.g. right after a SIGKILL: every file under a final name
    is complete, the manifest lists only complete checkpoints whose sha256 matches, tables hold only
    complete checkpoints. Returns (problems, number of checkpoints already done)."""
    from safetensors import safe_open

    problems: list[str] = []
    run_dir = Path(run_dir)
    if (run_dir / "run.json").exists():
        try:
            json.loads((run_dir / "run.json").read_text())
        except ValueError:
            problems.append("run.json is half-written")
    ckpt_dir = run_dir / "checkpoints"
    for f in sorted(ckpt_dir.glob("*.safetensors")) if ckpt_dir.is_dir() else []:
        try:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    h.get_tensor(k)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{f.name} is incomplete under its final name ({type(e).__name__})")
    try:
        ckpts = read_manifest(ckpt_dir)
    except CsnError as e:
        problems.append(f"manifest unreadable: {e}")
        ckpts = []
    for c in ckpts:
        f = ckpt_dir / c.file
        if not f.is_file() or sha256_file(f) != c.sha256:
            problems.append(f"manifest lists {c.file} but the file is missing or differs")
    tables = {}
    for p in sorted((run_dir / "tables").glob("*.parquet")) if (run_dir / "tables").is_dir() else []:
        try:
            tables[p.stem] = read_table(p)
        except CsnError as e:
            problems.append(f"table {p.name} is half-written: {e}")
    if ckpts and "training" not in tables:
        problems.append("the manifest lists checkpoints but tables/training.parquet is missing")
    if ckpts and "training" in tables and len(ckpts) > 1 and tables["training"]["step"].max() < ckpts[-1].step:
        problems.append("tables/training.parquet lags behind the manifest")
    done = len(ckpts) if cmd.name == "train" else 0
    if cmd.name != "train":
        first = tables.get(cmd.tables[0])
        done = 0 if first is None else first["step"].nunique()
        if ref is not None:  # every checkpoint in a table has all of its rows
            for t in cmd.tables:
                if t in tables:
                    want = ref["tables"][t].groupby("step").size()
                    have = tables[t].groupby("step").size()
                    for step, n in have.items():
                        if want.get(step) != n:
                            problems.append(f"table {t} holds {n} rows of step {step}, not {want.get(step)}")
        if "selectivity" in tables and "class_means" in tables:
            if not set(tables["selectivity"]["step"]) <= set(tables["class_means"]["step"]):
                problems.append("selectivity has steps that class_means lacks")
    return problems, done


@dataclass
class Trial:
    command: str
    delays: list[tuple[str, float]]
    kills: int = 0  # SIGKILLs delivered (the process was still running)
    done_at_kill: list[int] = field(default_factory=list)  # checkpoints finished when each kill hit
    resumes: int = 0
    problems: list[str] = field(default_factory=list)  # broken invariants right after a kill
    mismatches: list[str] = field(default_factory=list)  # final outputs differing from the reference
    seconds: float = 0.0


def _run(argv: list[str], log: Path, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    with open(log, "ab") as f:
        return subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=log.parent,
                              timeout=timeout)


def _lock_taken(run_dir: Path, pid: int) -> bool:
    try:
        return (run_dir / ".lock").read_text().split()[0] == str(pid)
    except (OSError, IndexError):
        return False


def outputs_signature(run_dir: Path, cmd: Command) -> tuple:
    """Changes whenever the command writes one of its outputs (run.json, manifest, its tables)."""
    paths = [run_dir / "tables" / f"{t}.parquet" for t in cmd.tables]
    if cmd.name == "train":
        paths += [run_dir / "run.json", run_dir / "checkpoints" / MANIFEST]
    sig = []
    for p in paths:
        try:
            st = p.stat()
            sig.append((p.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            sig.append((p.name, None))
    return tuple(sig)


def _run_and_kill(argv: list[str], kill: tuple[str, float], run_dir: Path, log: Path, cmd: Command) -> bool:
    """Start argv and SIGKILL it at `kill` = (phase, seconds): "start" counts from the process start, "lock"
    from the moment it took the run's lock, "write" from its first write of an output. True when it was
    still running (a kill delivered)."""
    phase, delay = kill
    before = outputs_signature(run_dir, cmd)
    with open(log, "ab") as f:
        p = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env(), cwd=log.parent,
                             start_new_session=True)
        if phase == "lock":
            while p.poll() is None and not _lock_taken(run_dir, p.pid):
                time.sleep(0.002)
        elif phase == "write":
            while p.poll() is None and outputs_signature(run_dir, cmd) == before:
                time.sleep(0.002)
        try:
            p.wait(timeout=delay)
            return False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            return True


def kill_trial(cmd: Command, workdir: Path, prepare: Callable[[Path], Path], delays: list[tuple[str, float]],
               ref: dict) -> Trial:
    """Run the command, SIGKILL it at delays[0]; resume it, killed again at each further delay; then resume
    it to the end and compare with the reference. Invariants are checked after every kill."""
    t0 = time.perf_counter()
    trial = Trial(cmd.name, list(delays))
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = prepare(workdir)
    log = workdir / "log.txt"
    for i, d in enumerate(delays):
        if i:
            trial.resumes += 1
        if _run_and_kill(cmd.argv(run_dir, resume=i > 0), d, run_dir, log, cmd):
            trial.kills += 1
            problems, done = check_consistent(run_dir, cmd, ref)
            trial.problems += [f"after kill {i + 1} ({d[1]:.2f} s after {d[0]}): {p}" for p in problems]
            trial.done_at_kill.append(done)
    trial.resumes += 1
    r = _run(cmd.argv(run_dir, resume=True), log)
    if r.returncode != 0:
        trial.mismatches.append(f"resume exited {r.returncode}: {log.read_text()[-1500:]}")
    else:
        trial.mismatches += compare(ref, snapshot(run_dir, cmd))
        from csn.runs.verify import verify_run

        trial.mismatches += [f"verify: {p}" for p in verify_run(run_dir)]
    trial.seconds = time.perf_counter() - t0
    return trial


@dataclass
class Harness:
    """A work folder with the config, the uninterrupted reference of each command and its duration."""

    root: Path
    config: Path
    cmds: dict[str, Command]
    master: Path  # the trained reference run without analysis tables
    refs: dict[str, dict] = field(default_factory=dict)
    durations: dict[str, float] = field(default_factory=dict)  # uninterrupted, start to exit
    timeline: dict[str, dict[str, float]] = field(default_factory=dict)  # lock, first_write, last_write

    @classmethod
    def create(cls, root: Path) -> Harness:
        root.mkdir(parents=True, exist_ok=True)
        config = root / "tiny.toml"
        config.write_text(HARNESS_CONFIG)
        cmds = commands(config)
        h = cls(root, config, cmds, root / "ref-train" / "run")
        h.reference("train")
        return h

    def prepare(self, name: str) -> Callable[[Path], Path]:
        """How a trial starts: train from nothing; an analysis from a copy of the trained run."""
        def fresh(workdir: Path) -> Path:
            return workdir / "run"

        def copy_master(workdir: Path) -> Path:
            dst = workdir / "run"
            shutil.copytree(self.master, dst, ignore=shutil.ignore_patterns(".lock"))
            for p in (dst / "tables").glob("*.parquet"):
                if p.stem != "training":
                    p.unlink()
            return dst

        return fresh if name == "train" else copy_master

    def reference(self, name: str) -> dict:
        """Run the command once, uninterrupted (timed); its snapshot is what every trial must reproduce."""
        if name not in self.refs:
            cmd = self.cmds[name]
            workdir = self.root / f"ref-{name}"
            workdir.mkdir(parents=True, exist_ok=True)
            run_dir = self.prepare(name)(workdir)
            before = outputs_signature(run_dir, cmd)
            events: dict[str, float] = {}
            t0 = time.perf_counter()
            with open(workdir / "log.txt", "wb") as f:
                p = subprocess.Popen(cmd.argv(run_dir, resume=False), stdout=f, stderr=subprocess.STDOUT,
                                     env=child_env(), cwd=workdir)
                last = before
                while p.poll() is None:  # when it takes the lock, first writes an output, last writes one
                    now = time.perf_counter() - t0
                    if "lock" not in events and _lock_taken(run_dir, p.pid):
                        events["lock"] = now
                    sig = outputs_signature(run_dir, cmd)
                    if sig != last:
                        events.setdefault("first_write", now)
                        events["last_write"], last = now, sig
                    time.sleep(0.002)
                rc = p.wait(timeout=COMMAND_TIMEOUT)
            self.durations[name] = time.perf_counter() - t0
            events.setdefault("lock", 0.0)
            events.setdefault("first_write", events["lock"])
            events.setdefault("last_write", self.durations[name])
            self.timeline[name] = events
            assert rc == 0, (workdir / "log.txt").read_text()[-3000:]
            self.refs[name] = snapshot(run_dir, cmd)
        return self.refs[name]

    def trials(self, name: str, n: int, seed: int, *, max_kills: int = 1, workers: int = 2) -> list[Trial]:
        """n seeded trials of a command, each killing it 1..max_kills times. Kill moments are drawn uniformly
        over phases of the uninterrupted command's measured timeline: 20% over its whole run (from process
        start: start-up, set-up, exit), 20% over its set-up (from taking the lock to the first write), 60%
        over its writing (from its first write to its last) -- each measured from the same event in the
        trial, so a slower, loaded machine does not push the kills into Python's start-up."""
        ref = self.reference(name)
        rng = random.Random(f"{name}-{seed}")
        ev = self.timeline[name]
        spans = {"start": self.durations[name], "lock": max(0.01, ev["first_write"] - ev["lock"]),
                 "write": max(0.01, ev["last_write"] - ev["first_write"])}

        def moment() -> tuple[str, float]:
            u = rng.random()
            phase = "start" if u < 0.2 else "lock" if u < 0.4 else "write"
            return phase, rng.uniform(0, spans[phase])

        plans = [[moment() for _ in range(rng.randint(1, max_kills))] for _ in range(n)]
        cmd, prepare = self.cmds[name], self.prepare(name)
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            futs = [pool.submit(kill_trial, cmd, self.root / f"{name}-{seed}-{i}", prepare, d, ref)
                    for i, d in enumerate(plans)]
            return [f.result() for f in futs]


def summarize_trials(trials: list[Trial]) -> str:
    kills = sum(t.kills for t in trials)
    return (f"{len(trials)} trials, {sum(len(t.delays) for t in trials)} kill points, {kills} kills delivered "
            f"(checkpoints done at kill: {[d for t in trials for d in t.done_at_kill]}), "
            f"{sum(t.resumes for t in trials)} resumes, {sum(len(t.problems) for t in trials)} invariant violations, "
            f"{sum(len(t.mismatches) for t in trials)} mismatches")


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Harness:
    return Harness.create(tmp_path_factory.mktemp("kill"))


CI_KILLS = int(os.environ.get("CSN_KILL_POINTS", "3"))


@pytest.mark.parametrize("name", ["train", "selectivity", "ablate"])
def test_sigkill_then_resume_equals_uninterrupted(harness, name):
    """SIGKILL at seeded random moments, then resume: outputs bitwise equal to an uninterrupted run."""
    trials = harness.trials(name, CI_KILLS, seed=2024)
    report = summarize_trials(trials)
    print(f"{name}: {report}")
    for t in trials:
        assert not t.problems, (t.delays, t.problems)
        assert not t.mismatches, (t.delays, t.mismatches)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train", "selectivity", "ablate"])
def test_sigkill_soak(request, harness, name):
    """The full soak (>= 20 kill points per command; also benchmarks/soak_kill_resume.py). Minutes: runs
    only when asked for, with `pytest -m slow` or CSN_SOAK=1."""
    expr = request.config.getoption("markexpr", "") or ""
    if not os.environ.get("CSN_SOAK") and not ("slow" in expr and "not slow" not in expr):
        pytest.skip("the soak runs with `pytest -m slow` or CSN_SOAK=1 (or benchmarks/soak_kill_resume.py)")
    trials = harness.trials(name, 20, seed=7, max_kills=2)
    assert all(not t.problems and not t.mismatches for t in trials), summarize_trials(trials)


def test_sigint_train_exits_130_and_resumes_identically(harness):
    """Ctrl-C: exit status 130, a message saying how to resume; the resumed run equals the uninterrupted one."""
    ref = harness.reference("train")
    cmd = harness.cmds["train"]
    work = harness.root / "sigint"
    work.mkdir()
    run_dir = work / "run"
    log = work / "log.txt"
    with open(log, "wb") as f:
        p = subprocess.Popen(cmd.argv(run_dir, resume=False), stdout=f, stderr=subprocess.STDOUT, env=child_env(),
                             cwd=work, preexec_fn=interruptible)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:  # wait until training is under way
            m = run_dir / "checkpoints" / MANIFEST
            if m.is_file() and len(m.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        assert p.poll() is None, "training finished before it could be interrupted"
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=120)
    text = log.read_text()
    assert rc == 130, text[-2000:]
    assert "interrupted" in text and "--resume" in text and "Traceback" not in text, text[-2000:]
    problems, done = check_consistent(run_dir, cmd)
    assert not problems and 2 <= done < len(ref["manifest"])
    assert not (run_dir / ".lock").exists()  # a clean stop releases the lock
    assert not list(run_dir.rglob(".*.tmp"))  # ... and removes its temporary file
    r = _run(cmd.argv(run_dir, resume=True), log)
    assert r.returncode == 0, log.read_text()[-2000:]
    assert compare(ref, snapshot(run_dir, cmd)) == []


def test_run_killed_before_its_first_file_can_be_resumed_or_restarted(tmp_path):
    """A run killed before run.json exists leaves only its lock (and run.json's temporary file): --resume,
    the same command again, and --force all start it afresh instead of refusing the directory."""
    from csn.training.loop import _prepare_dir
    from tests.conftest import tiny_config

    cfg = tiny_config()
    for flags in (dict(resume=True, force=False), dict(resume=False, force=False), dict(resume=False, force=True)):
        out = tmp_path / f"r{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / ".lock").write_text("999999999 train\n")  # a dead holder
        (out / ".run.json.abc123.tmp").write_text("{half")
        _prepare_dir(cfg, out, **flags)
        (out / "user-file").write_text("x")  # but a real foreign directory is still refused
        with pytest.raises(CsnError, match="not a csn run|already exists"):
            _prepare_dir(cfg, out, resume=flags["resume"], force=flags["force"])


# ============================================================================ integrity
def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "modify"])
def test_damaged_checkpoint_detected_by_name_never_loaded(tiny_run, how):
    from csn.cli import main

    run = Run(tiny_run)
    c = run.checkpoints[1]
    _corrupt(run.ckpt_dir / c.file, how)
    with pytest.raises(CsnError) as e:
        run.load_state(c)
    msg = str(e.value)
    assert c.file in msg and "corrupt" in msg and "--force" in msg and "--checkpoints" in msg
    run.load_state(run.checkpoints[0])  # the others still load
    res = CliRunner().invoke(main, ["verify", str(tiny_run)])
    assert res.exit_code == 1
    assert c.file in res.output and "corrupt" in res.output and "csn train --force" in res.output


def test_missing_checkpoint_reported(tiny_run):
    from csn.cli import main

    run = Run(tiny_run)
    c = run.checkpoints[2]
    (run.ckpt_dir / c.file).unlink()
    with pytest.raises(CsnError, match=f"checkpoint \\(step {c.step}\\) .*/{c.file} is missing, so it was not loaded"):
        run.load_state(c)
    res = CliRunner().invoke(main, ["verify", str(tiny_run)])
    assert res.exit_code == 1 and c.file in res.output and "is missing" in res.output, res.output


def test_damaged_optimizer_state_stops_resume_clearly(tiny_run):
    """--resume reads the newest optimizer state: a damaged one is a clear error, not a traceback."""
    from csn.training.loop import train
    from tests.conftest import tiny_config

    run = Run(tiny_run)
    *rest, last = run.checkpoints
    write_manifest(run.ckpt_dir, rest)  # as if killed before the final checkpoint: --resume has work to do
    state = run.ckpt_dir / f"state-{rest[-1].step:08d}.safetensors"
    (run.ckpt_dir / f"state-{last.step:08d}.safetensors").rename(state)
    sidecar = Path(f"{state}.sha256")
    Path(f"{run.ckpt_dir / f'state-{last.step:08d}.safetensors'}.sha256").rename(sidecar)
    _corrupt(state, "truncate")
    with pytest.raises(CsnError, match=f"optimizer state .*{state.name} .*so it was not loaded.*--force"):
        train(tiny_config(), tiny_run, resume=True, progress=False)
    sidecar.unlink()  # and without its checksum
    with pytest.raises(CsnError, match=f"optimizer state .*{state.name} has no checksum.*--force"):
        train(tiny_config(), tiny_run, resume=True, progress=False)


def test_corrupt_table_reported_by_name(tiny_run):
    from csn.cli import main

    run = Run(tiny_run)
    p = run.table_path("training")
    _corrupt(p, "truncate")
    with pytest.raises(CsnError, match="training.parquet is unreadable or corrupt.*re-run"):
        run.read("training")
    res = CliRunner().invoke(main, ["verify", str(tiny_run)])
    assert res.exit_code == 1 and "training.parquet is unreadable or corrupt" in res.output


@pytest.mark.parametrize("line, what", [
    ("{not json", "malformed"),
    ('{"step": 1.5, "epoch": 0.1, "file": "step-00000001.safetensors", "sha256": "%s"}', "malformed"),
    ('{"step": "1", "epoch": 0.1, "file": "step-00000001.safetensors", "sha256": "%s"}', "malformed"),
    ('{"step": 1, "epoch": NaN, "file": "step-00000001.safetensors", "sha256": "%s"}', "malformed"),
    ('{"step": 1, "epoch": 0.1, "file": "step-00000001.safetensors", "sha256": "abc"}', "malformed"),
    ('{"step": 1, "epoch": 0.1, "file": "step-00000001.safetensors"}', "malformed"),
    ('[1, 2, 3]', "malformed"),
    ('{"step": 1, "epoch": 0.1, "file": "../run.json", "sha256": "%s"}', "outside the checkpoints folder"),
    ('{"step": 1, "epoch": 0.1, "file": "/etc/passwd", "sha256": "%s"}', "outside the checkpoints folder"),
    ('{"step": 1, "epoch": 0.1, "file": "sub/x.safetensors", "sha256": "%s"}', "outside the checkpoints folder"),
    ('{"step": 1, "epoch": 0.1, "file": "..\\\\x", "sha256": "%s"}', "outside the checkpoints folder"),
    ('{"step": 1, "epoch": 0.1, "file": "C:x", "sha256": "%s"}', "outside the checkpoints folder"),
    ('{"step": 0, "epoch": 0.0, "file": "step-00000000.safetensors", "sha256": "%s"}', "repeats step 0"),
])
def test_bad_manifest_lines_rejected(tiny_run, line, what):
    from csn.cli import main

    m = Path(tiny_run) / "checkpoints" / MANIFEST
    lines = m.read_text().splitlines()
    lines.insert(1, line.replace("%s", "0" * 64))
    m.write_text("\n".join(lines) + "\n")
    with pytest.raises(CsnError, match=f"line 2 .*{what}|line 2 {what}"):
        read_manifest(m.parent)
    res = CliRunner().invoke(main, ["verify", str(tiny_run)])
    assert res.exit_code == 1 and "line 2" in res.output


def test_manifest_with_binary_garbage_rejected(tmp_path):
    (tmp_path / MANIFEST).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CsnError, match="not text"):
        read_manifest(tmp_path)


# ============================================================================ no code execution from data
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw_is(call: ast.Call, name: str, ok: Callable[[ast.AST], bool]) -> bool:
    return any(k.arg == name and ok(k.value) for k in call.keywords)


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from data: pickle-family loads, torch.load without weights_only=True,
    yaml.load without a safe loader, builtin eval/exec, numpy.load(allow_pickle=True), read_pickle,
    torch.jit.load. Returns 'file:line: what' for each."""
    hits = []
    true = lambda v: isinstance(v, ast.Constant) and v.value is True  # noqa: E731
    safe = {"SafeLoader", "CSafeLoader", "BaseLoader"}
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):  # a class of this file subclassing a safe loader is a safe loader
        if isinstance(node, ast.ClassDef) and any(_dotted(b).split(".")[-1] in safe for b in node.bases):
            safe.add(node.name)
    safe_loader = lambda v: _dotted(v).split(".")[-1] in safe  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for n in names:
                if n.split(".")[0] in _UNSAFE_MODULES:
                    hits.append(f"{filename}:{node.lineno}: imports {n}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.split(".")[-1]
        bad = None
        if isinstance(node.func, ast.Name) and name in ("eval", "exec"):
            bad = f"builtin {name}()"
        elif name.split(".")[0] in _UNSAFE_MODULES and last in ("load", "loads", "Unpickler", "open"):
            bad = name
        elif last == "load" and name.split(".")[0] == "torch" and "jit" in name:
            bad = name
        elif name in ("torch.load", "torch.serialization.load") and not _kw_is(node, "weights_only", true):
            bad = f"{name} without weights_only=True"
        elif last in ("unsafe_load", "full_load", "unsafe_load_all", "full_load_all") and "yaml" in name:
            bad = name
        elif name in ("yaml.load", "yaml.load_all") and not _kw_is(node, "Loader", safe_loader):
            bad = f"{name} without a safe Loader"
        elif last == "load" and name.split(".")[0] in ("np", "numpy") and _kw_is(node, "allow_pickle", true):
            bad = f"{name}(allow_pickle=True)"
        elif last == "read_pickle":
            bad = name
        if bad:
            hits.append(f"{filename}:{node.lineno}: {bad}")
    return hits


def test_unsafe_load_scanner_catches_known_bad_code():
    bad = """
import pickle
from dill import loads
pickle.load(open('x', 'rb'))
torch.load('w.pt')
torch.load('w.pt', weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
eval(user_text)
exec(code)
np.load('a.npy', allow_pickle=True)
pd.read_pickle('t.pkl')
torch.jit.load('m.pt')
"""
    assert sorted({int(h.split(':')[1]) for h in unsafe_loads(bad)}) == list(range(2, 15))  # every line
    good = """
torch.load('w.pt', weights_only=True, map_location='cpu')
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
class Strict(yaml.SafeLoader): pass
yaml.load(text, Loader=Strict)
np.load('a.npy')
model.eval()
json.loads(s)
safetensors.torch.load_file(p)
"""
    assert unsafe_loads(good) == []


def test_no_unsafe_loads_in_the_code():
    """Weights only via safetensors, metadata only via JSON/TOML/YAML safe loaders: no code runs from data."""
    hits = []
    for f in sorted(SRC.rglob("*.py")):
        hits += unsafe_loads(f.read_text(), str(f.relative_to(ROOT)))
    assert hits == [], "unsafe loads:\n" + "\n".join(hits)


def test_yaml_python_tag_is_refused_and_never_runs(tmp_path):
    from csn.cli import main
    from csn.runs.config import load_config_file

    sentinel = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f'name: !!python/object/apply:os.system ["touch {sentinel}"]\nepochs: 1\n')
    with pytest.raises(CsnError, match="Python-specific YAML tag"):
        load_config_file(cfg)
    res = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "Python-specific YAML tag" in res.output
    assert not sentinel.exists() and not (tmp_path / "r").exists()


def test_run_name_cannot_escape_runs_folder(tmp_path, monkeypatch):
    """A config's name becomes runs/<name>: names that leave runs/ are refused; --out (the user's own
    choice of output) and data_root (an input) are not restricted."""
    from csn.cli import main

    monkeypatch.chdir(tmp_path)
    for name in ("../../etc", "/etc", "..", "a/b", "a\\b", "C:evil"):
        (tmp_path / "c.toml").write_text(f'name = {json.dumps(name)}\ndataset = "synthetic"\n')
        res = CliRunner().invoke(main, ["train", "--config", "c.toml"])
        assert res.exit_code == 2 and "cannot be a folder under runs/" in res.output, (name, res.output)
        res = CliRunner().invoke(main, ["train", "--preset", "smoke", f"name={name}"])
        assert res.exit_code == 2 and "cannot be a folder under runs/" in res.output, (name, res.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # nothing was created anywhere


# ============================================================================ concurrency
_HOLDER = """
import sys, time
from csn.runs import run_lock
with run_lock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _start_holder(run_dir: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=child_env(),
                         text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_refused_and_stale_lock_recovered(tiny_run):
    """Real processes: a live holder blocks every writer with its pid; once it is SIGKILLed (its lock file
    stays behind with a dead pid) the next writer goes ahead."""
    holder = _start_holder(tiny_run)
    try:
        assert lock_holder(tiny_run) == holder.pid
        with pytest.raises(CsnError, match=rf"another csn process is writing in .* \(pid {holder.pid}\)"):
            with run_lock(tiny_run):
                pass
        argv = csn_argv("train", "--resume", "--out", str(tiny_run), "--quiet")
        r = subprocess.run(argv, capture_output=True, text=True, env=child_env(), timeout=COMMAND_TIMEOUT)
        assert r.returncode == 2, r.stderr
        assert f"another csn process is writing in {tiny_run} (pid {holder.pid})" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    lock = Path(tiny_run) / ".lock"
    assert lock.is_file() and lock.read_text().split()[0] == str(holder.pid)  # stale: its pid is dead
    assert lock_holder(tiny_run) is None
    (Path(tiny_run) / "tables" / ".training.parquet.x1y2z3.tmp").write_bytes(b"half")  # a killed write
    with run_lock(tiny_run, "test"):
        assert lock.read_text().split()[0] == str(os.getpid())
        assert not (Path(tiny_run) / "tables" / ".training.parquet.x1y2z3.tmp").exists()
    assert not lock.exists()


def test_force_refuses_to_delete_a_run_being_written(tiny_run):
    from csn.training.loop import _prepare_dir
    from tests.conftest import tiny_config

    holder = _start_holder(tiny_run)
    try:
        with pytest.raises(CsnError, match=rf"pid {holder.pid}"):
            _prepare_dir(tiny_config(), Path(tiny_run), resume=False, force=True)
        assert (Path(tiny_run) / "run.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path):
    import threading

    with run_lock(tmp_path, "outer"):
        with run_lock(tmp_path, "inner"):
            pass
        assert (tmp_path / ".lock").exists()  # the inner exit does not release the outer lock
        errors = []
        t = threading.Thread(target=lambda: errors.append(_try_lock(tmp_path)))
        t.start()
        t.join()
        assert errors and isinstance(errors[0], CsnError)
    assert not (tmp_path / ".lock").exists()


def _try_lock(path):
    try:
        with run_lock(path):
            return None
    except CsnError as e:
        return e


def test_two_analyses_started_at_once_do_not_corrupt_the_table(harness):
    """Two `csn selectivity` on one run at the same moment: one computes, the other is refused with the
    holder's pid (or finds the work done); the table equals the uninterrupted reference."""
    ref = harness.reference("selectivity")
    cmd = harness.cmds["selectivity"]
    work = harness.root / "two-writers"
    work.mkdir()
    run_dir = harness.prepare("selectivity")(work)
    ps = [subprocess.Popen(cmd.argv(run_dir, resume=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env=child_env(), text=True) for _ in range(2)]
    outs = [p.communicate(timeout=COMMAND_TIMEOUT) for p in ps]
    codes = sorted(p.returncode for p in ps)
    assert codes in ([0, 0], [0, 2]), outs
    for p, (_, err) in zip(ps, outs):
        if p.returncode == 2:
            other = next(q.pid for q in ps if q is not p)
            assert f"another csn process is writing in {run_dir} (pid {other})" in err, err
        assert "Traceback" not in err
    got = snapshot(run_dir, cmd)
    assert compare(ref, got) == [], (codes, outs, {k: v.shape for k, v in got["tables"].items()},
                                     {k: v.shape for k, v in ref["tables"].items()})


# ============================================================================ resource limits
def test_training_refuses_to_start_when_checkpoints_cannot_fit_the_disk(tmp_path, monkeypatch):
    import csn.core.resources as res
    from csn.cli import main
    from csn.training.loop import train
    from tests.conftest import tiny_config

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(res.shutil, "disk_usage", lambda p: usage(10**12, 10**12 - 10**5, 10**5))
    out = tmp_path / "r"
    with pytest.raises(CsnError, match=r"not enough free disk space .* checkpoints of .* MB each.*sparser --checkpoints"):
        train(tiny_config(), out, progress=False)
    assert not (out / "checkpoints").exists() and not (out / "run.json").exists()  # refused before any write
    cfg = tmp_path / "c.toml"
    cfg.write_text('dataset = "synthetic"\nmodel = "resnet8"\nwidth = 0.5\nepochs = 1\nchannels_last = false\n'
                   '[synthetic]\nnum_train = 128\nnum_test = 64\nsize = 8\nchannels = 1\nnum_classes = 4\n')
    r = CliRunner().invoke(main, ["train", "--config", str(cfg), "--out", str(out), "--quiet", "--device", "cpu"])
    assert r.exit_code == 2 and "not enough free disk space" in r.output and "CSN_NO_DISK_CHECK" in r.output
    monkeypatch.setenv("CSN_NO_DISK_CHECK", "1")  # the escape hatch for file systems that misreport
    res.check_disk_space(out, 10**9)


def test_disk_estimate_matches_what_training_writes(tiny_run_master):
    """The estimate is the weights of every scheduled checkpoint: compare with the files actually written."""
    from csn.core.resources import state_dict_bytes

    run = Run(tiny_run_master)
    weights = state_dict_bytes(run.load_state(run.checkpoints[-1]))
    written = sum((run.ckpt_dir / c.file).stat().st_size for c in run.checkpoints)
    n = len(run.info["checkpoint_steps"])
    assert n * weights <= written <= n * weights * 1.05 + 2**20


def test_disk_full_during_a_write_is_one_clear_error(tmp_path, monkeypatch):
    import csn.training.loop as loop
    from csn.cli import main

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "r" / "checkpoints" / "x.tmp"))

    monkeypatch.setattr(loop, "train", full)
    r = CliRunner().invoke(main, ["train", "--preset", "smoke", "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "error: the disk is full while writing" in r.output and "--resume" in r.output

    def bug(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop, "train", bug)
    r = CliRunner().invoke(main, ["train", "--preset", "smoke", "--out", str(tmp_path / "r")])
    assert isinstance(r.exception, RuntimeError)  # bugs keep their traceback


class _Big:
    """Stands for memory a failed attempt held (weak-referenceable)."""


def test_retry_smaller_batches_halves_on_out_of_memory():
    from csn.core.resources import retry_smaller_batches

    calls, held = [], []

    def fn(batch):
        calls.append(batch)
        big = _Big()
        held.append(weakref.ref(big))
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 10

    retries = []
    assert retry_smaller_batches(fn, 128, on_retry=lambda a, b: retries.append((a, b))) == 160
    assert calls == [128, 64, 32, 16] and retries == [(128, 64), (64, 32), (32, 16)]
    assert all(r() is None for r in held[:-1])  # what failed attempts held was released
    for msg in ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes",
                "MPS backend out of memory"):
        seen = []

        def cpu(batch, msg=msg, seen=seen):
            seen.append(batch)
            if batch > 3:
                raise RuntimeError(msg)
            return batch

        assert retry_smaller_batches(cpu, 12, on_retry=lambda a, b: None) == 3 and seen == [12, 6, 3]


def test_retry_smaller_batches_gives_up_clearly_and_passes_other_errors():
    from csn.core.resources import retry_smaller_batches

    def always(batch):
        raise torch.OutOfMemoryError("out of memory")

    with pytest.raises(CsnError, match="ran out of memory even with batch size 2"):
        retry_smaller_batches(always, 8, min_batch=2, on_retry=lambda a, b: None)
    calls = []

    def other(batch):
        calls.append(batch)
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        retry_smaller_batches(other, 8)
    assert calls == [8]
    with pytest.raises(CsnError, match="batch size"):
        retry_smaller_batches(lambda b: b, 0)
