"""The dataset-format registry: `@register_dataset(NAME)` beside each reader; load_dataset reads it.

A reader is called as `reader(data_root, **options)` and returns DataSplits (validated, see csn.data.validate).
`options` names the keyword options it takes (anything else is refused with the valid names before it runs);
a format defined outside csn registers the same way when its module is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from csn.data.tensors import DataSplits
from csn.errors import CsnError, unknown
from csn.registry import Registry

Reader = Callable[..., DataSplits]


@dataclass(frozen=True)
class DatasetFormat:
    """A registered dataset format: its reader, the options it takes (what they are called in messages: 'option' or
    'key'), other names it answers to, and a one-line summary."""

    name: str
    reader: Reader
    options: tuple[str, ...] = ()
    option_kind: str = "option"
    aliases: tuple[str, ...] = ()
    summary: str = ""

    def load(self, name: str, data_root: str | None, options: dict) -> DataSplits:
        """The reader's DataSplits, after refusing an option it does not take (`name`: as the user wrote it)."""
        for key in options:
            if key not in self.options:
                if not self.options:
                    raise CsnError(f"dataset {name!r} takes no options, got {key!r}.")
                raise unknown(f"{name} {self.option_kind}", key, self.options)
        return self.reader(data_root, **options)


FORMATS: Registry[DatasetFormat] = Registry("dataset", "csn.data")
"""Every dataset format by name (filled by register_dataset where each reader is defined)."""

_ALIASES: dict[str, str] = {}


def register_dataset(name: str, *, options: tuple[str, ...] = (), option_kind: str = "option",
                     aliases: tuple[str, ...] = (), summary: str | None = None) -> Callable[[Reader], Reader]:
    """Register the decorated reader as dataset format `name` (summary: default its docstring's first line)."""
    def entry(reader: Reader) -> DatasetFormat:
        text = summary if summary is not None else (inspect.getdoc(reader) or "").split("\n")[0]
        for alias in aliases:
            _ALIASES[alias] = name
        return DatasetFormat(name, reader, tuple(options), option_kind, tuple(aliases), text)
    return FORMATS.decorator(name, wrap=entry)


def dataset_format(name: str) -> DatasetFormat:
    """The format `name` (or an alias of it) names; unknown: one CsnError naming the valid formats."""
    FORMATS.discover()
    return FORMATS.get(_ALIASES.get(name, name))


def dataset_help() -> str:
    """The registered names, for help texts: 'fashion-mnist, fmnist-pairs, idx, ...'."""
    return ", ".join(FORMATS.names())


__all__ = ["FORMATS", "DatasetFormat", "Reader", "register_dataset", "dataset_format", "dataset_help"]
