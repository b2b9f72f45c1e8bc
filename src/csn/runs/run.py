"""The run directory: run.json, checkpoints (safetensors + manifest with sha256), tables (Parquet).

The manifest lists a checkpoint only once its file is complete; every load verifies its sha256.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
from pydantic import ConfigDict, Field, ValidationError, model_validator

from csn.core.resources import human_bytes
from csn.core.schema import Int, Schema, Seed, schema_error
from csn.core.times import is_bare_number, nearest_step, parse_times, resolve
from csn.data import DataSplits
from csn.errors import CsnError
from csn.models.external import require_trust
from csn.runs.config import TrainConfig, build_model_for, data_info, load_data
from csn.runs.io import SIDECAR, load_tensors, read_table, write_table, write_text
from csn.runs.naming import STATE_GLOB, WEIGHTS_GLOB

MANIFEST = "manifest.jsonl"
MAX_STEP = 2**62
MAX_RUN_JSON = 16_000_000
"""Bytes a run.json may hold (csn writes a few KB; a checkpoint list of a million steps is about 10 MB)."""
"""Checkpoint steps (manifest, run.json) are below 2**62: tables store them as int64."""


@dataclass
class Checkpoint:
    """One manifest entry."""

    step: int
    epoch: float
    file: str
    sha256: str
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "file": self.file, "sha256": self.sha256, "metrics": self.metrics}


class DataInfo(Schema):
    """run.json's `data`: what the run's model was built for (csn.runs.config.data_info)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: str
    num_classes: Int = Field(ge=2)
    in_channels: Int = Field(ge=1)
    image_size: Annotated[Int, Field(ge=1)] | tuple[Annotated[Int, Field(ge=1)], Annotated[Int, Field(ge=1)]]
    class_names: list[str]
    num_train: Int = Field(ge=1)
    num_test: Int = Field(ge=1)

    @model_validator(mode="after")
    def _one_name_per_class(self) -> DataInfo:
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"data.class_names holds {len(self.class_names)} names for {self.num_classes} classes")
        return self


class RegWindow(Schema):
    """One window of the selectivity regularizer in optimizer steps [start_step, end_step) at strength alpha."""

    start_step: Int = Field(ge=0, lt=MAX_STEP)
    end_step: Int = Field(ge=0, lt=MAX_STEP)
    alpha: float

    @model_validator(mode="after")
    def _ordered(self) -> RegWindow:
        if self.end_step <= self.start_step:
            raise ValueError(f"a regularizer window ends (step {self.end_step}) where or before it starts "
                             f"(step {self.start_step})")
        return self


class InterventionRecord(Schema):
    """One entry of run.json's `interventions`: its kind and what it did (the kind's own keys are kept as written)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    kind: str


class RunInfo(Schema):
    """The schema of run.json (the keys csn reads back; other keys are kept as written)."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    config: dict[str, Any]
    data: DataInfo
    seed: Seed | None = None
    steps_per_epoch: Int = Field(ge=1)
    total_steps: Int = Field(ge=0, lt=MAX_STEP)
    checkpoint_steps: list[Annotated[Int, Field(ge=0, lt=MAX_STEP)]] = []
    world_size: Int = Field(1, ge=1)
    csn_version: str = "unknown"
    torch_version: str = "unknown"
    interventions: list[InterventionRecord] = []

    @model_validator(mode="after")
    def _config_names_its_model_and_data(self) -> RunInfo:
        missing = [k for k in ("model", "dataset") if not isinstance(self.config.get(k), str)]
        if missing:
            raise ValueError(f"config names no {missing[0]} (run.json records the config in full)")
        return self


ROOM_INSIDE = 128
"""Bytes the paths of the files csn writes inside a run directory add to its path (at most, with temporary names)."""


def check_run_path(path: str | Path, what: str = "the run directory", *, new: bool = True) -> None:
    """Refuse a path csn cannot use as a run directory: not UTF-8 (run.json, tables and the report record
    paths as UTF-8 text), or a file where a folder must be. new=True (a directory csn may make, e.g. --out;
    readers pass False): also control characters (a newline) in it, a folder name or a whole path longer than the
    file system takes (with the files csn writes inside), and a place where no folder can be made (/proc/...),
    all before any work."""
    path = Path(path)
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CsnError(f"{what} {os.fsencode(path)!r} is not valid UTF-8; csn records paths in UTF-8 files (run.json, "
                       "tables, the report): rename it to a UTF-8 name.") from None
    if new:
        _check_new_path(path, what)
    for p in (path, *path.parents):
        if p.is_symlink() or p.exists():
            if not p.is_dir():
                what_is = "is a file" if p == path else f"lies inside {p}, which is a file"
                raise CsnError(f"{what} {path} {what_is}; pass a folder path (a new one, or a run directory).")
            if p != path and new:
                _probe_new_folder(path, p, what)
            return


