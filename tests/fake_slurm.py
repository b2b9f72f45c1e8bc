"""A fake Slurm on one machine, faithful enough for submitit's real Slurm code path (tests/test_slurm.py).

`install(folder)` writes executable `sbatch`, `srun`, `sacct`, `squeue`, `scancel` and `scontrol` into folder/bin
(each runs this file); put that first on PATH and set FAKE_SLURM=folder. The fake keeps one JSON file per job in
folder/jobs/<id>.json (its state, script, task pids, starts):
- `sbatch SCRIPT` reads the #SBATCH lines (nodes, ntasks-per-node, output, error), records the job PENDING, starts
  it in the background and prints 'Submitted batch job N'. The job waits for a free slot (FAKE_SLURM_SLOTS jobs at
  once, default 2; PENDING meanwhile), then runs the script with bash (RUNNING) and SLURM_JOB_ID, SLURM_NTASKS, ...
  set, and ends COMPLETED (exit 0), FAILED, or CANCELLED; a job `scontrol requeue`d meanwhile runs again (the same
  id, REQUEUED then RUNNING: a requeue of a preempted job). `--dependency=afterok:A:B`: the job stays PENDING until
  jobs A and B are COMPLETED, and is CANCELLED if one of them ends otherwise (as with --kill-on-invalid-dep=yes).
  Each job records when it started and ended (time.time(): `started`, `ended`).
- `srun [--output F] [--error F] CMD` runs CMD once per task (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID set; %t in
  the paths replaced by the task id, output appended) and records the tasks' pids.
- `sacct -o JobID,State,NodeList --parsable2 -j ID ...` prints the recorded states; `squeue -h -j ID -o %T` the
  state of a job still queued or running.
- `scancel ID` kills the job's processes (CANCELLED); `scancel ID --signal SIG` only sends SIG to its tasks (what
  Slurm does before preempting or timing out a job: submitit's SIGUSR2 handler then checkpoints and requeues).
- `scontrol requeue ID` marks the job to run again once its script has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

COMMANDS = ("sbatch", "srun", "sacct", "squeue", "scancel", "scontrol")


def install(folder: Path) -> Path:
    """Write the fake commands into folder/bin; returns that folder (to put first on PATH)."""
    bin_ = folder / "bin"
    bin_.mkdir(parents=True, exist_ok=True)
    (folder / "jobs").mkdir(exist_ok=True)
    for name in COMMANDS:
        p = bin_ / name
        p.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).absolute()} {name} \"$@\"\n")
        p.chmod(0o755)
    return bin_


def _root() -> Path:
    return Path(os.environ["FAKE_SLURM"])


@contextmanager
def _locked():
    with open(_root() / "lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _path(job_id: str) -> Path:
    return _root() / "jobs" / f"{job_id}.json"


def read(job_id: str) -> dict:
    return json.loads(_path(job_id).read_text())


def _write(job_id: str, info: dict) -> None:
    tmp = _path(job_id).with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(_path(job_id))


def _update(job_id: str, **changes) -> dict:
    with _locked():
        info = read(job_id)
        info.update(changes)
        _write(job_id, info)
        return info


def sbatch(args: list[str]) -> None:
    script = Path(args[-1])
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script.read_text(), re.M))
    deps = opts.get("dependency", "")
    assert not deps or deps.startswith("afterok:"), f"the fake knows afterok dependencies only, not {deps}"
    with _locked():
        ids = [int(p.stem) for p in (_root() / "jobs").glob("*.json")]
        job_id = str(max(ids, default=1000) + 1)
        _write(job_id, {"state": "PENDING", "script": str(script), "requeue": False, "pids": [], "starts": 0,
                        "after": deps.split(":")[1:], "started": None, "ended": None,
                        "tasks": int(opts.get("nodes", "1") or 1) * int(opts.get("ntasks-per-node", "1") or 1),
                        "output": opts.get("output", "").strip("'"), "error": opts.get("error", "").strip("'")})
    subprocess.Popen([sys.executable, __file__, "_job", job_id], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"Submitted batch job {job_id}")


def _wait_for_slot(job_id: str) -> bool:
    """Wait while FAKE_SLURM_SLOTS other jobs run; then RUNNING. False when the job was cancelled meanwhile."""
    slots = int(os.environ.get("FAKE_SLURM_SLOTS", "2"))
    while True:
        with _locked():
            info = read(job_id)
            if info["state"] == "CANCELLED":
                return False
            after = [read(a)["state"] for a in info["after"]]
            if any(a not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETED") for a in after):
                info.update(state="CANCELLED", reason="DependencyNeverSatisfied")
                _write(job_id, info)
                return False
            running = sum(json.loads(p.read_text())["state"] == "RUNNING" for p in (_root() / "jobs").glob("*.json"))
            if running < slots and all(a == "COMPLETED" for a in after):
                info.update(state="RUNNING", starts=info["starts"] + 1, requeue=False, pgid=os.getpgrp(),
                            started=info["started"] or time.time())
                _write(job_id, info)
                return True
        time.sleep(0.2)


def _job(job_id: str) -> None:
    """The job's life: wait for a slot, run the script, requeue or end."""
    while _wait_for_slot(job_id):
        info = read(job_id)
        env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_JOBID=job_id, SLURM_NTASKS=str(info["tasks"]),
                   SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost", SLURM_NODEID="0",
                   SLURM_RESTART_COUNT=str(info["starts"] - 1))
        out = info["output"].replace("%j", job_id) or os.devnull
        with open(out, "a") as f:
            rc = subprocess.call(["bash", info["script"]], env=env, stdout=f, stderr=f)
        with _locked():
            info = read(job_id)
            if info["state"] == "CANCELLED":
                return
            if info["requeue"]:
                info.update(state="REQUEUED", pids=[])
            else:
                info.update(state="COMPLETED" if rc == 0 else "FAILED", rc=rc, ended=time.time())
            _write(job_id, info)
            if not info["requeue"]:
                return


