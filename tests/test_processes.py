"""Child processes die with their parent (issue 15, item 7), and Ctrl-C stops a pool of training workers cleanly.

The real commands run as subprocesses (`csn reproduce` and `csn experiment regularize`, the smoke preset, 2 worker
processes). Every descendant is recorded from /proc while the workers train; the parent is SIGKILLed alone (not
its process group) and within a few seconds no recorded descendant may be alive (the training workers and
multiprocessing's resource tracker). The experiment is then run again and must equal an uninterrupted one
bitwise (checkpoint sha256s, manifests, run.json, training tables: the harness of test_reliability.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import csn.experiments.runner as runner
from csn.runs import read_table
from csn.runs.verify import verify_run
from tests.test_reliability import child_env, commands, compare, csn_argv, interruptible, snapshot

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="walks /proc (Linux)")

EXPERIMENT = ["experiment", "regularize", "--preset", "smoke", "--alpha", "-1", "--onsets", "0", "--seeds", "2",
              "--parallel", "2", "--no-selectivity", "--quiet", "epochs=1"]
RUNS = ["baseline-s0", "baseline-s1", "reg-from-0-s0", "reg-from-0-s1"]  # in job order: 2 start, 2 wait
GONE_WITHIN_S = 5.0


# ============================================================================ /proc
def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): a process, not a pid that may be reused."""
    st = _stat(pid)
    return None if st is None else (pid, st[19])


def alive(proc: tuple[int, str]) -> bool:
    st = _stat(proc[0])
    return st is not None and st[19] == proc[1] and st[0] not in ("Z", "X")  # a zombie is dead


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every living descendant of `pid` (children, their children, ...)."""
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and (st := _stat(int(p.name))) is not None:
            parents.setdefault(int(st[1]), []).append(int(p.name))
    found, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return [i for i in map(_identity, found) if i is not None]


def cmdline(proc: tuple[int, str]) -> str:
    try:
        return Path(f"/proc/{proc[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _started(root: Path) -> list[str]:
    """Runs that have written their first checkpoint (training is under way)."""
    return sorted(p.parent.parent.name for p in root.glob("*/checkpoints/manifest.jsonl") if p.read_text().strip())


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=child_env(), cwd=log.parent,
                            start_new_session=True, preexec_fn=interruptible)


def _wait_for_training(p: subprocess.Popen, root: Path, log: Path, workers: int = 2, timeout: float = 300) -> None:
    """Until `workers` runs have written their first checkpoint and as many worker processes live."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, f"the command ended before its workers trained:\n{log.read_text()[-3000:]}"
        kids = [d for d in descendants(p.pid) if "spawn_main" in cmdline(d)]
        if len(_started(root)) >= workers and len(kids) >= workers:
            return
        time.sleep(0.02)
    raise AssertionError(f"no {workers} workers training after {timeout} s:\n{log.read_text()[-3000:]}")


def _assert_all_gone(procs: list[tuple[int, str]], within: float = GONE_WITHIN_S) -> float:
    t0 = time.monotonic()
    while any(alive(x) for x in procs) and time.monotonic() - t0 < within:
        time.sleep(0.05)
    left = [(x[0], cmdline(x)[:120]) for x in procs if alive(x)]
    for pid, _ in left:  # do not leave them running after a failed test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still alive {within} s after their parent was killed: {left}"
    return time.monotonic() - t0


