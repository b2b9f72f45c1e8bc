"""Resource limits: refuse a write that cannot fit the disk before it starts, and retry out-of-memory
work with smaller batches instead of dying.

    check_disk_space(path, need_bytes, what=...)     CsnError naming the sizes when `need_bytes` won't fit
    env_limit(env, default)                          a resource bound: $ENV when set (a positive number), else default
    check_limit(need, limit, what=..., raise_it=...) CsnError with the estimate and the limit when need > limit
    available_memory(), check_memory(need, what=...) memory this process can still take; refuse what cannot fit
    new_file_mode()                                  0o666 less the umask: the mode an atomically written file gets
    state_dict_bytes(tensors)                        bytes a checkpoint of these tensors takes
    retry_smaller_batches(fn, batch)                 fn(batch), halving `batch` on out-of-memory errors
    is_oom(exc)                                      True for CUDA/MPS/CPU allocation failures
    is_disk_full(exc), is_write_refused(exc)         a full disk; a full disk or a place that cannot be written
"""

from __future__ import annotations

import errno
import gc
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import torch

from csn.errors import CsnError

T = TypeVar("T")

#: Set to 1 to skip the free-space check (e.g. a file system that reports its free space wrongly).
NO_DISK_CHECK_ENV = "CSN_NO_DISK_CHECK"

_HEADROOM = 1.05  # safetensors headers, the training table and file-system rounding
_MIN_HEADROOM_BYTES = 1 << 20


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disks and limits are stated)."""
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            text = f"{n:.1f}".removesuffix(".0")
            return f"{text} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def env_limit(env: str, default: float, *, example: str = "a larger number") -> float:
    """A resource bound that a user may raise: the value of $ENV when set (a positive finite number), else
    `default`; a malformed value is a CsnError naming the variable."""
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and math.isfinite(value)):
        raise CsnError(f"{env}={raw!r} is not a positive number; set it to {example} or unset it.")
    return value


def check_limit(need: float, limit: float, *, what: str, raise_it: str, show: Callable[[float], str] = human_bytes) -> None:
    """Refuse a request before any allocation: CsnError('{what} needs {need}; the limit is {limit} ({raise_it}).')
    when need > limit (`show` formats both numbers, bytes by default)."""
    if need > limit:
        raise CsnError(f"{what} needs {show(need)}; the limit is {show(limit)} ({raise_it}).")


_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2 (a container)
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        return None  # missing, or "max" (no limit)


def available_memory() -> int | None:
    """Bytes of memory this process can still take: Linux's MemAvailable, capped by a container's cgroup limit
    (its limit less its usage); else the physical memory; None when it cannot be told."""
    have: int | None = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        have = None
    if have is None:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            have = None
    for limit_file, usage_file in _CGROUP_FILES:
        limit, usage = _read_int(limit_file), _read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            have = max(0, limit - usage) if have is None else min(have, max(0, limit - usage))
    return have


def check_memory(need_bytes: float, *, what: str, fix: str) -> None:
    """Refuse, before any allocation, work whose memory estimate exceeds the memory available now (whatever a
    count limit says): CsnError('{what} needs about N of memory, but this machine has M available; {fix}.')."""
    have = available_memory()
    if have is not None and need_bytes > have:
        raise CsnError(f"{what} needs about {human_bytes(need_bytes)} of memory, but this machine has {human_bytes(have)} "
                       f"available; {fix}.")


def _umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc/self/status), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError, UnicodeDecodeError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode of a new file under the umask (0o666 & ~umask, e.g. 0o644): what a temporary file (created 0600 by
    tempfile) is given before it is renamed into place, so that other users of a shared machine can read a run or
    a report as they can any other file the user writes."""
    return 0o666 & ~_umask()


def state_dict_bytes(tensors: Mapping[str, torch.Tensor] | Iterable[torch.Tensor]) -> int:
    """Bytes of tensor data a safetensors file of these tensors holds (a state_dict or a list of tensors)."""
    values = tensors.values() if isinstance(tensors, Mapping) else tensors
    return sum(t.numel() * t.element_size() for t in values if isinstance(t, torch.Tensor))


def check_disk_space(path: str | Path, need_bytes: int, *, what: str = "the files to write",
                     fix: str = "free some space or write elsewhere") -> None:
    """Raise CsnError when the file system holding `path` has less than `need_bytes` (plus headroom) free.

    `path` may not exist yet: its nearest existing parent is measured. The check is skipped when
    CSN_NO_DISK_CHECK=1 or when the free space cannot be read.
    """
    if need_bytes <= 0 or os.environ.get(NO_DISK_CHECK_ENV, "") not in ("", "0"):
        return
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return
    need = int(need_bytes * _HEADROOM) + _MIN_HEADROOM_BYTES
    if free < need:
        raise CsnError(f"not enough free disk space in {probe}: {what} need about {human_bytes(need)} but only {human_bytes(free)} "
                       f"are free; {fix} (or set {NO_DISK_CHECK_ENV}=1 to skip this check).")


def is_disk_full(e: BaseException) -> bool:
    """True when `e` says the disk (or the user's quota) is full, whichever library raised it."""
    text = str(e)
    return (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text
            or "Disk quota exceeded" in text)


def is_write_refused(e: BaseException) -> bool:
    """True when a write failed because of where it goes, not of what csn does: a full disk, a read-only file
    system, or missing permissions. Such an error stops the command; it is never turned into a note."""
    return is_disk_full(e) or (isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS))


def is_oom(e: BaseException) -> bool:
    """True when `e` is an allocation failure (torch.OutOfMemoryError, or a RuntimeError saying so on CPU/MPS)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                            or "cannot allocate memory" in msg)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def retry_smaller_batches(fn: Callable[[int], T], batch: int, *, min_batch: int = 1,
                          on_retry: Callable[[int, int], None] | None = None, what: str = "this step") -> T:
    """Return fn(batch); when it runs out of memory, free what it held, halve `batch` and call it again.

    Use it around work whose result does not depend on the batch size (sums over examples, per-example
    outputs), and make `fn` start over for each call (it must not keep partial state between tries).
    Below `min_batch` the error becomes a CsnError saying what to do. `on_retry(old, new)` is told of
    each halving (default: one line on stderr), so the caller can record the batch size it used.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise CsnError(f"batch size must be a whole number >= 1, got {batch!r}.")
    min_batch = max(1, int(min_batch))
    while True:
        failed = False
        try:
            return fn(batch)
        except Exception as e:  # noqa: BLE001 - only memory errors are handled, the rest re-raised
            if not is_oom(e):
                raise
            failed = True
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is released first.
        if failed:
            _free_memory()
            if batch <= min_batch:
                raise CsnError(f"{what} ran out of memory even with batch size {batch} ({detail}); free memory (close "
                               "other jobs), use a smaller model or input, or run on a device with more memory.")
            new = max(min_batch, batch // 2)
            if on_retry is not None:
                on_retry(batch, new)
            else:
                print(f"note: {what} ran out of memory with batch size {batch}; retrying with {new}.", file=sys.stderr,
                      flush=True)
            batch = new
