"""Presets: every named configuration csn ships, in one format.

A preset is a TOML file ``csn/presets/<kind>/<name>.toml`` (comments say where its numbers come from), validated by
its kind's schema where it is used:

    train     a training configuration (csn.runs.config.TrainConfig): `csn train --preset NAME`
    study     a study file (csn.experiments.study): `csn reproduce --preset NAME`
    windows   a critical-period map or the mechanism study (csn.experiments.windows.WindowsPreset)
    regime    a regime study (csn.experiments.regime.RegimePreset)

`csn presets` lists them; a preset file is also a template: copy one, edit it, pass it with --config where the
command takes one.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import Any

from csn.errors import CsnError, unknown

KINDS = ("train", "study", "windows", "regime")
KIND_TEXT = {"train": "preset", "study": "study preset", "windows": "windows preset",
             "regime": "regime preset"}


def _dir(kind: str):
    if kind not in KINDS:
        raise unknown("preset kind", kind, KINDS)
    return resources.files("csn").joinpath("presets", kind)


@cache
def _names(kind: str) -> tuple[str, ...]:
    return tuple(sorted(p.name[:-5] for p in _dir(kind).iterdir() if p.name.endswith(".toml")))


def names(kind: str) -> list[str]:
    """The shipped presets of a kind, sorted (package files: read once per process)."""
    return list(_names(kind))


def text(kind: str, name: str) -> str:
    """The TOML text of a shipped preset (an unknown name: one CsnError listing the known ones)."""
    if name not in names(kind):
        raise unknown(KIND_TEXT[kind], name, names(kind))
    return _read(kind, name)


@cache
def _read(kind: str, name: str) -> str:
    return _dir(kind).joinpath(f"{name}.toml").read_text(encoding="utf-8")


def data(kind: str, name: str) -> dict[str, Any]:
    """The table of a shipped preset."""
    try:
        return tomllib.loads(text(kind, name))
    except tomllib.TOMLDecodeError as e:  # a shipped file: a packaging mistake, named
        raise CsnError(f"the shipped {KIND_TEXT[kind]} {name} is not valid TOML ({e}); reinstall csn.") from None


__all__ = ["KINDS", "names", "text", "data"]
