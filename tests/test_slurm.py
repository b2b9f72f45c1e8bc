"""--launcher slurm against a fake Slurm (tests/fake_slurm.py: sbatch, srun, sacct, squeue, scancel, scontrol on
PATH), so that submitit's real Slurm code path runs: tables equal to --launcher local, a preempted job requeued and
its run resumed bitwise, finished and pending runs never resubmitted, Ctrl-C cancelling, one-sentence errors."""

from __future__ import annotations

import _thread
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from csn.cli import main as cli
from csn.errors import CsnError
from csn.experiments import launcher as L
from csn.experiments.runner import Job, Task, is_complete, last_step
from csn.runs.config import preset
from csn.training.loop import train
from tests import fake_slurm
from tests.slurm_tasks import note

pytest.importorskip("submitit")
import submitit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WINDOWS = ["experiment", "windows", "--preset", "smoke", "--alphas", "-3", "--windows", "tile:2", "--seeds", "2",
           "--quiet"]


@pytest.fixture()
def slurm(tmp_path, monkeypatch) -> Path:
    """The fake Slurm first on PATH; jobs run one thread each (as --parallel 2 workers do on 2 cores)."""
    folder = tmp_path / "fake-slurm"
    bin_ = fake_slurm.install(folder)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(folder))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(L, "POLL_S", 0.3)
    return folder


def fake_jobs(folder: Path) -> dict[str, dict]:
    """The fake's record of each job, once every job has ended (the command may return while a job's script is
    still exiting: submitit's result file is written first)."""
    for _ in range(200):
        jobs = {p.stem: json.loads(p.read_text()) for p in (folder / "jobs").glob("*.json")}
        if all(j["state"] not in ("PENDING", "RUNNING", "REQUEUED") for j in jobs.values()):
            break
        time.sleep(0.05)
    return jobs


def same_outputs(a: Path, b: Path) -> None:
    """Every parquet table (wall-time columns aside), every checkpoint's sha256: scripts/compare_outputs.py."""
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_outputs.py"), str(a), str(b)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_windows_on_slurm_equals_local_and_finished_runs_are_not_resubmitted(slurm, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "slurm"
    res = CliRunner().invoke(cli, WINDOWS + ["--out", str(local)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, WINDOWS + ["--out", str(remote), "--launcher", "slurm", "--slurm-partition", "cpu",
                                             "--slurm-time", "30", "--slurm-extra", "qos=low"])
    assert res.exit_code == 0, res.output
    jobs = fake_jobs(slurm)
    assert len(jobs) == 6 and all(j["state"] == "COMPLETED" for j in jobs.values())
    script = Path(next(iter(jobs.values()))["script"]).read_text()
    assert "#SBATCH --partition=cpu" in script and "#SBATCH --time=30" in script and "#SBATCH --qos=low" in script
    recorded = json.loads((remote / ".slurm" / "jobs.json").read_text())
    assert sorted(recorded.values()) == sorted(jobs)
    same_outputs(local, remote)
    res = CliRunner().invoke(cli, WINDOWS + ["--out", str(remote), "--launcher", "slurm"])  # all finished
    assert res.exit_code == 0, res.output
    assert len(fake_jobs(slurm)) == 6


@pytest.mark.slow
def test_the_smoke_windows_preset_on_slurm_equals_local(slurm, tmp_path):
    """The issue's command as given: `csn experiment windows --preset smoke --launcher slurm` (12 runs)."""
    args = ["experiment", "windows", "--preset", "smoke", "--quiet"]
    for out, more in (("local", []), ("slurm", ["--launcher", "slurm"])):
        res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / out)] + more)
        assert res.exit_code == 0, res.output
    jobs = fake_jobs(slurm)
    assert len(jobs) == 12 and all(j["state"] == "COMPLETED" for j in jobs.values())
    same_outputs(tmp_path / "local", tmp_path / "slurm")


def test_no_wait_submits_and_the_same_command_collects_without_resubmitting(slurm, tmp_path):
    out = tmp_path / "reg"
    args = ["experiment", "regularize", "--preset", "smoke", "--seeds", "2", "--alpha", "-1", "--onsets",
            "step=0,f0.5", "--out", str(out), "--quiet", "--launcher", "slurm"]
    res = CliRunner().invoke(cli, args + ["--no-wait"])
    assert res.exit_code == 0, res.output
    assert "6 training run(s) on Slurm (6 submitted now" in res.output and "run the same command again" in res.output
    assert not (out / "regularize.parquet").exists()
    res = CliRunner().invoke(cli, args)  # waits for the jobs still pending or running, submits nothing
    assert res.exit_code == 0, res.output
    assert len(fake_jobs(slurm)) == 6
    local = tmp_path / "local"
    res = CliRunner().invoke(cli, args[:args.index("--out")] + ["--out", str(local), "--quiet"])
    assert res.exit_code == 0, res.output
    same_outputs(local, out)


