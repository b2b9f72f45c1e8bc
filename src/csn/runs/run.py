"""The run directory: run.json, checkpoints (safetensors + manifest with sha256), tables (Parquet).

The manifest lists a checkpoint only once its file is complete; every load verifies its sha256.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from csn.data import DataSplits
from csn.errors import CsnError
from csn.runs.config import TrainConfig, build_model_for, load_data
from csn.runs.io import read_table, sha256_file, write_table, write_text

MANIFEST = "manifest.jsonl"


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


class Run:
    """A run directory. `Run(path).checkpoints` lists checkpoints; `load_model(ckpt)` rebuilds the model there."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / "run.json").is_file():
            raise CsnError(f"{self.path} is not a csn run (no run.json); pass a directory written by `csn train`.")
        try:
            self.info = json.loads((self.path / "run.json").read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
            self.info = None
        if not isinstance(self.info, dict) or not isinstance(self.info.get("config"), dict):
            raise CsnError(f"{self.path / 'run.json'} is corrupt; restore it or re-create the run with `csn train --force`.")

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
        return read_manifest(self.ckpt_dir)

    def checkpoint(self, step: int) -> Checkpoint:
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise CsnError(f"run {self.name} has no checkpoint at step {step}; `csn info {self.path}` lists them.")

    def select(self, spec: str | None) -> list[Checkpoint]:
        """Checkpoints chosen by a spec: None/'all', 'last', 'first', comma-separated steps or 'eE' epochs
        (nearest checkpoint), or 'A:B' epoch ranges (inclusive)."""
        ckpts = self.checkpoints
        if not ckpts:
            raise CsnError(f"run {self.name} has no checkpoints yet; train it first with `csn train`.")
        return select_checkpoints(ckpts, spec)

    def load_state(self, ckpt: Checkpoint) -> dict[str, torch.Tensor]:
        """Load a checkpoint's weights after verifying its sha256."""
        path = self.ckpt_dir / ckpt.file
        if not path.is_file():
            raise CsnError(f"checkpoint {path} (step {ckpt.step}) is missing, so it was not loaded; {damaged_checkpoint_fix(self.path)}")
        if sha256_file(path) != ckpt.sha256:
            raise CsnError(f"checkpoint {path} (step {ckpt.step}) is corrupt (its sha256 differs from the manifest: the file "
                           f"was truncated or modified after it was written), so it was not loaded; {damaged_checkpoint_fix(self.path)}")
        try:
            return load_file(str(path))
        except Exception as e:
            raise CsnError(f"checkpoint {path} (step {ckpt.step}) cannot be read ({type(e).__name__}); "
                           f"{damaged_checkpoint_fix(self.path)}") from None

    def build_model(self) -> torch.nn.Module:
        """The run's architecture, freshly initialized (weights not loaded)."""
        return build_model_for(self.config, self.info["data"])

    def load_model(self, ckpt: Checkpoint | int | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model at a checkpoint (default: the last one), in eval mode."""
        if ckpt is None:
            ckpt = self.select("last")[0]
        elif isinstance(ckpt, int):
            ckpt = self.checkpoint(ckpt)
        model = self.build_model()
        model.load_state_dict(self.load_state(ckpt))
        return model.to(device).eval()

    def dataset(self) -> DataSplits:
        """The run's dataset (same name and data root as at training time)."""
        return load_data(self.config)

    def read(self, name: str) -> pd.DataFrame | None:
        """A table of the run, or None when it does not exist yet."""
        p = self.table_path(name)
        return read_table(p) if p.is_file() else None

    def write(self, name: str, df: pd.DataFrame) -> Path:
        """Atomically (re)write a table of the run."""
        p = self.table_path(name)
        write_table(p, df)
        return p


def damaged_checkpoint_fix(run_path: str | Path) -> str:
    """What to do about a missing or corrupt checkpoint (the optimizer state of older steps is not kept,
    so training cannot restart from an earlier checkpoint)."""
    return (f"restore the file from a backup, leave this checkpoint out of analyses (--checkpoints), or re-create the "
            f"run with `csn train --force --out {run_path}` and the same configuration (bitwise the same on CPU).")


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _manifest_entry(d: object) -> Checkpoint:
    """One manifest line, checked strictly (a value of the wrong type is an error, never reinterpreted)."""
    if not isinstance(d, dict):
        raise ValueError("not an object")
    step, epoch, file, sha, metrics = d["step"], d["epoch"], d["file"], d["sha256"], d.get("metrics", {})
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError("step")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch) or epoch < 0:
        raise ValueError("epoch")
    if not isinstance(file, str) or not file or not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise ValueError("file/sha256")
    if not isinstance(metrics, dict):
        raise ValueError("metrics")
    return Checkpoint(step, float(epoch), file, sha, dict(metrics))


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


_STEP_RE = re.compile(r"\+?[0-9]{1,18}", re.ASCII)
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,3})?", re.ASCII)


def _selector_number(text: str) -> float:
    """A finite decimal number of a checkpoint selector (no nan/inf, '1_0' or non-ASCII digits)."""
    t = text.strip()
    if not _NUMBER_RE.fullmatch(t) or not math.isfinite(float(t)):
        raise ValueError(t)
    return float(t)


def select_checkpoints(ckpts: list[Checkpoint], spec: str | None) -> list[Checkpoint]:
    """See Run.select."""
    if spec is None or str(spec).strip() in ("", "all"):
        return list(ckpts)
    chosen: list[Checkpoint] = []
    for tok in str(spec).split(","):
        tok = tok.strip()
        try:
            if tok == "last":
                hits = [ckpts[-1]]
            elif tok == "first":
                hits = [ckpts[0]]
            elif ":" in tok:
                a, b = tok.split(":", 1)
                lo = _selector_number(a) if a.strip() else -1.0
                hi = float("inf") if b.strip() in ("", "end") else _selector_number(b)
                hits = [c for c in ckpts if lo - 1e-9 <= c.epoch <= hi + 1e-9]
            elif tok.startswith("e"):
                e = _selector_number(tok[1:])
                hits = [min(ckpts, key=lambda c: abs(c.epoch - e))]
            else:
                if not _STEP_RE.fullmatch(tok):
                    raise ValueError(tok)
                s = int(tok)
                hits = [c for c in ckpts if c.step == s]
                if not hits:
                    raise CsnError(f"no checkpoint at step {s}; available steps: {', '.join(str(c.step) for c in ckpts)}.")
        except ValueError:
            raise CsnError(f"bad checkpoint selector {tok!r}; use 'all', 'last', 'first', steps like '0,64', epochs like 'e1.5', or an epoch range like '0:2'.") from None
        chosen.extend(c for c in hits if c not in chosen)
    if not chosen:
        raise CsnError(f"checkpoint selector {spec!r} matches no checkpoint.")
    return sorted(chosen, key=lambda c: c.step)
