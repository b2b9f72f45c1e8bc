"""Kill/resume soak: SIGKILL `csn train`, `csn selectivity` and `csn ablate` at many seeded random moments,
resume them, and check that every final output equals an uninterrupted run's.

Each trial starts the command (train from nothing, an analysis on a copy of a trained run), SIGKILLs it
at a moment drawn uniformly over the measured timeline of the uninterrupted command (its whole run,
its set-up, or -- most often -- the span in which it writes its outputs), checks the
invariants that must hold at any moment (no half-written file under a final name, the manifest lists
only complete checkpoints with matching sha256, tables hold only complete checkpoints), optionally
kills the resumed command once more, then resumes to the end and compares checkpoint sha256s, the
manifest and the tables (wall-clock columns dropped) with the reference, and runs `csn verify`.

    python benchmarks/soak_kill_resume.py                  # >= 20 kills per command (a few minutes)
    python benchmarks/soak_kill_resume.py --kills 50 --seed 1 --commands train

Prints, per command: kills tried, kills delivered (the process was still running), resumes, invariant
violations, mismatches; exits 1 if any violation or mismatch was found. The harness is the one the test
suite uses (tests/test_reliability.py), so CI and the soak check the same things.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_reliability import Harness, analysis_available  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver per command (default 20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--commands", default="train,selectivity,ablate")
    ap.add_argument("--max-kills-per-trial", type=int, default=2,
                    help="each trial kills the command, then up to this many times its resumption")
    ap.add_argument("--workers", type=int, default=2, help="trials run at once")
    ap.add_argument("--keep", help="keep the work folders here (default: a temporary folder, deleted)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="csn-soak-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        t0 = time.perf_counter()
        harness = Harness.create(root)
        totals = collections.Counter()
        bad = 0
        for name in args.commands.split(","):
            if not analysis_available(name):
                print(f"{name}: skipped (`csn {name}` is not available)")
                continue
            harness.reference(name)
            ev = harness.timeline[name]
            print(f"{name}: uninterrupted {harness.durations[name]:.1f} s (lock taken at {ev['lock']:.1f} s, writes "
                  f"from {ev['first_write']:.1f} s to {ev['last_write']:.1f} s)", flush=True)
            trials, round_ = [], 0
            while sum(t.kills for t in trials) < args.kills:
                need = args.kills - sum(t.kills for t in trials)
                trials += harness.trials(name, max(1, need // 2 + 1) if round_ else max(1, args.kills * 2 // 3),
                                         seed=args.seed * 1000 + round_, max_kills=args.max_kills_per_trial,
                                         workers=args.workers)
                round_ += 1
            tried = sum(len(t.delays) for t in trials)
            kills = sum(t.kills for t in trials)
            resumes = sum(t.resumes for t in trials)
            problems = [p for t in trials for p in t.problems]
            mismatches = [m for t in trials for m in t.mismatches]
            done = [d for t in trials for d in t.done_at_kill]
            mid = sum(1 for d in done if d > 0)
            print(f"{name}: {len(trials)} trials, kills tried {tried}, kills delivered {kills} "
                  f"({mid} after >= 1 finished checkpoint; checkpoints done at each kill: {sorted(done)}), "
                  f"resumes {resumes}, invariant violations {len(problems)}, mismatches found {len(mismatches)} "
                  f"(reference {harness.durations[name]:.1f} s, trials {sum(t.seconds for t in trials):.0f} s)",
                  flush=True)
            for line in (problems + mismatches)[:20]:
                print(f"  - {line}")
            bad += len(problems) + len(mismatches)
            totals.update(tried=tried, kills=kills, resumes=resumes, problems=len(problems),
                          mismatches=len(mismatches))
        print(f"total: kills tried {totals['tried']}, kills delivered {totals['kills']}, resumes {totals['resumes']}, "
              f"invariant violations {totals['problems']}, mismatches found {totals['mismatches']} "
              f"in {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