def graph_task(log: Path, key: str, after: tuple[str, ...] = (), writes: Path | None = None, fail: bool = False):
    return Task(key, note, (str(log), key, fail), after=after, writes=str(writes), kind="analysis")


def test_a_graph_of_tasks_is_jobs_that_wait_on_their_dependencies_and_never_share_a_run(slurm, tmp_path):
    """`launch` submits every task at once; Slurm (the fake honours afterok) starts each after the jobs it waits
    on, and two tasks writing in one run folder never run at the same time (a dependency is added between them)."""
    exp, log = tmp_path / "exp", tmp_path / "log.txt"
    tasks = [graph_task(log, "a1", writes=exp / "a"), graph_task(log, "a2", ("a1",), exp / "a"),
             graph_task(log, "a3", ("a1",), exp / "a"), graph_task(log, "b1", writes=exp / "b"),
             graph_task(log, "c1", ("a2", "b1"), exp / "c")]
    assert L.launch(tasks, L.LauncherOptions.parse({"launcher": "slurm"}), progress=False) == {}
    assert sorted(log.read_text().split()) == ["a1", "a2", "a3", "b1", "c1"]
    ids = {k.removeprefix("task:"): v for k, v in json.loads((exp / ".slurm" / "jobs.json").read_text()).items()}
    jobs = fake_jobs(slurm)
    assert all(j["state"] == "COMPLETED" for j in jobs.values()) and len(jobs) == 5
    job = {k: jobs[v] for k, v in ids.items()}
    assert set(job["c1"]["after"]) == {ids["a2"], ids["b1"]} and job["b1"]["after"] == []
    for j in jobs.values():
        assert all(j["started"] >= jobs[a]["ended"] for a in j["after"])
    first, second = sorted((job["a2"], job["a3"]), key=lambda j: j["started"])
    assert second["started"] >= first["ended"]  # the two writers of run a, one after the other


def test_a_failed_task_cancels_the_jobs_waiting_on_it_and_is_named_first(slurm, tmp_path):
    exp, log = tmp_path / "exp", tmp_path / "log.txt"
    tasks = [graph_task(log, "bad", writes=exp / "a", fail=True), graph_task(log, "next", ("bad",), exp / "b"),
             graph_task(log, "fine", writes=exp / "c")]
    with pytest.raises(CsnError) as e:
        L.launch(tasks, L.LauncherOptions.parse({"launcher": "slurm"}), progress=False)
    ids = {k.removeprefix("task:"): v for k, v in json.loads((exp / ".slurm" / "jobs.json").read_text()).items()}
    assert str(e.value).startswith(f"2 Slurm job(s) failed, first job {ids['bad']} (failed) ended without finishing "
                                   "bad; its log: ")
    jobs = fake_jobs(slurm)
    assert [jobs[ids[k]]["state"] for k in ("bad", "next", "fine")] == ["FAILED", "CANCELLED", "COMPLETED"]
    assert sorted(log.read_text().split()) == ["bad", "fine"]


def test_a_preempted_job_is_requeued_and_its_run_resumes_bitwise(slurm, tmp_path, one_thread):
    cfg = preset("smoke").override(["epochs=8"])  # 64 steps: a few seconds to be preempted in
    out = tmp_path / "exp" / "run"

    def preempt() -> None:  # what Slurm does before preempting: SIGTERM, then submitit's SIGUSR2
        while last_step(out) < 4:
            time.sleep(0.05)
        job_id = json.loads((tmp_path / "exp" / ".slurm" / "jobs.json").read_text())["run"]
        submitit.SlurmJob(folder=tmp_path / "exp" / ".slurm" / "%j", job_id=job_id)._interrupt()

    t = threading.Thread(target=preempt)
    t.start()
    L.train_jobs([Job(cfg, out)], L.LauncherOptions.parse({"launcher": "slurm"}), progress=False)
    t.join()
    (job,) = fake_jobs(slurm).values()
    assert job["starts"] == 2 and job["state"] == "COMPLETED"  # requeued once, under the same job id
    log = next((tmp_path / "exp" / ".slurm").glob("*/*_0_log.err")).read_text()
    assert "Caught signal SIGUSR2" in log and "this job is preempted" in log
    train(cfg, tmp_path / "alone", progress=False)  # uninterrupted, one thread as the job
    ckpts = [(r["step"], r["sha256"]) for r in map(json.loads, (out / "checkpoints" / "manifest.jsonl").open())]
    alone = [(r["step"], r["sha256"]) for r in map(json.loads, (tmp_path / "alone" / "checkpoints" /
                                                                "manifest.jsonl").open())]
    assert ckpts == alone


