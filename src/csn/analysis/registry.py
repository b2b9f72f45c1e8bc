"""The analysis registry: `@register_analysis()` on each Analysis class, where it is defined.

The CLI (a command per analysis: the analysis's own module in csn.cli where it has one, else one built from its
Options), the report (csn.report's sections, registered beside them) and the study's tables read it; an analysis
defined outside csn registers the same way when its module is imported.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from csn.analysis.base import Analysis
from csn.registry import Registry
from csn.runs.table import TableSpec


@dataclass(frozen=True)
class AnalysisEntry:
    """A registered analysis: its class, the `csn` command that runs it, how pages and plans call it, a summary."""

    name: str
    cls: type[Analysis]
    command: str
    label: str
    summary: str

    @property
    def table(self) -> TableSpec:
        """Its main (first) table: what `csn NAME` writes and the report reads first."""
        return self.cls.tables[0]


ANALYSES: Registry[AnalysisEntry] = Registry("analysis name", "csn.analysis")
"""Every analysis by name (its Analysis.name; filled by register_analysis where each class is defined)."""


def register_analysis(command: str | None = None, *, label: str | None = None,
                      summary: str | None = None) -> Callable[[type[Analysis]], type[Analysis]]:
    """Register the decorated Analysis subclass under its `name`. command: the `csn` command [default: the name];
    label: how pages and plans call it [default: the name]; summary: [default: its docstring's first line]."""
    def entry(cls: type[Analysis]) -> AnalysisEntry:
        text = summary if summary is not None else (inspect.getdoc(cls) or "").split("\n")[0]
        return AnalysisEntry(cls.name, cls, command or cls.name, label or cls.name, text)

    def deco(cls: type[Analysis]) -> type[Analysis]:
        return ANALYSES.decorator(cls.name, wrap=entry)(cls)
    return deco


def analysis(name: str) -> AnalysisEntry:
    """The registered analysis `name` (unknown: one CsnError naming the valid ones)."""
    return ANALYSES.get(name)


def analyses() -> list[AnalysisEntry]:
    """Every registered analysis, in the order they were registered."""
    return [e for _, e in ANALYSES.items()]


__all__ = ["ANALYSES", "AnalysisEntry", "register_analysis", "analysis", "analyses"]