def _check_new_path(path: Path, what: str) -> None:
    """Control characters, and names or paths too long for the file system (before anything is made)."""
    text = str(path)
    bad = next((c for c in text if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise CsnError(f"{what} {text!r} holds a control character ({bad!r}); csn writes this path into run.json, "
                       "tables and messages: choose a name without control characters.")
    anchor = next((p for p in path.absolute().parents if os.path.isdir(p)), Path("/"))  # (never raises)
    name_max, path_max = _pathconf(anchor, "PC_NAME_MAX", 255), _pathconf(anchor, "PC_PATH_MAX", 4096)
    long_part = next((part for part in path.parts if len(part.encode("utf-8")) > name_max), None)
    if long_part is not None:
        raise CsnError(f"{what} has a folder name of {len(long_part.encode('utf-8')):,} bytes ({long_part[:24]}...); "
                       f"this file system takes at most {name_max} a name: choose a shorter name.")
    size = len(str(path.absolute()).encode("utf-8"))
    if size + ROOM_INSIDE > path_max:
        raise CsnError(f"{what} is {size:,} bytes long as an absolute path; with the files csn writes inside it (up to "
                       f"{ROOM_INSIDE} bytes more) it must stay under {path_max:,}: choose a shorter path.")


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        value = os.pathconf(path, name)
    except (OSError, ValueError):
        return default
    return value if value and value > 0 else default


def _probe_new_folder(path: Path, parent: Path, what: str) -> None:
    """Make and remove a folder in `parent` (the nearest existing one): a place that takes no new folder (a
    read-only disk, /proc) is one error now, before any work."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".csn-probe-", dir=parent))
    except OSError as e:
        raise CsnError(f"{what} {path} cannot be made: {parent} takes no new folder ({e.strerror or e}); choose a "
                       "folder on a disk you can write to.") from None


class Run:
    """A run directory. `Run(path).checkpoints` lists checkpoints; `load_model(ckpt)` rebuilds the model there."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        check_run_path(self.path, new=False)
        self.info = read_run_info(self.path)
        _ = self.config  # validated on opening: a bad config is reported here, by file

    # paths
    @property
    def name(self) -> str:
        return self.path.name

    @functools.cached_property
    def config(self) -> TrainConfig:
        """The run's training configuration (run.json's config, validated once)."""
        try:
            return TrainConfig.from_dict(self.info["config"])
        except CsnError as e:
            raise CsnError(f"{self.path / 'run.json'} holds an invalid config ({e}); restore it or re-create the run "
                           "with `csn train --force`.") from None

    @property
    def ckpt_dir(self) -> Path:
        return self.path / "checkpoints"

    def table_path(self, name: str) -> Path:
        return self.path / "tables" / f"{name}.parquet"

    @property
    def report_dir(self) -> Path:
        return self.path / "report"

    # manifest
    @property
    def checkpoints(self) -> list[Checkpoint]:
        ckpts = read_manifest(self.ckpt_dir)
        total = self.info["total_steps"]
        if ckpts and ckpts[-1].step > total:
            raise CsnError(f"{self.ckpt_dir / MANIFEST} lists step {ckpts[-1].step}, beyond the run's {total} training "
                           f"steps (run.json); the manifest is corrupt: {damaged_checkpoint_fix(self.path)}")
        return ckpts

    def checkpoint(self, step: int) -> Checkpoint:
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise CsnError(f"run {self.name} has no checkpoint at step {step}; `csn info {self.path}` lists them.")

    def select(self, spec: str | None) -> list[Checkpoint]:
        """Checkpoints chosen by a selector (select_checkpoints): 'all' (None), 'first', points step=N, an epoch E,
        a fraction fF or end/last (each its nearest checkpoint), ranges A:B (inclusive), comma-separated."""
        ckpts = self.checkpoints
        if not ckpts:
            raise CsnError(f"run {self.name} has no checkpoints yet; train it first with `csn train`.")
        return select_checkpoints(ckpts, spec, total=self.info.get("total_steps"),
                                  steps_per_epoch=self.info.get("steps_per_epoch"))

    def load_state(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        """Load a checkpoint's weights after verifying its sha256 (and the file's header)."""
        return load_tensors(self.ckpt_dir / ckpt.file, sha256=ckpt.sha256, what=f"checkpoint (step {ckpt.step})",
                            fix=damaged_checkpoint_fix(self.path))

    def build_model(self) -> torch.nn.Module:
        """The run's architecture, freshly initialized (weights not loaded). A model run.json names as
        'package.module:factory' is code named by data: built only where code is trusted (--trust-code, or
        `with csn.models.trusting_code():`), else one CsnError before any of it runs."""
        require_trust(self.config.model, None, str(self.path / "run.json"))
        return build_model_for(self.config, self.info["data"])

    def load_model(self, ckpt: Checkpoint | int | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model at a checkpoint (default: the last one), in eval mode; the checkpoint's tensor names and
        shapes are checked against the model first."""
        if ckpt is None:
            ckpt = self.select("last")[0]
        elif isinstance(ckpt, int):
            ckpt = self.checkpoint(ckpt)
        model = self.build_model()
        state = self.load_state(ckpt)
        load_weights(model, state, f"checkpoint {self.ckpt_dir / ckpt.file} (step {ckpt.step})",
                     damaged_checkpoint_fix(self.path))
        return model.to(device).eval()

    @functools.cached_property
    def reg_windows(self) -> list[RegWindow]:
        """The selectivity regularizer's windows in optimizer steps, as run.json records them (its `interventions`
        entry of kind selectivity; `reg_steps` in runs trained before 2026-12-05), checked on reading; empty for a run
        trained without the regularizer."""
        found = [r.get("steps") for r in self.info.get("interventions", []) if r["kind"] == "selectivity"]
        windows = found[0] if found else self.info.get("reg_steps")
        if windows is None:
            return []
        fix = f"restore {self.path / 'run.json'} or re-create the run with `csn train --force`."
        if not isinstance(windows, list):
            raise CsnError(f"{self.path / 'run.json'} records the regularizer's windows as {type(windows).__name__}, not "
                           f"a list; {fix}")
        return [RegWindow.parse(w, what=f"{self.path / 'run.json'} regularizer window key") for w in windows]

    def dataset(self) -> DataSplits:
        """The run's dataset (same name and data root as at training time), refused when it no longer matches
        what run.json recorded (classes, channels, image size, split sizes)."""
        data = load_data(self.config)
        have, want = data_info(data), self.info["data"]
        for key in ("num_classes", "in_channels", "image_size", "num_train", "num_test", "class_names"):
            a, b = _plain(want.get(key)), _plain(have[key])
            if a != b:
                shown = f"{len(a)} class names" if key == "class_names" else f"{key} {a}"
                got = f"{len(b)}" if key == "class_names" and len(a) != len(b) else b
                raise CsnError(f"{self.path / 'run.json'} records {shown}, but the run's dataset ({data.name}) now gives "
                               f"{got}; the data changed since training (or run.json was modified): restore the "
                               "data the run was trained on, or re-create the run.")
        return data

    def read(self, name: str, columns: dict[str, str] | None = None) -> pd.DataFrame | None:
        """A table of the run, or None when it does not exist yet; checked against `columns` (default: the
        schema declared for its name) before it is used."""
        p = self.table_path(name)
        return read_table(p, columns) if p.is_file() else None

    def write(self, name: str, df: pd.DataFrame) -> Path:
        """Atomically (re)write a table of the run."""
        p = self.table_path(name)
        write_table(p, df)
        return p


ANY_DEPTH = "**"
"""A layout pattern: every file at any depth below its folder (symbolic links never followed nor counted)."""
RUN_LAYOUT: dict[str, tuple[str, ...]] = {
    "tables": ("*.parquet", "*.safetensors", "*.safetensors" + SIDECAR),
    "report": ("index.html", "*.png", "*.svg"),
    "checkpoints": (MANIFEST, WEIGHTS_GLOB, STATE_GLOB, STATE_GLOB + SIDECAR),
    "tracker": (ANY_DEPTH,),
    ".": ("run.json",),
}
"""The files csn writes in a run directory, by folder (glob patterns, or ANY_DEPTH: every file below the folder, for
the trackers' own layouts; plus the temporary files `.NAME.XXXX.tmp` of interrupted writes). `csn train --force`
deletes these and nothing else, in this order (results first, run.json last, so a deletion stopped part-way still
leaves a directory --force recognizes)."""


def _ours(path: Path, layout: dict[str, tuple[str, ...]]) -> list[Path]:
    """The files csn wrote in `path` by `layout` (and their leftover temporary files); links are never csn's."""
    ours: list[Path] = []
    for folder, patterns in layout.items():
        d = path / folder
        if d.is_dir() and not d.is_symlink() and ANY_DEPTH in patterns:
            found = {Path(root, f) for root, _, files in os.walk(d) for f in files}
        elif d.is_dir():
            found = {p for pattern in (*patterns, ".*.tmp") for p in d.glob(pattern)}
        else:
            continue
        ours += sorted(p for p in found if p.is_file() and not p.is_symlink())
    return ours


def foreign_files(path: str | Path, layout: dict[str, tuple[str, ...]] = RUN_LAYOUT) -> list[Path]:
    """The files in directory `path` that csn did not write by `layout` (a user's own: delete_run_files keeps them)."""
    path = Path(path)
    ours = set(_ours(path, layout))
    return sorted(p for root, _, files in os.walk(path) for f in files
                  if f != ".lock" and (p := Path(root, f)) not in ours)


def delete_run_files(path: str | Path, layout: dict[str, tuple[str, ...]] = RUN_LAYOUT) -> list[Path]:
    """Delete the files csn wrote in run directory `path` (`layout`: RUN_LAYOUT, or an experiment's), never
    following a symbolic link, and the layout's folders once empty. Returns the other files found there, which
    are kept (a user's own files)."""
    path = Path(path)
    if path.is_symlink():
        raise CsnError(f"{path} is a symbolic link; csn never deletes through a link: pass the directory itself.")
    linked = [path / d for d in layout if d != "." and (path / d).is_symlink()]
    if linked:
        raise CsnError(f"{linked[0]} is a symbolic link; csn never deletes through a link: remove the link yourself or "
                       "choose another directory.")
    fixed = [path / d / f for d, patterns in layout.items() for f in patterns if not any(c in f for c in "*?[")]
    linked = [p for p in fixed if p.is_symlink()]
    if linked:  # csn writes these names itself: keeping the link only to replace it would be a broken promise
        raise CsnError(f"{linked[0]} is a symbolic link where csn writes its own file; csn never deletes or writes "
                       "through a link: remove the link yourself (what it points to stays) or choose another directory.")
    for p in _ours(path, layout):
        p.unlink(missing_ok=True)
    for folder in layout:
        d = path / folder
        if folder != "." and d.is_dir():
            for root, dirs, _ in os.walk(d, topdown=False):  # the folders below it first, once empty
                for sub in (Path(root, x) for x in dirs):
                    if not sub.is_symlink() and not any(sub.iterdir()):
                        sub.rmdir()
            if not any(d.iterdir()):
                d.rmdir()
    return sorted(Path(root, f) for root, _, files in os.walk(path) for f in files if f != ".lock")


def run_dirs(path: str | Path, *, deep: bool = False) -> list[Path]:
    """`[path]` when `path` is a run directory (holds run.json); else the run directories below it, sorted: its
    sub-directories holding run.json (deep=True: at any depth, never looking inside a run). The one way csn finds runs
    (csn verify looks deep; csn report, csn claims and the experiments one level down)."""
    path = Path(path)
    if (path / "run.json").is_file():
        return [path]
    if not path.is_dir():
        return []
    if not deep:
        return sorted(d for d in path.iterdir() if d.is_dir() and (d / "run.json").is_file())
    found = []
    for root, dirs, _ in os.walk(path):
        dirs.sort()
        for d in list(dirs):
            if (Path(root, d) / "run.json").is_file():
                found.append(Path(root, d))
                dirs.remove(d)  # a run's own folders hold no runs
    return found


def damaged_checkpoint_fix(run_path: str | Path) -> str:
    """What to do about a missing or corrupt checkpoint (the optimizer state of older steps is not kept,
    so training cannot restart from an earlier checkpoint)."""
    return (f"restore the file from a backup, leave this checkpoint out of analyses (--checkpoints), or re-create the "
            f"run with `csn train --force --out {run_path}` and the same configuration (bitwise the same on CPU).")


def read_run_info(path: str | Path) -> dict:
    """run.json of a run directory, validated against RunInfo (its config too); one CsnError naming the file."""
    f = Path(path) / "run.json"
    if not f.is_file():
        raise CsnError(f"{path} is not a csn run (no run.json); pass a directory written by `csn train`.")
    fix = "restore it or re-create the run with `csn train --force`."
    size = f.stat().st_size
    if size > MAX_RUN_JSON:  # refused before parsing: a 1 GB string would take gigabytes of memory
        raise CsnError(f"{f} is {human_bytes(size)}, more than a run.json csn writes ever holds ({human_bytes(MAX_RUN_JSON)} "
                       f"at most): it is corrupt or not csn's; {fix}")
    try:
        info = json.loads(f.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CsnError(f"{f} is corrupt (not JSON); {fix}") from None
    if not isinstance(info, dict):
        raise CsnError(f"{f} is corrupt (not a JSON object); {fix}")
    try:
        checked = RunInfo.model_validate(info)
    except ValidationError as e:
        raise CsnError(f"{f} is not a valid run.json ({str(schema_error(e, RunInfo, 'key')).rstrip('.')}); {fix}") from None
    try:
        TrainConfig.from_dict(info["config"])
    except CsnError as e:
        raise CsnError(f"{f} holds an invalid config ({str(e).rstrip('.')}); {fix}") from None
    return {**info, **checked.model_dump(mode="json", exclude={"config"})}  # defaults filled in, the config as written


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    """model.load_state_dict(state) after checking that the tensor names and shapes are the model's: a missing,
    extra or wrong-shape tensor is one CsnError naming it (never torch's multi-line error)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    wrong = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    if missing or extra or wrong:
        if wrong:
            k = wrong[0]
            problem = f"holds {k} of shape {list(state[k].shape)} where the model has {list(want[k].shape)}"
        elif missing:
            problem = f"lacks {len(missing)} of the model's tensors (first: {missing[0]})"
        else:
            problem = f"holds {len(extra)} tensors the model does not have (first: {extra[0]})"
        raise CsnError(f"{what} {problem}: it does not fit the model run.json describes (a modified checkpoint or "
                       f"run.json); {fix}")
    model.load_state_dict(state)


def _plain(v: Any) -> Any:
    """JSON-comparable form: tuples as lists, a square [n, n] image size as n."""
    if isinstance(v, (list, tuple)):
        v = list(v)
        return v[0] if len(v) == 2 and v[0] == v[1] and all(isinstance(x, int) for x in v) else v
    return v


class ManifestEntry(Schema):
    """One line of checkpoints/manifest.jsonl, checked strictly (a value of the wrong type is refused, never
    reinterpreted; keys csn does not read are ignored)."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)
    step: int = Field(ge=0, lt=MAX_STEP)
    epoch: float = Field(ge=0)
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    metrics: dict = {}


def _manifest_entry(d: object) -> Checkpoint:
    if not isinstance(d, dict):
        raise ValueError("not an object")
    e = ManifestEntry.model_validate(d)  # ValidationError is a ValueError
    return Checkpoint(e.step, float(e.epoch), e.file, e.sha256, dict(e.metrics))


def _plain_file_name(name: str) -> bool:
    """True for a name that stays inside its folder: no separators, not hidden/'..', no NUL, no drive."""
    return not ("/" in name or "\\" in name or "\x00" in name or name.startswith(".") or ":" in name)


def read_manifest(ckpt_dir: str | Path) -> list[Checkpoint]:
    """Parse checkpoints/manifest.jsonl; a malformed line is reported by number, and a file name that would
    leave the checkpoints folder is rejected."""
    path = Path(ckpt_dir) / MANIFEST
    if not path.is_file():
        return []
    fix = "restore the manifest from a backup or re-create the run with `csn train --force` and the same configuration."
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CsnError(f"{path} is not text (corrupt); {fix}") from None
    out: list[Checkpoint] = []
    seen: set[int] = set()
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            c = _manifest_entry(json.loads(line))
        except ValidationError as e:
            why = str(schema_error(e, ManifestEntry, "key")).rstrip(".")
            raise CsnError(f"{path} line {i} is malformed ({why}); {fix}") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError):
            raise CsnError(f"{path} line {i} is malformed; {fix}") from None
        if not _plain_file_name(c.file):
            raise CsnError(f"{path} line {i} names a file outside the checkpoints folder ({c.file!r}); the manifest is "
                           f"corrupt or was tampered with: {fix}")
        if c.step in seen:
            raise CsnError(f"{path} line {i} repeats step {c.step}; {fix}")
        seen.add(c.step)
        out.append(c)
    return sorted(out, key=lambda c: c.step)


def write_manifest(ckpt_dir: str | Path, ckpts: list[Checkpoint]) -> None:
    """Atomically rewrite the manifest (it is small; rewriting keeps every line complete)."""
    write_text(Path(ckpt_dir) / MANIFEST, "".join(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in ckpts))


def nearest_checkpoint(ckpts: Sequence[Checkpoint], *, step: int | None = None,
                       epoch: float | None = None) -> Checkpoint:
    """The checkpoint nearest to `step` or to `epoch` (give one); the earlier one on a tie."""
    if (step is None) == (epoch is None):
        raise TypeError("nearest_checkpoint takes step or epoch, one of them")
    if step is not None:
        got = nearest_step([c.step for c in ckpts], step)
        return next(c for c in ckpts if c.step == got)
    return min(ckpts, key=lambda c: (abs(c.epoch - epoch), c.step))


_LEGACY_EPOCH = re.compile(r"e([0-9.]+(?:[eE][+-]?[0-9]+)?)", re.ASCII)


def select_checkpoints(ckpts: Sequence[Checkpoint], spec: str | None, *, total: int | None = None,
                       steps_per_epoch: int | None = None, what: str = "--checkpoints",
                       note: Callable[[str], None] | None = None) -> list[Checkpoint]:
    """The checkpoints a selector names (csn.core.times' grammar): 'all' (or None), 'first', points (step=N, an
    epoch E, a fraction fF, end/last: each its nearest checkpoint) and ranges A:B (inclusive), comma-separated;
    'eE' (an epoch) is read as before. total / steps_per_epoch: the run's (run.json); by default from the
    checkpoints. A bare number is an epoch, as everywhere in csn; selectors read it as a step until 2026-12-05, so
    each one gets a line on `note` (default: stderr) naming step=N, and one past the run names it in the error."""
    if not ckpts:
        raise CsnError(f"{what}: the run has no checkpoints yet; train it first with `csn train`.")
    if spec is None or str(spec).strip().lower() in ("", "all"):
        return list(ckpts)
    steps = [c.step for c in ckpts]
    total = steps[-1] if total is None else int(total)
    if steps_per_epoch is None:
        known = [c for c in ckpts if c.epoch > 0]
        steps_per_epoch = max(1, round(known[-1].step / known[-1].epoch)) if known else 1
    say = note or _note
    tokens = []
    for raw in str(spec).split(","):
        m = _LEGACY_EPOCH.fullmatch(raw.strip())
        tok = m.group(1) if m else raw.strip()
        if is_bare_number(tok):
            hint = "" if m else (f"; a bare number is an epoch in every csn flag and file (selectors read it as a step "
                                 f"until 2026-12-05): for step {tok} write step={tok}")
            if float(tok) > ckpts[-1].epoch + 1e-9:
                raise CsnError(f"{what} {raw.strip()!r} is epoch {tok}, after the run's last checkpoint (epoch "
                               f"{ckpts[-1].epoch:g}, step {ckpts[-1].step}){hint}.")
            if hint:
                say(f"note: {what} {tok!r} is epoch {tok} (its nearest checkpoint){hint}.")
        tokens.append(tok)
    items = parse_times(tokens, what, keywords=("first", "all"))
    chosen = resolve(items, steps, steps_per_epoch, total, what=what, note=say,
                     keyword=lambda w: steps[0] if w == "first" else list(steps))
    by_step = {c.step: c for c in ckpts}
    if not chosen:
        raise CsnError(f"{what} {spec!r} matches no checkpoint; `csn info RUN` lists them.")
    return [by_step[s] for s in chosen]


def _note(message: str) -> None:
    print(message, file=sys.stderr)