def srun(args: list[str]) -> int:
    paths = {"--output": os.devnull, "--error": os.devnull}
    while args and args[0].startswith("--"):
        flag = args.pop(0)
        if flag in paths:
            paths[flag] = args.pop(0)
    job_id, n = os.environ["SLURM_JOB_ID"], int(os.environ.get("SLURM_NTASKS", "1"))
    procs = []
    for t in range(n):
        env = dict(os.environ, SLURM_PROCID=str(t), SLURM_LOCALID=str(t), SLURM_STEP_ID="0")
        out = open(paths["--output"].replace("%j", job_id).replace("%t", str(t)), "a")
        err = open(paths["--error"].replace("%j", job_id).replace("%t", str(t)), "a")
        procs.append(subprocess.Popen(args, env=env, stdout=out, stderr=err))
    _update(job_id, pids=[p.pid for p in procs])
    return max(p.wait() for p in procs)


def sacct(args: list[str]) -> None:
    ids = [args[i + 1] for i, a in enumerate(args) if a == "-j"]
    print("JobID|State|NodeList")
    for job_id in ids:
        if _path(job_id).is_file():
            info = read(job_id)
            print(f"{job_id}|{info['state']}|localhost")
            print(f"{job_id}.batch|{info['state']}|localhost")


def squeue(args: list[str]) -> None:
    job_id = args[args.index("-j") + 1]
    if _path(job_id).is_file() and read(job_id)["state"] in ("PENDING", "RUNNING", "REQUEUED"):
        print(read(job_id)["state"])


def scancel(args: list[str]) -> None:
    job_id = args[0].split("_")[0]
    if "--signal" in args:
        sig = args[args.index("--signal") + 1]
        sig = getattr(signal, sig if sig.startswith("SIG") else f"SIG{sig}")
        for pid in read(job_id)["pids"]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return
    with _locked():  # a job that has ended stays as it ended
        info = read(job_id)
        if info["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return
        info.update(state="CANCELLED")
        _write(job_id, info)
    if "pgid" in info:
        try:
            os.killpg(info["pgid"], signal.SIGKILL)
        except ProcessLookupError:
            pass


def scontrol(args: list[str]) -> None:
    if args[:1] == ["requeue"]:
        _update(args[1], requeue=True)


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "_job":
        _job(args[0])
        return 0
    if cmd == "srun":
        return srun(args)
    {"sbatch": sbatch, "sacct": sacct, "squeue": squeue, "scancel": scancel, "scontrol": scontrol}[cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
