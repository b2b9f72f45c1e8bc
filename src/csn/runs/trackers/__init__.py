"""Trackers: a run's numbers also sent to the dashboards researchers watch (TensorBoard, Weights & Biases).

A run asks for one in its config (`tracker = "tensorboard"`, `csn train --tracker wandb`); the training loop logs
every line of tables/training.parquet and every checkpoint's test metrics to it, and the analysis driver a short
summary of each checkpoint it writes (`Analysis.summary`). Its files live in the run directory, under
`RUN/tracker/`. A tracker only reads values: it never changes training (checkpoints are bitwise the same with and
without one), and it is not part of a run's identity (resume and the experiments ignore the key).

A new tracker is one module in this package: subclass `Tracker`, decorate it with `@register_tracker(NAME,
extra=...)`. Its package is imported inside the module, never by the core: a missing one is one CsnError naming
`pip install 'csn[EXTRA]'`. Only rank 0 logs under torchrun (`open_tracker` returns None elsewhere).
"""

from __future__ import annotations

import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

from csn import dist
from csn.errors import CsnError
from csn.registry import Registry

NONE = "none"
FOLDER = "tracker"
"""The folder of a run directory that holds every tracker's files (RUN/tracker/<tracker>/...)."""
TRAIN = "train"
"""The part of a run that training logs as (an analysis logs as its own name)."""


class Tracker(ABC):
    """Where one part of a run (its training, or one analysis) sends its numbers.

    `__init__(run_dir, config, part, start_step)` opens it: config is the run's config as a dict (logged as
    hyperparameters), part is 'train' or the analysis's name, start_step is the step training resumes from (0 for a
    fresh run; None for an analysis). `log(step, values)` sends {name: number} at an optimizer step; `close()` flushes.
    """

    name: ClassVar[str]
    extra: ClassVar[str]
    """The pip extra that installs the tracker's package: pip install 'csn[EXTRA]'."""

    @abstractmethod
    def __init__(self, run_dir: Path, config: dict[str, Any], part: str, start_step: int | None) -> None: ...

    @abstractmethod
    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Send `values` (finite numbers) at optimizer step `step`."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release the tracker's files (default: nothing)."""


TRACKERS: Registry[type[Tracker]] = Registry("tracker", "csn.runs.trackers", extra=(NONE,))


def register_tracker(name: str, *, extra: str) -> Callable[[type[Tracker]], type[Tracker]]:
    """`@register_tracker("tensorboard", extra="tensorboard")`: register a Tracker subclass under `name`."""
    def deco(cls: type[Tracker]) -> type[Tracker]:
        cls.name, cls.extra = name, extra
        return TRACKERS.register(name, cls)
    return deco


def tracker_names() -> list[str]:
    """Valid values of the config key `tracker` (its Literal type): 'none' and every registered tracker."""
    return [NONE, *TRACKERS.names()]


def require(module: str, tracker: str, extra: str) -> ModuleType:
    """Import the package a tracker needs, or the one CsnError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CsnError(f"tracker {tracker!r} needs the {module.split('.')[0]} package, which is not installed; "
                       f"install it with pip install 'csn[{extra}]' (or choose tracker=none).") from None


def open_tracker(name: str, run_dir: str | Path, config: dict[str, Any], part: str = TRAIN,
                 start_step: int | None = None) -> Tracker | None:
    """The tracker `name` opened for `part` of the run in `run_dir` (rank 0); None for 'none' and on other ranks."""
    if name == NONE or not dist.is_main():
        return None
    return TRACKERS.get(name)(Path(run_dir), config, part, start_step)


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The values a tracker logs: numbers only, NaN and infinities left out (a dashboard cannot draw them)."""
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config as hyperparameters: numbers, text and bools as they are, everything else (lists, tables, None) as
    its text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


__all__ = ["Tracker", "TRACKERS", "register_tracker", "tracker_names", "require", "open_tracker",
           "finite", "flat_config", "NONE", "FOLDER", "TRAIN"]
