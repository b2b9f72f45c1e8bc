"""`csn verify`'s logic: every file csn reads back from a run directory, checked without loading code."""

from __future__ import annotations

import json
from pathlib import Path

from csn.errors import CsnError
from csn.runs.io import read_table, sha256_file
from csn.runs.run import damaged_checkpoint_fix, read_manifest


def verify_run(path: str | Path) -> list[str]:
    """Problems found in a run directory (empty list = intact). Never loads weights as code."""
    path = Path(path)
    problems: list[str] = []
    try:
        info = json.loads((path / "run.json").read_bytes().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return [f"{path}: no run.json; this is not a csn run."]
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        info = None
    if not isinstance(info, dict):
        return [f"{path / 'run.json'}: corrupt JSON; restore it or re-create the run with `csn train --force`."]
    try:
        ckpts = read_manifest(path / "checkpoints")
    except CsnError as e:
        return [str(e)]
    for c in ckpts:
        f = path / "checkpoints" / c.file
        if not f.is_file():
            problems.append(f"checkpoint {f.name} (step {c.step}) is missing; {damaged_checkpoint_fix(path)}")
        elif sha256_file(f) != c.sha256:
            problems.append(f"checkpoint {f.name} (step {c.step}) is corrupt (sha256 mismatch: truncated or modified since "
                            f"it was written); {damaged_checkpoint_fix(path)}")
    if ckpts and ckpts[-1].step != info.get("total_steps") and ckpts[-1].step > 0:
        state = path / "checkpoints" / f"state-{ckpts[-1].step:08d}.safetensors"
        if not state.is_file():
            problems.append(f"optimizer state {state.name} of the last checkpoint is missing; the run cannot resume exactly.")
    for t in sorted((path / "tables").glob("*.parquet")):
        try:
            read_table(t)
        except CsnError as e:
            problems.append(str(e))
    for leftover in list(path.rglob(".*.tmp")):
        problems.append(f"{leftover} is an unfinished temporary file from an interrupted write; it is ignored and can be deleted.")
    return problems


__all__ = ["verify_run"]
