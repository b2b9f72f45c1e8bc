"""Child processes that die with their parent, however the parent ends (SIGKILL included).

A worker process (e.g. one training run of `csn reproduce`) calls `die_with_parent(parent_pid)` first:

- on Linux, `prctl(PR_SET_PDEATHSIG, SIGKILL)` has the kernel kill it the moment its parent exits;
  the parent pid is checked right after, which closes the race of a parent that died before the call;
- on every POSIX system, a daemon thread checks every `poll_s` seconds whether the process was
  re-parented (`os.getppid()` no longer the parent) and then kills it. This also covers the one gap of
  PR_SET_PDEATHSIG, which fires when the parent *thread* that started the child ends.

A killed worker leaves what a killed `csn train` leaves: complete checkpoints, a stale lock and maybe a
temporary file, all recovered by the next run (csn.runs.lock), so the same command resumes it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent exits; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)
        if os.getppid() != parent_pid:
            _kill_self()


def die_with_parent(parent_pid: int, *, poll_s: float = 0.5) -> bool:
    """End this process (SIGKILL) as soon as the process `parent_pid` is gone; call it first thing in a child.

    Returns whether the kernel's immediate mechanism (Linux) is armed; the polling watchdog runs in any case.
    """
    if os.name != "posix":
        return False
    armed = _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        _kill_self()
    threading.Thread(target=_watch, args=(parent_pid, poll_s), name="csn-parent-watch", daemon=True).start()
    return armed


__all__ = ["die_with_parent"]
