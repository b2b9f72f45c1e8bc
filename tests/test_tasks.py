"""csn.experiments.runner.run_tasks: a task starts once the tasks it comes after have finished; among ready tasks
the one heading the heaviest chain of work first (the earlier in the list on a tie), in this process or in worker
processes; a cycle or an unknown name is refused before any work; a failing task stops the rest."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from csn.experiments import runner
from csn.experiments.runner import Task, run_tasks, schedule_seconds


def record(path: str, name: str, pause: float = 0.0) -> None:
    """A task for the tests: append `name` to a file (with the process id), after `pause` seconds."""
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"{name} {os.getpid()}\n")


def fail(path: str) -> None:
    raise RuntimeError("this task fails")


def _lines(path: Path) -> list[tuple[str, int]]:
    return [(a, int(b)) for a, b in (line.split() for line in path.read_text().splitlines())]


def test_tasks_run_after_their_dependencies_heaviest_chain_first(tmp_path):
    log = tmp_path / "log"
    tasks = [Task("c", record, (str(log), "c"), after=("b",)), Task("a", record, (str(log), "a")),
             Task("b", record, (str(log), "b"), after=("a",)), Task("d", record, (str(log), "d"))]
    run_tasks(tasks, parallel=1, progress=False)
    # a heads the chain a-b-c (3) and d only itself (1); then b (2) before d; then c and d tie: c is earlier in the list
    assert [n for n, _ in _lines(log)] == ["a", "b", "c", "d"]
    log.unlink()
    heavy = [Task("light", record, (str(log), "light")), Task("heavy", record, (str(log), "heavy"), weight=5.0)]
    run_tasks(heavy, parallel=1, progress=False)
    assert [n for n, _ in _lines(log)] == ["heavy", "light"]
    assert {p for _, p in _lines(log)} == {os.getpid()}


def test_tasks_already_done_are_not_run_again(tmp_path):
    log = tmp_path / "log"
    tasks = [Task("a", record, (str(log), "a")), Task("b", record, (str(log), "b"), after=("a",))]
    run_tasks(tasks, parallel=1, progress=False, done={"a"})
    assert [n for n, _ in _lines(log)] == ["b"]


def test_tasks_in_workers_wait_for_their_dependencies(tmp_path, capsys):
    log = tmp_path / "log"
    tasks = [Task("slow", record, (str(log), "slow", 5.0), label="the slow one"),
             Task("fast", record, (str(log), "fast")),
             Task("after-slow", record, (str(log), "after-slow"), after=("slow",)),
             Task("after-fast", record, (str(log), "after-fast"), after=("fast",))]
    run_tasks(tasks, parallel=2, progress=False, announce=True)
    lines = _lines(log)
    names = [n for n, _ in lines]
    assert sorted(names) == sorted(t.key for t in tasks)
    assert names.index("after-slow") > names.index("slow") and names.index("after-fast") > names.index("fast")
    assert names.index("after-fast") < names.index("slow")  # a free worker does not wait for the slow task
    assert os.getpid() not in {p for _, p in lines} and len({p for _, p in lines}) == 2
    err = capsys.readouterr().err
    assert "[1/4] the slow one (elapsed" in err and "[4/4] after-slow" in err


@pytest.mark.parametrize("tasks, message", [
    ([Task("a", record, ("x", "a"), after=("b",)), Task("b", record, ("x", "b"), after=("a",))], "cycle"),
    ([Task("a", record, ("x", "a"), after=("nope",))], "unknown task"),
])
def test_impossible_graphs_are_refused_before_any_work(tmp_path, tasks, message):
    with pytest.raises(ValueError, match=message):
        run_tasks(tasks, parallel=1, progress=False)
    assert not Path("x").exists()


def test_a_failing_task_stops_the_graph(tmp_path):
    log = tmp_path / "log"
    tasks = [Task("bad", fail, (str(log),)), Task("next", record, (str(log), "next"), after=("bad",))]
    for parallel in (1, 2):
        with pytest.raises(RuntimeError, match="this task fails"):
            run_tasks(tasks, parallel=parallel, progress=False)
    assert not log.exists()


def test_the_planned_time_follows_the_same_rule():
    """schedule_seconds plays run_tasks' rule with each task's weight as its seconds."""
    def t(key, w, after=()):
        return Task(key, record, ("x", key), after=after, weight=w)

    runs = [t("a", 10), t("b", 10), t("c", 10)]
    # a heads the heaviest chain (14): a and b from 0 to 10; then c and a's analysis from 10; c ends at 20
    assert schedule_seconds(runs + [t("an-a", 4, ("a",))], 2) == 20
    # the analysis of c waits for c, so c starts first: c and a from 0, then b and c's analysis from 10
    assert schedule_seconds(runs + [t("an-c", 4, ("c",))], 2) == 20
    # one at a time: the sum; done tasks cost nothing
    assert schedule_seconds(runs + [t("an-a", 4, ("a",))], 1) == 34
    assert schedule_seconds(runs + [t("an-a", 4, ("a",))], 2, done={"a", "b"}) == 10
    with pytest.raises(ValueError, match="cycle"):
        schedule_seconds([t("p", 1, ("q",)), t("q", 1, ("p",))], 2)


def test_tasks_writing_in_one_run_never_run_at_once(tmp_path):
    def w(key, weight, run):
        return Task(key, record, (str(tmp_path / "log"), key, 0.5), weight=weight, writes=run)

    assert schedule_seconds([w("a", 10, "r1"), w("b", 10, "r1"), w("c", 3, "r2")], 2) == 20
    assert schedule_seconds([w("a", 10, "r1"), w("b", 10, "r2")], 2) == 10
    log = tmp_path / "log"
    spans = tmp_path / "spans"
    tasks = [Task(k, span, (str(spans), k), writes="r1") for k in ("x", "y")] + [Task("z", span, (str(spans), "z"))]
    run_tasks(tasks, parallel=2, progress=False)
    times = {k: (float(a), float(b)) for k, a, b in (line.split() for line in spans.read_text().splitlines())}
    assert times["x"][1] <= times["y"][0] or times["y"][1] <= times["x"][0], times
    assert not log.exists()


def span(path: str, name: str) -> None:
    """A task for the tests: sleep 1 s and append `name start end` (wall clock) to a file."""
    t0 = time.time()
    time.sleep(1.0)
    with open(path, "a") as f:
        f.write(f"{name} {t0} {time.time()}\n")


SEEN_THREADS: list[int] = []


def _threads_task() -> None:
    import torch

    SEEN_THREADS.append(torch.get_num_threads())


def test_threads_per_task_come_from_the_cores_this_process_may_use(monkeypatch):
    """cores / parallel torch threads per task, where cores is the affinity mask (a Slurm allocation or a cpuset),
    not every core of the machine."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert runner.available_cores() == 3
    SEEN_THREADS.clear()
    run_tasks([Task("t", _threads_task)], parallel=1, progress=False)
    assert SEEN_THREADS == [3]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert runner.available_cores() == 1


