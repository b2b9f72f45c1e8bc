"""Atomic file I/O: temporary file in the same folder, fsync, rename; sha256; safetensors and Parquet.

Files get the mode the umask gives a new file (0o644 under the usual 022), not the temporary file's 0600.

A crash never leaves a half-written file under its final name (leftover `.NAME.XXXX.tmp` files are
removed by the next writer of the run, csn.runs.lock).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csn.core.resources import new_file_mode
from csn.errors import CsnError

SIDECAR = ".sha256"
_SHA256 = re.compile(r"[0-9a-f]{64}")

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
        os.chmod(tmp_path, new_file_mode())  # the umask's mode, not the temporary file's 0600
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


TABLE_COLUMNS: dict[str, tuple[dict[str, str], str]] = {}
"""{table name: ({column: dtype}, what to do about a bad file)}: the schema read_table checks a table against
(filled by csn.runs.table.TableSpec; a tagged table NAME-TAG has NAME's schema)."""
TABLE_OPTIONAL: dict[str, dict[str, str]] = {}
"""{table name: {column: dtype}}: columns a table may lack (tables written before them), checked when present."""
TABLE_STEP: dict[str, str] = {}
"""{table name: the column holding the checkpoint step its rows were computed at} for tables with row provenance."""
_RERUN = "delete it and run the analysis that wrote it again"
_ARROW_KINDS = {"int64": (pa.types.is_integer,), "float64": (pa.types.is_floating, pa.types.is_integer),
                "bool": (pa.types.is_boolean,), "str": (pa.types.is_string, pa.types.is_large_string)}


def register_table(name: str, columns: dict[str, str], fix: str = _RERUN, *, optional: dict[str, str] | None = None,
                   step: str | None = None) -> None:
    """Declare the columns (int64, float64, bool, str) of table NAME (first declaration wins); `optional`: columns
    it may lack (checked when present); `step`: its checkpoint-step column, for tables whose rows carry provenance."""
    TABLE_COLUMNS.setdefault(name, (dict(columns), fix))
    TABLE_OPTIONAL.setdefault(name, dict(optional or {}))
    if step is not None:
        TABLE_STEP.setdefault(name, step)


def table_name(path: str | Path) -> str | None:
    """The declared table name of the file at `path` (NAME.parquet or NAME-TAG.parquet), or None."""
    stem = Path(path).name.removesuffix(".parquet")
    names = [n for n in TABLE_COLUMNS if stem == n or stem.startswith(n + "-")]
    return max(names, key=len) if names else None


def table_schema(path: str | Path) -> tuple[dict[str, str], str] | None:
    """The declared (columns, fix) of the table at `path` (by file name: NAME.parquet or NAME-TAG.parquet)."""
    name = table_name(path)
    return TABLE_COLUMNS[name] if name else None


def check_table_schema(path: str | Path, schema: pa.Schema, columns: dict[str, str], fix: str = _RERUN) -> None:
    """CsnError naming the file, the first missing or mistyped column and the fix, unless `schema` (a Parquet
    file's) holds every declared column with a compatible type (integers for int64, numbers for float64,
    strings for str; an all-null column passes)."""
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise CsnError(f"table {path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} (written by "
                       f"another program or an older csn?); {fix}.")
    for col, dtype in columns.items():
        got = schema.field(col).type
        if not (pa.types.is_null(got) or any(ok(got) for ok in _ARROW_KINDS[dtype])):
            raise CsnError(f"table {path} holds the column {col!r} as {str(got).replace('large_', '')}, but it must be "
                           f"{dtype} (written by another "
                           f"program or modified?); {fix}.")


def read_table(path: str | Path, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Read a Parquet table after checking its schema against `columns` (default: the declared schema of its
    name, csn.runs.table.TableSpec); a corrupt or mistyped file is one CsnError naming it and the fix."""
    declared = (columns, _RERUN) if columns is not None else table_schema(path)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        fix = declared[1] if declared else _RERUN
        raise CsnError(f"table {path} is unreadable or corrupt ({type(e).__name__}); {fix}.") from None
    if declared is not None:
        check_table_schema(path, table.schema, *declared)
    name = table_name(path)
    optional = {c: t for c, t in TABLE_OPTIONAL.get(name or "", {}).items() if c in table.schema.names}
    if optional:  # a column older tables lack: its type is checked where it is there
        check_table_schema(path, table.schema, optional, declared[1] if declared else _RERUN)
    try:
        return table.to_pandas()
    except Exception as e:  # noqa: BLE001 - e.g. a column type pandas cannot hold
        raise CsnError(f"table {path} cannot be converted to a table ({type(e).__name__}); {_RERUN}.") from None


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None, *,
                 checksum: bool = False) -> str:
    """Atomically save tensors as safetensors; return the file's sha256. checksum=True also writes it to the
    sidecar PATH.sha256 (`sha256sum -c` format), for files no manifest lists (optimizer state, cached models).

    Keep metadata to at most one key: safetensors writes a multi-key metadata map in hash order, which
    would make identical checkpoints differ byte-wise.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        digest = sha256_file(tmp)
    if checksum:
        write_text(sidecar(path), f"{digest}  {Path(path).name}\n")
    return digest


def sidecar(path: str | Path) -> Path:
    """The checksum file of `path`: PATH.sha256."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR)


def read_sidecar(path: str | Path) -> str | None:
    """The sha256 recorded in PATH.sha256, or None when the sidecar is missing or malformed."""
    try:
        text = sidecar(path).read_bytes().decode("ascii")
    except (OSError, UnicodeDecodeError):
        return None
    digest = text.split(" ", 1)[0].strip()
    return digest if _SHA256.fullmatch(digest) else None


def checksum_problem(path: str | Path, sha256: str | None = None) -> str | None:
    """Why `path` fails its checksum (the manifest's `sha256`, else its sidecar's), or None when it passes."""
    path = Path(path)
    if not path.is_file():
        return "is missing"
    want = sha256 if sha256 is not None else read_sidecar(path)
    if want is None:
        return f"has no checksum ({sidecar(path).name} is missing or damaged)"
    if sha256_file(path) != want:
        where = "the manifest" if sha256 is not None else sidecar(path).name
        return f"is corrupt (its sha256 differs from {where}: the file was truncated or modified after it was written)"
    return None


def load_tensors(path: str | Path, *, what: str, fix: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, loaded only after its sha256 (`sha256`, else the sidecar's) matches;
    every problem is one CsnError '{what} PATH ...; {fix}'."""
    path = Path(path)
    problem = checksum_problem(path, sha256)
    if problem is not None:
        raise CsnError(f"{what} {path} {problem}, so it was not loaded; {fix}")
    try:
        return load_file(str(path))  # safetensors checks the header (sizes, offsets) before allocating
    except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged file
        raise CsnError(f"{what} {path} cannot be read ({type(e).__name__}: {str(e)[:80]}); {fix}") from None


def tensor_shapes(path: str | Path) -> dict[str, list[int]]:
    """{name: shape} from a safetensors file's header, read without loading any tensor (ValueError if damaged)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ValueError(f"{type(e).__name__}: {str(e)[:80]}") from None


__all__ = ["atomic_path", "write_text", "write_json", "write_table", "read_table", "sha256_file", "save_tensors",
           "sidecar", "read_sidecar", "checksum_problem", "load_tensors", "tensor_shapes", "SIDECAR", "TABLE_COLUMNS",
           "register_table", "table_schema", "table_name", "check_table_schema", "TABLE_OPTIONAL", "TABLE_STEP"]