# ============================================================================ die_with_parent
_CHILD = """
import sys, time
import csn.core.processes as p
if sys.argv[1] == "watchdog":  # the portable path alone (other POSIX systems)
    p._set_parent_death_signal = lambda sig: False
print(p.die_with_parent(int(sys.argv[2]), poll_s=0.1), flush=True)
time.sleep(120)
"""
_PARENT = """
import os, subprocess, sys, time
c = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], str(os.getpid())], stdout=subprocess.PIPE, text=True)
print(c.pid, c.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("mode", ["prctl", "watchdog"])
def test_die_with_parent_on_sigkill(mode):
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, mode], stdout=subprocess.PIPE, text=True,
                              env=child_env())
    pid, armed = parent.stdout.readline().split()
    assert armed == str(mode == "prctl" and sys.platform.startswith("linux"))
    child = _identity(int(pid))
    assert child is not None and alive(child)
    time.sleep(0.3)
    assert alive(child)  # the watchdog leaves a child with a living parent alone
    parent.kill()
    parent.wait()
    _assert_all_gone([child], within=2.0)


def test_die_with_parent_when_the_parent_is_already_gone():
    """The race: a parent that died before the child armed the signal (its pid is no longer the child's parent)."""
    code = "import os, csn.core.processes as p; p.die_with_parent(os.getppid() + 4194304); print('survived')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == -signal.SIGKILL and "survived" not in r.stdout, (r.returncode, r.stdout, r.stderr)


def test_an_interrupted_worker_starts_no_new_job(monkeypatch):
    """After its SIGINT a worker refuses the tasks still queued to it (they must not start training)."""
    trained = []
    monkeypatch.setitem(runner._worker, "stopping", False)
    runner._run_task(trained.append, ("a",), None)
    assert trained == ["a"]
    runner._on_interrupt(signal.SIGINT, None)  # between tasks: no exception, only the mark
    with pytest.raises(KeyboardInterrupt):
        runner._run_task(trained.append, ("b",), None)
    assert trained == ["a"]


# ============================================================================ the real commands
def _kill_while_training(argv: list[str], root: Path, log: Path) -> None:
    """Start the command, SIGKILL it (the parent alone, as the OOM killer or `kill -9 PID` would) once its 2
    workers train, and check that every process it started (workers, resource tracker) is gone within seconds."""
    p = _start(argv, log)
    try:
        _wait_for_training(p, root, log)
        procs = descendants(p.pid)
        kinds = [cmdline(x) for x in procs]
        assert sum("spawn_main" in k for k in kinds) >= 2 and any("resource_tracker" in k for k in kinds), kinds
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    print(f"{argv[3]}: {len(procs)} descendants gone {_assert_all_gone(procs):.2f} s after the parent's SIGKILL")


def test_sigkill_of_reproduce_leaves_no_process_behind(tmp_path):
    """`csn reproduce` (the smoke study, 2 workers); `csn experiment regularize` in the next test."""
    root = tmp_path / "out"
    _kill_while_training(csn_argv("reproduce", "--preset", "smoke", "--quiet", "--out", str(root)), root,
                         tmp_path / "log.txt")


@pytest.fixture(scope="module")
def reference_experiment(tmp_path_factory) -> Path:
    """The experiment run once, uninterrupted."""
    root = tmp_path_factory.mktemp("ref") / "exp"
    log = root.parent / "log.txt"
    r = subprocess.run(csn_argv(*EXPERIMENT, "--out", str(root)), stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                       env=child_env(), cwd=root.parent, timeout=900)
    assert r.returncode == 0, log.read_text()[-3000:]
    return root


def _assert_equal_to(ref: Path, root: Path) -> None:
    train = commands(root / "unused.toml")["train"]
    for name in RUNS:
        assert compare(snapshot(ref / name, train), snapshot(root / name, train)) == [], name
        assert verify_run(root / name) == []
    cols = lambda df: df.drop(columns=["run"]).reset_index(drop=True)  # noqa: E731  (paths differ)
    assert cols(read_table(ref / "regularize_runs.parquet")).equals(cols(read_table(root / "regularize_runs.parquet")))


def test_resume_after_sigkill_is_bitwise_equal(reference_experiment, tmp_path):
    """SIGKILL of `csn experiment regularize` while run 2 has just started: no process it started survives; the
    workers died with it, leaving partial runs (stale
    locks, maybe a temporary file); the same command again finishes them, equal to the uninterrupted experiment."""
    root = tmp_path / "exp"
    log = tmp_path / "log.txt"
    argv = csn_argv(*EXPERIMENT, "--out", str(root))
    _kill_while_training(argv, root, log)
    assert not runner.is_complete(root / _started(root)[-1])  # the kill hit a run in training
    r = subprocess.run(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=child_env(), timeout=900)
    assert r.returncode == 0, log.read_text()[-3000:]
    _assert_equal_to(reference_experiment, root)


def test_ctrl_c_stops_the_workers_at_once_and_resumes_equal(reference_experiment, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while 2 workers train and 2 jobs wait: the
    command stops within seconds (before, every queued run was trained first), exits 130 naming the command line
    that continues, leaves no process and no lock behind; that command line finishes the experiment, equal to
    the uninterrupted one."""
    root = tmp_path / "exp"
    log = tmp_path / "log.txt"
    argv = csn_argv(*EXPERIMENT, "--out", str(root))
    p = _start(argv, log)
    try:
        _wait_for_training(p, root, log)
        procs = descendants(p.pid)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        rc = p.wait(timeout=120)
        stopped_s = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = log.read_text()
    assert rc == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    again = f"run `csn {' '.join(EXPERIMENT)} --out {root}` to continue where it stopped."
    assert text.strip().splitlines()[-1] == f"interrupted: finished checkpoints and table rows are saved; {again}"
    _assert_all_gone(procs, within=1.0)  # the command waited for its workers
    assert not list(root.glob("*/.lock")) and not list(root.rglob(".*.tmp"))  # clean stops
    done = [n for n in RUNS if runner.is_complete(root / n)]
    assert len(done) < len(RUNS), "the queued runs were trained after Ctrl-C"
    print(f"stopped {stopped_s:.1f} s after Ctrl-C with {len(done)} of {len(RUNS)} runs complete")
    r = subprocess.run(argv, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=child_env(), timeout=900)
    assert r.returncode == 0, log.read_text()[-3000:]
    _assert_equal_to(reference_experiment, root)
