"""How far a map's training got in a given time, and the whole map's training time at that rate (issue 28).

    python benchmarks/map_progress.py OUT SECONDS [--runs N]

OUT: the folder of `csn experiment windows` (one run folder per condition and seed); SECONDS: the wall time the
command ran (e.g. under `timeout`). Counts the optimizer steps every run reached (its last checkpoint's step, from
its manifest) against the steps of all N runs (--runs: the plan's run count, printed by --dry-run; each run's
length from its run.json), and projects the training phase of the whole map at the measured rate. Steps past a
run's last checkpoint are not counted (checkpoints are dense early), so the projection is an upper bound.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csn.runs.run import read_manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("seconds", type=float)
    ap.add_argument("--runs", type=int, default=56, help="runs in the map's plan (fmnist preset: 56)")
    args = ap.parse_args(argv)
    if not args.out.is_dir():
        ap.error(f"{args.out} is not a folder; pass the --out of `csn experiment windows`.")
    done, per_run, finished, started = 0, None, 0, 0
    for info in sorted(args.out.glob("*/run.json")):
        total = json.loads(info.read_text())["total_steps"]
        per_run = per_run or total
        manifest = read_manifest(info.parent / "checkpoints")
        step = manifest[-1].step if manifest else 0
        started += 1
        finished += step >= total
        done += step
    if per_run is None:
        print(f"{args.out}: no run started in {args.seconds:.0f} s")
        return 1
    planned = args.runs * per_run
    rate = done / args.seconds
    print(f"{started} runs started, {finished} finished; {done:,} of {planned:,} steps ({done / planned:.1%}) in "
          f"{args.seconds:.0f} s: {rate:.1f} steps/s; the map's training at that rate: {planned / rate / 60:.1f} min "
          "(upper bound: steps after a run's last checkpoint are not counted)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
