"""One writer per run: an OS file lock on RUN/.lock that the kernel releases when its process dies.

`run_lock` is taken by every writer of a run's files (training, analyses, reports); `main_lock` is
the same lock held by rank 0 alone under torchrun (the only rank that writes).
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from csn import dist
from csn.errors import CsnError

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


def lock_owner(run_dir: str | Path) -> tuple[int, str] | None:
    """(pid, what it writes: 'train', 'selectivity', ...) of another live process holding the run's writer lock, or
    None when the lock is free or held by this process (a reader, e.g. `csn report`, can then say that the tables
    it reads may still be growing)."""
    lock = Path(run_dir) / ".lock"
    if any(k[0] == str(lock.resolve()) for k in _HELD):
        return None  # this process writes there itself
    pid = lock_holder(run_dir)
    if pid is None or pid == os.getpid():
        return None
    try:
        what = lock.read_text().split(maxsplit=1)[1].strip() or "csn"
    except (IndexError, OSError, UnicodeDecodeError):
        what = "csn"
    return pid, what


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


def main_lock(run_dir: str | Path, what: str) -> contextlib.AbstractContextManager:
    """The run's writer lock held by rank 0 alone (the only rank that writes); a busy lock fails every rank.

    In a single process this is run_lock itself.
    """
    return dist.main_only(run_lock(run_dir, what))


__all__ = ["run_lock", "main_lock", "lock_holder", "lock_owner"]