def test_ctrl_c_cancels_what_it_submitted(slurm, tmp_path):
    cfg = preset("smoke").override(["epochs=40"])
    record = tmp_path / "exp" / ".slurm" / "jobs.json"

    def interrupt() -> None:
        while not record.is_file():
            time.sleep(0.05)
        _thread.interrupt_main()

    # Ctrl-C's own handler: an earlier test may leave SIGINT ignored in this process (interrupt_main is then a no-op)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt).start()
        with pytest.raises(KeyboardInterrupt):
            L.train_jobs([Job(cfg, tmp_path / "exp" / "run")], L.LauncherOptions.parse({"launcher": "slurm"}),
                         progress=False)
    finally:
        signal.signal(signal.SIGINT, old)
    (job,) = fake_jobs(slurm).values()
    assert job["state"] == "CANCELLED"
    assert not is_complete(tmp_path / "exp" / "run")


def test_without_submitit_one_sentence_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "submitit", None)
    res = CliRunner().invoke(cli, WINDOWS + ["--out", str(tmp_path / "w"), "--launcher", "slurm"])
    assert res.exit_code != 0 and not (tmp_path / "w").exists()
    assert res.output.strip() == ("error: --launcher slurm needs submitit, which is not installed; run `pip install "
                                  "'csn[slurm]'`.")


@pytest.mark.parametrize("args, message", [
    (["--launcher", "slurm", "--slurm-time", "0"], "--slurm-time must be >= 1, got '0'."),
    (["--slurm-partition", "gpu"], "--slurm-partition is an option of --launcher slurm; add --launcher slurm or "
                                   "leave it out."),
    (["--launcher", "slurm", "--gpus-per-run", "3", "--nodes-per-run", "2"], "--gpus-per-run 3 does not divide "
                                                                             "evenly over --nodes-per-run 2"),
    (["--launcher", "slurm", "--slurm-extra", "qos"], "--slurm-extra: each value is KEY=VALUE"),
    (["--launcher", "pbs"], "--launcher"),
])
def test_bad_launcher_options_are_one_line_errors(tmp_path, args, message):
    res = CliRunner().invoke(cli, WINDOWS + ["--out", str(tmp_path / "w")] + args)
    assert res.exit_code != 0 and not (tmp_path / "w").exists()
    errors = [line for line in res.output.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and message in errors[0]


def test_a_multi_gpu_run_is_one_job_of_one_task_per_gpu():
    o = L.LauncherOptions.parse({"launcher": "slurm", "gpus_per_run": 16, "nodes_per_run": 2, "slurm_account": "lab",
                                 "slurm_extra": ("cpus-per-task=10",)})
    assert o.distributed and o.parameters("csn-x") == {
        "name": "csn-x", "timeout_min": 1440, "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8,
        "slurm_account": "lab", "slurm_additional_parameters": {"cpus-per-task": "10"}}
    assert not L.LauncherOptions.parse({"launcher": "slurm"}).distributed


@pytest.mark.slow
def test_reproduce_on_slurm_equals_local(slurm, tmp_path):
    args = ["reproduce", "--preset", "smoke", "--quiet"]
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "local")])
    assert res.exit_code == 0, res.output
    remote = args + ["--out", str(tmp_path / "slurm"), "--launcher", "slurm"]
    res = CliRunner().invoke(cli, remote + ["--no-wait"])  # the whole study submitted: runs and analyses
    assert res.exit_code == 0, res.output
    assert "6 training run(s) and 10 analysis job(s) on Slurm (16 submitted now" in res.output
    assert "run the same command with --resume" in res.output and not (tmp_path / "slurm" / "claims.json").exists()
    res = CliRunner().invoke(cli, remote + ["--resume"])  # waits for them, then the claims and the report
    assert res.exit_code == 0, res.output
    same_outputs(tmp_path / "local", tmp_path / "slurm")
    record = json.loads((tmp_path / "slurm" / ".slurm" / "jobs.json").read_text())
    jobs = fake_jobs(slurm)
    assert sum(k.startswith("task:") for k in record) == 10 and all(j["state"] == "COMPLETED" for j in jobs.values())
    for j in jobs.values():  # every analysis started after the jobs it waited on (its runs, the baseline's peak)
        assert all(j["started"] >= jobs[a]["ended"] for a in j["after"])
    assert sum(bool(j["after"]) for j in jobs.values()) >= 10


