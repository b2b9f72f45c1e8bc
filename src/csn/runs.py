"""The run directory: run.json, checkpoints (safetensors + manifest with sha256), tables (Parquet).

Every write is atomic (temporary file in the same folder, fsync, rename), so a crash never leaves a
half-written file under its final name; the manifest lists a checkpoint only once its file is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from csn.errors import CsnError

MANIFEST = "manifest.jsonl"


# ----------------------------------------------------------------------------- atomic I/O
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: object) -> None:
    """Atomically write JSON (sorted keys, indented)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_table(path: str | Path, df: pd.DataFrame) -> None:
    """Atomically write a DataFrame as Parquet."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a Parquet table, reporting a corrupt file by name with what to do."""
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise CsnError(f"table {path} is unreadable or corrupt ({type(e).__name__}); delete it and re-run the analysis that wrote it.") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Atomically save tensors as safetensors; return the file's sha256.

    Keep metadata to at most one key: safetensors writes a multi-key metadata map in hash order, which
    would make identical checkpoints differ byte-wise.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    return digest


# ----------------------------------------------------------------------------- lock
try:  # POSIX: an OS lock the kernel releases when its process dies, however it dies
    import fcntl
except ImportError:  # pragma: no cover - Windows: fall back to a pid file
    fcntl = None

_HELD: dict[tuple[str, int], int] = {}  # (lock path, thread) -> depth: run_lock is re-entrant per thread


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str = "csn") -> Iterator[None]:
    """Exclusive writer lock on a run directory (RUN/.lock, holding "pid what").

    An OS file lock (flock): a process killed in any way (SIGKILL, OOM killer, power loss) releases it,
    so a stale lock of a dead process is recovered automatically; a live holder gets the error
    "another csn process is writing in RUN (pid N)". Re-entrant within a thread. Every writer of a run's
    files holds this lock, so on taking it leftover temporary files of interrupted atomic writes
    (.NAME.XXXX.tmp in the run folder, checkpoints/ and tables/) are deleted, and again on releasing it.
    """
    lock = Path(run_dir) / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    key = (str(lock.resolve()), threading.get_ident())
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    fd = _acquire(lock, run_dir, what)
    _HELD[key] = 1
    try:
        if (Path(run_dir) / "run.json").is_file():
            _remove_leftover_tmp(Path(run_dir))
        yield
    finally:
        # an interrupt (Ctrl-C) landing between a temporary file's creation and the `try` that removes it
        # could leave one behind: sweep on release too, while the lock still says no other writer is here
        with contextlib.suppress(OSError):
            if (Path(run_dir) / "run.json").is_file():
                _remove_leftover_tmp(Path(run_dir))
        del _HELD[key]
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()  # while still holding it: a waiting process then re-checks the inode and retries
        if fd is not None:
            os.close(fd)


def _busy(run_dir: str | Path, pid: int | None) -> CsnError:
    if pid and not _alive(pid):  # forked workers of a killed csn process hold it until they notice and exit
        return CsnError(f"another csn process is writing in {run_dir} (pid {pid}, which has exited: its worker "
                        "processes still hold the lock); wait a few seconds, then run this command again.")
    who = f"pid {pid}" if pid else "pid unknown"
    return CsnError(f"another csn process is writing in {run_dir} ({who}); wait for it to finish or stop it, then run "
                    "this command again.")


def _acquire(lock: Path, run_dir: str | Path, what: str) -> int | None:
    """Take the lock; return the open descriptor that holds it (None for the pid-file fallback)."""
    if fcntl is None:
        return _acquire_pidfile(lock, run_dir, what)
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(run_dir, _holder_pid(lock)) from None
        except OSError:  # a file system without flock (some network/FUSE mounts): pid file instead
            os.close(fd)
            return _acquire_pidfile(lock, run_dir, what)
        try:  # the holder may have released (and unlinked) the file between our open and flock: retry
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {what}\n".encode())
            return fd
        os.close(fd)
    raise CsnError(f"cannot take the lock {lock}; remove it if no csn process is running.")


def _holder_pid(lock: Path) -> int | None:
    """The pid written in a lock file (the holder may not have written it yet: wait a moment)."""
    for _ in range(20):
        try:
            return int(lock.read_text().split()[0])
        except (ValueError, IndexError, OSError, UnicodeDecodeError):
            time.sleep(0.05)
    return None


