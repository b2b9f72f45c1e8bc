"""Tasks the Slurm tests (tests/test_slurm.py) run as fake Slurm jobs: the standard library only, so that a job
starts in a fraction of a second (a job unpickles its function by importing this module)."""

from __future__ import annotations

import time


def note(path: str, text: str, fail: bool = False) -> str:
    """Half a second of work, then a line `text` in `path`; raises afterwards when `fail`."""
    time.sleep(0.5)
    with open(path, "a") as f:
        f.write(text + "\n")
    if fail:
        raise RuntimeError("a planted failure")
    return text