def placed(path: str, name: str) -> None:
    """A task for the tests: append `name`, the GPU the worker was given and its memory share, after 1 s."""
    time.sleep(1.0)
    with open(path, "a") as f:
        f.write(f"{name} {os.environ.get('CUDA_VISIBLE_DEVICES')} {os.environ.get('CSN_GPU_MEMORY_SHARE')}\n")


def test_gpu_placement_spreads_workers_over_the_gpus_with_a_memory_share_each():
    assert runner.gpu_placement(4, []) == []
    assert runner.gpu_placement(4, ["0"]) == [("0", 0.25)] * 4
    assert runner.gpu_placement(3, ["a", "b"]) == [("a", 0.5), ("b", 1.0), ("a", 0.5)]
    assert runner.gpu_placement(2, ["0", "1", "2"]) == [("0", 1.0), ("1", 1.0)]


def test_workers_take_their_gpu_and_share(tmp_path, monkeypatch):
    """Each spawned worker sees only its GPU (CUDA_VISIBLE_DEVICES) and the memory share dist.resolve_device applies
    (without GPUs the placement is empty and the other tests' workers run as before)."""
    log = tmp_path / "log"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,GPU-9")
    run_tasks([Task(k, placed, (str(log), k)) for k in "ab"], parallel=2, progress=False)
    assert sorted(line.split()[1:] for line in log.read_text().splitlines()) == [["7", "1.0"], ["GPU-9", "1.0"]]
    log.unlink()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    run_tasks([Task(k, placed, (str(log), k)) for k in "abc"], parallel=2, progress=False)
    assert {tuple(line.split()[1:]) for line in log.read_text().splitlines()} == {("3", "0.5")}


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 1, GPU-ab ,")
    assert runner.visible_gpus() == ["1", "GPU-ab"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert runner.visible_gpus() == []  # none visible: workers are not placed
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: False)
    assert runner.visible_gpus() == []
    monkeypatch.setattr(runner.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runner.torch.cuda, "device_count", lambda: 2)
    assert runner.visible_gpus() == ["0", "1"]


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "half", "nan"])
def test_a_bad_gpu_share_is_refused_in_one_sentence(monkeypatch, bad):
    from csn import dist
    from csn.errors import CsnError

    monkeypatch.setenv(dist.GPU_SHARE_ENV, bad)
    assert dist.resolve_device("cpu").type == "cpu"  # a CPU run does not read it
    with pytest.raises(CsnError, match=r"is not a share of a GPU's memory in \(0, 1\]; unset it"):
        dist._gpu_share()
