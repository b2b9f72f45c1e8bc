"""`csn verify`'s logic: every file csn reads back from a run directory, checked without loading code.

A run: run.json against its schema (RunInfo, the config included), the manifest (every line, steps
within training), every checkpoint (sha256, safetensors header, tensor names and shapes against the
model run.json describes), the optimizer state and cached models (sha256 sidecars, headers, shapes),
every table against its declared schema, and no half-written files. An experiment or reproduction
directory: every run inside it, and its own files (reproduce.json, claims.json, its tables).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from safetensors import safe_open

from csn.errors import CsnError
from csn.models.external import code_trusted, names_code
from csn.runs.config import TrainConfig, build_model_for
from csn.runs.io import SIDECAR, TABLE_STEP, checksum_problem, read_table, table_name, tensor_shapes
from csn.runs.naming import STATE_GLOB, state_file
from csn.runs.run import check_run_path, damaged_checkpoint_fix, read_manifest, read_run_info, run_dirs
from csn.runs.table import PROVENANCE

EXPERIMENT_FILES = ("reproduce.json", "claims.json")
"""JSON files an experiment or reproduction directory holds beside its runs."""


def verify_run(path: str | Path) -> list[str]:
    """Problems found in a run directory (empty list = intact). Never loads weights as code."""
    path = Path(path)
    if not (path / "run.json").is_file():
        return [f"{path}: no run.json; this is not a csn run."]
    try:
        info = read_run_info(path)
    except CsnError as e:
        return [str(e)]
    try:
        ckpts = read_manifest(path / "checkpoints")
    except CsnError as e:
        return [str(e)]
    problems: list[str] = []
    fix = damaged_checkpoint_fix(path)
    if ckpts and ckpts[-1].step > info["total_steps"]:
        problems.append(f"the manifest lists step {ckpts[-1].step}, beyond the run's {info['total_steps']} training "
                        f"steps (run.json); {fix}")
    shapes = _model_shapes(info)
    for c in ckpts:
        problem = _tensor_file_problem(path / "checkpoints" / c.file, c.sha256, shapes) or _nonfinite(
            path / "checkpoints" / c.file)
        if problem:
            problems.append(f"checkpoint {c.file} (step {c.step}) {problem}; {fix}")
    states = sorted((path / "checkpoints").glob(STATE_GLOB))
    if ckpts and ckpts[-1].step != info["total_steps"] and ckpts[-1].step > 0:
        last = path / "checkpoints" / state_file(ckpts[-1].step)
        states = sorted({*states, last})  # an unfinished run resumes from the state of its last checkpoint
    momentum = {f"momentum.{i}": s for i, s in enumerate(shapes["__params__"])} if shapes else None
    for state in states:
        problem = _tensor_file_problem(state, None, momentum, subset=True)
        if problem:
            problems.append(f"optimizer state {state.name} {problem}; the run cannot resume exactly from it: restore "
                            "the file or re-create the run with `csn train --force`.")
    problems += _table_problems(path / "tables", {c.step: c.sha256 for c in ckpts})
    problems += [f"{p} is an unfinished temporary file from an interrupted write; it is ignored and can be deleted."
                 for p in sorted(path.rglob(".*.tmp"))]
    return problems


def _model_shapes(info: dict) -> dict[str, list] | None:
    """{tensor name: shape} of the model run.json describes (built on the meta device: nothing allocated),
    plus '__params__': the parameter shapes in optimizer order; None if it cannot be built."""
    if names_code(info["config"].get("model")) and not code_trusted():
        return None  # code named by data is built only with --trust-code (untrusted_model says so)
    try:
        with torch.device("meta"):
            model = build_model_for(TrainConfig.from_dict(info["config"]), info["data"])
    except Exception:  # noqa: BLE001 - a model that cannot be built is reported by the analyses that need it
        return None
    shapes: dict[str, list] = {k: list(v.shape) for k, v in model.state_dict().items()}
    shapes["__params__"] = [list(p.shape) for p in model.parameters()]
    return shapes


def untrusted_model(path: str | Path) -> str | None:
    """The model of the run at `path` when it is code named by data that verify did not build (no --trust-code),
    so its checkpoints were checked (sha256, headers) but not against the model; else None."""
    try:
        model = read_run_info(path)["config"].get("model")
    except CsnError:
        return None
    return model if names_code(model) and not code_trusted() else None


def _tensor_file_problem(f: Path, sha256: str | None, shapes: dict[str, list] | None, subset: bool = False) -> str | None:
    """Why a safetensors file is not intact (checksum, header, names and shapes), or None.

    shapes: the expected {name: shape} (None: not checked); subset=True: the file may hold fewer tensors."""
    problem = checksum_problem(f, sha256)
    if problem:
        return problem
    try:
        have = tensor_shapes(f)
    except ValueError as e:
        return f"has a damaged header ({e})"
    if shapes is None:
        return None
    want = {k: v for k, v in shapes.items() if k != "__params__"}
    wrong = [k for k in have if k in want and have[k] != want[k]]
    if wrong:
        return f"holds {wrong[0]} of shape {have[wrong[0]]} where the model has {want[wrong[0]]}"
    extra = [k for k in have if k not in want]
    missing = [] if subset else [k for k in want if k not in have]
    if extra or missing:
        which = f"lacks {missing[0]}" if missing else f"holds {extra[0]}, which the model does not have"
        return f"does not fit the model run.json describes ({which})"
    return None


def _nonfinite(f: Path) -> str | None:
    """'holds non-finite values ...' when a floating tensor of the safetensors file holds NaN or inf (read one
    tensor at a time), else None."""
    try:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    return (f"holds non-finite values (NaN or inf) in {k}: the run diverged at or before this step "
                            "(the analyses refuse it)")
    except Exception as e:  # noqa: BLE001 - a damaged file: its header check reports it
        return f"cannot be read ({type(e).__name__})"
    return None


def _stale_rows(t: Path, df: pd.DataFrame, manifest: dict[int, str]) -> str | None:
    """Rows of table `t` whose PROVENANCE is not the sha256 of the checkpoint now at their step (the checkpoint
    was replaced after they were computed), or None."""
    name = table_name(t)
    step = TABLE_STEP.get(name or "")
    if step is None or PROVENANCE not in df.columns or step not in df.columns:
        return None
    rows = df[[step, PROVENANCE]].drop_duplicates()
    rows = rows[rows[PROVENANCE].notna() & rows[step].isin(set(manifest))]
    bad = sorted({int(s) for s, sha in zip(rows[step], rows[PROVENANCE]) if sha != manifest[int(s)]})
    if not bad:
        return None
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return (f"table {t} holds rows of step(s) {shown} computed from other weights than the checkpoint now in the "
            f"manifest (their {PROVENANCE} differs): run the analysis that wrote it again to recompute them.")


def _table_problems(tables: Path, manifest: dict[int, str] | None = None) -> list[str]:
    """Unreadable or mistyped tables, rows that no longer match their checkpoint (given the run's manifest
    {step: sha256}), and cached tensors (tables/*.safetensors) failing their checksum."""
    out: list[str] = []
    for t in sorted(tables.glob("*.parquet")):
        try:
            df = read_table(t)
        except CsnError as e:
            out.append(str(e))
            continue
        stale = _stale_rows(t, df, manifest) if manifest else None
        if stale:
            out.append(stale)
    for f in sorted(tables.glob("*.safetensors")):
        problem = _tensor_file_problem(f, None, None)
        if problem:
            out.append(f"{f} {problem}; delete it (and the table computed with it) and run the analysis again.")
    for f in sorted(tables.glob("*" + SIDECAR)):
        if not f.with_name(f.name.removesuffix(SIDECAR)).is_file():
            out.append(f"{f} is the checksum of a file that is missing; delete it.")
    return out


def verify_experiment(path: str | Path) -> list[str]:
    """Problems with an experiment or reproduction directory's own files (its JSON files and tables)."""
    path = Path(path)
    out: list[str] = []
    for name in EXPERIMENT_FILES:
        f = path / name
        if f.is_file():
            try:
                data = json.loads(f.read_bytes().decode("utf-8"))
                if not isinstance(data, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError, RecursionError):
                out.append(f"{f} is corrupt (not a JSON object); restore it or run the command that wrote it again.")
    out += _table_problems(path)
    out += [f"{p} is an unfinished temporary file from an interrupted write; it is ignored and can be deleted."
            for p in sorted(path.glob(".*.tmp"))]
    return out


def verify_path(path: str | Path) -> dict[Path, list[str]]:
    """{directory: problems} for a run, or for an experiment/reproduction directory (its own files under its
    path, then every run inside it). CsnError when `path` holds no csn run at all."""
    path = Path(path)
    check_run_path(path, "the directory", new=False)
    if not path.is_dir():
        raise CsnError(f"{path} is not a directory; pass a run directory or an experiment directory holding runs.")
    runs = run_dirs(path, deep=True)
    if not runs:
        raise CsnError(f"{path} holds no csn run (no run.json in it or below it); pass a run directory written by "
                       "`csn train`, or an experiment or reproduction directory.")
    if runs == [path]:
        return {path: verify_run(path)}
    return {path: verify_experiment(path), **{r: verify_run(r) for r in runs}}


__all__ = ["verify_run", "verify_experiment", "verify_path", "untrusted_model"]
