"""Benchmark: what starting csn costs a process, as a ratio to importing torch and pandas (csn's floor).

    python benchmarks/bench_startup.py [--reps 7] [--src DIR]

Every csn command, every spawned worker of `csn reproduce`/`csn experiment` (--parallel), every Slurm job and
every torchrun rank starts a fresh Python that imports csn before it does any work. Measured, each in a fresh
interpreter (`python -c ...`), by the benchmarks' interleaved timer (bench_selectivity.interleaved: one warm-up of
each, which also fills the file cache, then --reps repetitions, order rotating):
- floor: `import torch, pandas` (what csn cannot do without);
- `import csn` (the Python API; what a spawned worker imports to unpickle its task);
- `import csn.cli` (every command; `csn --help` adds click's output only).
Reported: the median wall seconds of each and their ratio to the floor. --src runs the imports against another
checkout's `src` folder (PYTHONPATH), e.g. an older commit in a `git worktree`, to compare versions on one machine.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import subprocess
import sys

from bench_selectivity import interleaved  # the benchmarks' one interleaved timer

CASES = {"floor (torch, pandas)": "import torch, pandas", "import csn": "import csn",
         "import csn.cli": "import csn.cli"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--src", default=None, help="import csn from this folder (another checkout's src)")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.src:
        env["PYTHONPATH"] = os.path.abspath(args.src)
    where = subprocess.run([sys.executable, "-c", "import csn; print(csn.__file__)"], env=env, check=True,
                           capture_output=True, text=True).stdout.strip()
    times = interleaved({name: functools.partial(subprocess.run, [sys.executable, "-c", stmt], check=True, env=env)
                         for name, stmt in CASES.items()}, args.reps)
    med = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    print(f"# {datetime.date.today()} {platform.node()} {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, csn from {where}, {args.reps} reps, load {os.getloadavg()[0]:.2f}")
    floor = med["floor (torch, pandas)"]
    for name, s in med.items():
        print(f"{name:24s} {s:6.3f} s   {s / floor:5.2f}x floor   (+{s - floor:.3f} s)")


if __name__ == "__main__":
    main()
