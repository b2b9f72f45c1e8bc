"""Progress bars: one tqdm factory honouring `--quiet` and the CSN_NO_PROGRESS environment variable."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

NO_PROGRESS_ENV = "CSN_NO_PROGRESS"
"""Set to 1 to switch every progress bar off (tests, logs)."""


def progress_enabled(progress: bool = True) -> bool:
    """Whether to draw bars: asked for, and not switched off by CSN_NO_PROGRESS."""
    return bool(progress) and os.environ.get(NO_PROGRESS_ENV, "") in ("", "0")


def bar(iterable: Iterable[Any] | None = None, *, progress: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar (over `iterable`, or to advance by hand), disabled when progress_enabled(progress) is False."""
    kwargs["disable"] = kwargs.get("disable", False) or not progress_enabled(progress)
    return tqdm(iterable, **kwargs)


def hms(seconds: float) -> str:
    """A duration for people: '12m05s', or '1h03m' from an hour on."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


__all__ = ["NO_PROGRESS_ENV", "progress_enabled", "bar", "hms"]
