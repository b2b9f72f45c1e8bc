"""Names csn gives on disk, formatted and parsed in this one place: run names of experiments (`<condition>-s<seed>`)
and a run's checkpoint files (weights `step-<step>.safetensors`, optimizer state `state-<step>.safetensors`)."""

from __future__ import annotations

import re

_RUN_NAME = re.compile(r"^(?P<cond>.+)-s(?P<seed>\d+)$")
_REG_FROM = re.compile(r"^reg-from-(?P<onset>[0-9.]+)$")


WEIGHTS_GLOB = "step-*.safetensors"
STATE_GLOB = "state-*.safetensors"


def weights_file(step: int) -> str:
    """File name of the weights of the checkpoint of `step`."""
    return f"step-{step:08d}.safetensors"


def state_file(step: int) -> str:
    """File name of the optimizer state saved with the checkpoint of `step`."""
    return f"state-{step:08d}.safetensors"


def run_name(condition: str, seed: int) -> str:
    """The name (and folder) of condition `condition` trained with seed `seed`: 'baseline-s0'."""
    return f"{condition}-s{int(seed)}"


def parse_run_name(name: str) -> tuple[str, int | None]:
    """(condition, seed) of a run name; (name, None) when it is not of the form `<condition>-s<seed>`."""
    m = _RUN_NAME.match(name)
    return (m["cond"], int(m["seed"])) if m else (name, None)


def onset_of(condition: str) -> float | None:
    """The onset (epochs) of a condition named `reg-from-<onset>` (as csn's experiments name them), else None."""
    m = _REG_FROM.match(condition)
    if m:
        try:
            return float(m["onset"])
        except ValueError:
            return None
    return None


def condition_order(name: str) -> tuple:
    """Sort key of condition names: baseline first, then reg-from-X by onset, then by name."""
    if name == "baseline":
        return (0, 0.0, name)
    onset = onset_of(name)
    return (1, onset, name) if onset is not None else (2, 0.0, name)


__all__ = ["run_name", "parse_run_name", "onset_of", "condition_order"]