def test_slurm_under_torchrun_is_refused_before_anything_is_written(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = CliRunner().invoke(cli, ["reproduce", "--preset", "smoke", "--launcher", "slurm", "--out", str(tmp_path / "r")])
    assert res.exit_code != 0 and not (tmp_path / "r").exists()
    assert res.output.strip() == ("error: --launcher slurm submits jobs that start their own processes; run the "
                                  "command without torchrun.")


def test_a_run_of_several_tasks_is_one_process_group_equal_to_torchrun(slurm, tmp_path):
    """--nodes-per-run 2 on a CPU job: one job of two tasks (the fake srun starts both here), whose Slurm ranks
    become the torch process group (gloo): the run records world size 2 and its checkpoints equal those of the same
    run under `torchrun --nproc_per_node=2`, bitwise."""
    cfg = preset("smoke").override(["epochs=1"])
    options = L.LauncherOptions.parse({"launcher": "slurm", "nodes_per_run": 2})
    assert options.distributed and options.parameters("x")["nodes"] == 2
    L.train_jobs([Job(cfg, tmp_path / "exp" / "run")], options, progress=False)
    out = tmp_path / "exp" / "run"
    assert is_complete(out) and json.loads((out / "run.json").read_text())["world_size"] == 2
    env = dict(os.environ, OMP_NUM_THREADS="1", CSN_NO_PROGRESS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "csn", "train", "--preset", "smoke", "--out", str(tmp_path / "tr"), "--quiet", "epochs=1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sha = [[(r["step"], r["sha256"]) for r in map(json.loads, (d / "checkpoints" / "manifest.jsonl").open())]
           for d in (out, tmp_path / "tr")]
    assert sha[0] == sha[1]


@pytest.mark.parametrize("args", [["reproduce", "--preset", "smoke"], ["experiment", "windows", "--preset", "smoke"],
                                  ["experiment", "regime", "--preset", "smoke"]])
def test_plans_under_slurm_say_one_job_each_not_n_at_a_time(tmp_path, args):
    res = CliRunner().invoke(cli, args + ["--out", str(tmp_path / "x"), "--dry-run", "--launcher", "slurm"])
    assert res.exit_code == 0, res.output
    first = next(line for line in res.output.splitlines() if "to train" in line)
    assert first.endswith("to train, one Slurm job each")
    assert "if run here 2 at a time; on Slurm the wall time is as the cluster schedules the jobs" in res.output
    assert not (tmp_path / "x").exists()


def test_a_study_files_launcher_table_is_the_command_lines_default(tmp_path):
    from csn.cli.options import launcher_request
    from csn.experiments.study import launcher_table

    f = tmp_path / "study.toml"
    f.write_text('preset = "smoke"\n\n[launcher]\nlauncher = "slurm"\nslurm_partition = "cpu"\nslurm_extra = '
                 '["qos=low"]\n')
    none, where = {k: None for k in L.LauncherOptions.model_fields}, f"study file {f}"
    o = launcher_request(dict(none), launcher_table(f), where)
    assert (o.launcher, o.slurm_partition, o.slurm_extra) == ("slurm", "cpu", ("qos=low",))
    assert launcher_request({**none, "slurm_partition": "gpu"}, launcher_table(f), where).slurm_partition == "gpu"
    o = launcher_request({**none, "launcher": "local"}, launcher_table(f), where)  # the file's Slurm keys wait
    assert o.launcher == "local" and o.slurm_partition is None
    res = CliRunner().invoke(cli, ["reproduce", "--config", str(f), "--dry-run", "--out", str(tmp_path / "x")])
    assert res.exit_code == 0 and "6 to train, one Slurm job each" in res.output, res.output
    f.write_text('preset = "smoke"\n\n[launcher]\nlauncher = "slurm"\npartition = "cpu"\n')
    res = CliRunner().invoke(cli, ["reproduce", "--config", str(f), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and not (tmp_path / "x").exists()
    assert res.output.strip().startswith(f"error: study file {f}: unknown [launcher] key 'partition' (closest: "
                                         "'slurm_partition')")