def _acquire_pidfile(lock: Path, run_dir: str | Path, what: str) -> None:
    """Fallback without flock: O_EXCL pid file; a lock whose pid is dead is stale and taken over."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().split()[0])
            except (ValueError, IndexError, OSError, UnicodeDecodeError):
                pid = -1
            if pid > 0 and _alive(pid) and pid != os.getpid():
                raise _busy(run_dir, pid) from None
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # stale lock of a dead process
    else:
        raise CsnError(f"cannot take the lock {lock}; remove it if no csn process is running.")
    os.write(fd, f"{os.getpid()} {what}\n".encode())
    os.close(fd)
    return None


def lock_holder(run_dir: str | Path) -> int | None:
    """Pid of a live process holding the run's lock (-1 if it cannot be told), or None when it is free."""
    lock = Path(run_dir) / ".lock"
    if not lock.is_file():
        return None
    if fcntl is not None:
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_pid(lock) or -1
        except OSError:
            pass  # no flock here: judge by the pid below
        else:
            return None
        finally:
            os.close(fd)  # closing releases a lock we took
    try:
        pid = int(lock.read_text().split()[0])
    except (ValueError, IndexError, OSError, UnicodeDecodeError):
        return None
    return pid if pid > 0 and pid != os.getpid() and _alive(pid) else None


_TMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def _remove_leftover_tmp(run_dir: Path) -> None:
    """Delete temporary files of atomic writes that a killed process left behind (caller holds the lock)."""
    for d in (run_dir, run_dir / "checkpoints", run_dir / "tables"):
        if d.is_dir():
            for p in d.iterdir():
                if _TMP_RE.match(p.name) and p.is_file():
                    p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- run directory
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

    @property
    def config(self) -> dict:
        return self.info["config"]

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
        from csn.training.config import TrainConfig, build_model_for
        return build_model_for(TrainConfig.from_dict(self.config), self.info["data"])

    def load_model(self, ckpt: Checkpoint | int | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The model at a checkpoint (default: the last one), in eval mode."""
        if ckpt is None:
            ckpt = self.select("last")[0]
        elif isinstance(ckpt, int):
            ckpt = self.checkpoint(ckpt)
        model = self.build_model()
        model.load_state_dict(self.load_state(ckpt))
        return model.to(device).eval()

    def dataset(self):
        """The run's dataset (same name and data root as at training time)."""
        from csn.training.config import TrainConfig, load_data
        return load_data(TrainConfig.from_dict(self.config))

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


def resumable_table(run: Run, name: str, key: str = "step") -> tuple[pd.DataFrame | None, set]:
    """An analysis table so far and the set of `key` values it already covers (for per-checkpoint resume)."""
    df = run.read(name)
    done = set() if df is None or df.empty else set(df[key].unique().tolist())
    return df, done


def append_rows(run: Run, name: str, existing: pd.DataFrame | None, new: pd.DataFrame,
                key_cols: list[str] | None = None) -> pd.DataFrame:
    """Return existing + new rows (new rows replace rows with the same key columns) and write atomically."""
    if existing is not None and not existing.empty:
        if key_cols:
            keys = new[key_cols].drop_duplicates()
            merged = existing.merge(keys, on=key_cols, how="left", indicator=True)
            existing = existing[(merged["_merge"] == "left_only").to_numpy()]
        df = pd.concat([existing, new], ignore_index=True)
    else:
        df = new.reset_index(drop=True)
    run.write(name, df)
    return df


def checkpoint_loop(run: Run, ckpts: list[Checkpoint], table: str, compute: Callable[[Checkpoint], pd.DataFrame],
                    *, desc: str, progress: bool = True, key_cols: list[str] | None = None) -> pd.DataFrame:
    """Shared resumable driver of per-checkpoint analyses: skip checkpoints whose rows exist, compute the rest,
    and rewrite the table atomically after each checkpoint (so an interrupted analysis resumes there)."""
    from tqdm.auto import tqdm

    with run_lock(run.path, table):
        df, done = resumable_table(run, table)
        todo = [c for c in ckpts if c.step not in done]
        for c in tqdm(todo, desc=f"{desc} {run.name}", disable=not progress, unit="ckpt"):
            df = append_rows(run, table, df, compute(c), key_cols)
    return df if df is not None else pd.DataFrame()
