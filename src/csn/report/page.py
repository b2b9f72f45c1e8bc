"""The page the report is built of: runs grouped into conditions, sections and their items (tables, figures,
notes), the formatting helpers, and the registry of sections.

A section is a function `build(page) -> Section | None`, registered with `@section(NAME, order=...)` in its own
module of csn.report.sections (a section for a new analysis is one such module: html.py lays the page out from
the registry, in `order`, and knows no analysis). It reads the runs' tables through `page.table(run, name)` and
returns None (after `page.omit(...)`, naming the command that makes its tables) when there is nothing to show.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from csn.core.resources import is_write_refused
from csn.errors import CsnError
from csn.registry import Registry
from csn.runs.run import Run


@dataclass
class RunGroup:
    """A condition: a group of runs that differ only by seed (one condition of an experiment, or a lone run)."""

    name: str
    runs: list[Run] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return file_slug(self.name)


def file_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "run"


def is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def fmt(x, nd: int = 3) -> str:
    return f"{float(x):.{nd}f}" if is_number(x) else "–"


def fmt_pm(mean, se, nd: int = 3) -> str:
    return fmt(mean, nd) + (f" ± {fmt(se, nd)}" if is_number(se) else "")


def fmt_g(x) -> str:
    return f"{float(x):g}" if is_number(x) else "–"


def mean_of(v: Iterable[float]) -> float:
    a = np.asarray([x for x in v if is_number(x)], dtype=float)
    return float(a.mean()) if len(a) else float("nan")


def steps_label(steps: Sequence[int], limit: int = 14) -> str:
    steps = [int(s) for s in steps]
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[: limit - 3])) + f", … ({len(steps) - limit + 1} more) …, " + \
        ", ".join(map(str, steps[-2:]))


def epochs_label(epochs: Sequence[float], limit: int = 10) -> str:
    eps = [f"{float(e):.4g}" for e in epochs]
    return ", ".join(eps) if len(eps) <= limit else ", ".join(eps[: limit - 2]) + f", … ({len(eps) - limit + 2} more)"


def table_item(columns: Sequence[str], rows: Sequence[Sequence], caption: str = "", *, numeric: Sequence[int] = (),
               cls: str = "") -> dict:
    """A table item for the template: cells are strings (None shows as a dash), `numeric` columns are right-aligned."""
    return {"kind": "table", "columns": list(columns), "rows": [[("–" if c is None or c == "" else str(c)) for c in r] for r in rows],
            "caption": caption, "numeric": set(numeric), "cls": cls}


def note_item(text: str) -> dict:
    return {"kind": "note", "text": text}


def para_item(text: str) -> dict:
    return {"kind": "p", "text": text}


def heading_item(text: str) -> dict:
    return {"kind": "h3", "text": text}


def details_item(summary: str, items: list[dict]) -> dict:
    return {"kind": "details", "summary": summary, "items": items}


def fold(items: list[dict], summary: str, show: int) -> list[dict]:
    """The first `show` items as they are, the others folded under `summary` (a details item), if any are left."""
    rest = items[show:]
    return items[:show] + ([details_item(summary, rest)] if rest else [])


@dataclass
class Section:
    """One section of the page: an id (anchor), a title, a lead sentence and items (figures, tables, notes)."""

    id: str
    title: str
    lead: str = ""
    items: list[dict] = field(default_factory=list)


class Page:
    """Collects sections; figures are drawn into out_dir and referenced relative to it."""

    def __init__(self, out_dir: Path, conds: list[RunGroup], experiment: Path | None, log: Callable[[str], None]):
        self.out_dir = out_dir
        self.conds = conds
        self.experiment = experiment
        self.runs = [r for c in conds for r in c.runs]
        self.log = log
        self.omitted: list[dict] = []  # {"title", "text"}
        self._tables: dict[tuple[str, str], pd.DataFrame | None] = {}
        self.multi = len(conds) > 1

    # -- tables
    def table(self, run: Run, name: str) -> pd.DataFrame | None:
        key = (str(run.path), name)
        if key not in self._tables:
            df = run.read(name)
            self._tables[key] = df if df is not None and len(df) else None
        return self._tables[key]

    def prefix(self, cond: RunGroup, what: str) -> str:
        return f"{cond.slug}_{what}" if self.multi else what

    # -- figures
    def fig_item(self, fig) -> dict:
        return {"kind": "figure", "src": self.rel(fig.png), "svg": self.rel(fig.svg) if fig.svg and Path(fig.svg).is_file() else None,
                "caption": fig.caption}

    def rel(self, path: str | os.PathLike) -> str:
        rel = os.path.relpath(Path(path).resolve(), self.out_dir.resolve())
        return quote(Path(rel).as_posix())

    def draw(self, what: str, fn: Callable[[], object]) -> list[dict]:
        """Figures from fn() (one Figure or a list) as items; a failure becomes a note instead of a broken page."""
        import warnings

        try:
            with warnings.catch_warnings():  # an empty panel's legend is not worth a warning in the report's output
                warnings.filterwarnings("ignore", message="No artists with labels found")
                res = fn()
        except Exception as e:  # a figure must not take the page down; say what happened instead
            if is_write_refused(e):  # ... unless the page cannot be written at all (full disk, no permission)
                raise
            msg = str(e).strip().rstrip(".") or type(e).__name__
            self.log(f"report: {what} not drawn ({type(e).__name__}: {msg})")
            return [note_item(f"{what} could not be drawn: {msg} ({type(e).__name__}).")]
        figs = res if isinstance(res, list) else [res]
        return [self.fig_item(f) for f in figs if f is not None]

    def omit(self, title: str, text: str) -> None:
        self.omitted.append({"title": title, "text": text})

    def runs_with(self, name: str, *, or_omit: tuple[str, str] | None = None) -> list[tuple[RunGroup, list[Run]]]:
        """(condition, its runs that have table `name`) for every condition with one; with or_omit=(title, hint),
        a page without any such run notes the section as omitted (an analysis section's usual first step)."""
        out = self._runs_with(name)
        if not out and or_omit is not None:
            self.omit(*or_omit)
        return out

    def _runs_with(self, name: str) -> list[tuple[RunGroup, list[Run]]]:
        out = []
        for c in self.conds:
            rs = [r for r in c.runs if self.table(r, name) is not None]
            if rs:
                out.append((c, rs))
        return out


def join_values(values: Iterable) -> str:
    vals = list(dict.fromkeys("–" if v is None or v == "" else str(v) for v in values))
    return ", ".join(vals)


def nearby(exp: Path | None, marker: str) -> list[Path]:
    """Experiment folders (holding `marker`) inside an experiment directory or beside it (e.g. runs/windows-fmnist
    next to runs/reproduce-fmnist); folders that cannot be read are passed over."""
    found: set[Path] = set()
    for d in ([] if exp is None else [exp, exp.parent]):
        try:
            found |= {p for p in d.iterdir() if p != exp and (p / marker).is_file()}
        except OSError:
            continue
    return sorted(found)


def found_section(rep: Page, key: str, title: str, lead: str, near: list[Path], noun: str,
                   items: Callable[[Path], list[dict]]) -> Section:
    """A section listing the experiments found with this one: per folder, a link to its report (or how to build
    it) and `items(folder)`, or a note when its tables cannot be read."""
    sec = Section(key, title, lead)
    for d in near:
        sec.items.append(heading_item(d.name))
        page = d / "report" / "index.html"
        sec.items.append({"kind": "link", "href": rep.rel(page), "text": f"the {noun}'s report ({d.name}/report/index.html)"}
                         if page.is_file() else note_item(f"its report is not built yet: run `csn report {d}`."))
        try:
            sec.items += items(d)
        except CsnError as e:
            sec.items.append(note_item(f"its tables cannot be shown: {e}"))
    return sec


@dataclass(frozen=True)
class SectionEntry:
    """A registered section: its name (shown while the page is built), its builder and its place on the page."""

    name: str
    build: Callable[[Page], Section | None]
    order: float


SECTIONS: Registry[SectionEntry] = Registry("report section", "csn.report.sections")
"""Every section of the page (filled by `section` in the modules of csn.report.sections)."""


def section(name: str, order: float) -> Callable[[Callable[[Page], Section | None]], Callable[[Page], Section | None]]:
    """Register the decorated `build(page) -> Section | None` as section `name`, placed on the page by `order`
    (smaller first; csn's: configuration 10, training 20, selectivity 30, ablation 40, linearity 50,
    regularization 60, how early is early 70, which regularizer 80, cka 90)."""
    return SECTIONS.decorator(name, wrap=lambda build: SectionEntry(name, build, order))


def page_sections() -> list[SectionEntry]:
    """The registered sections in page order."""
    return sorted((e for _, e in SECTIONS.items()), key=lambda e: (e.order, e.name))


__all__ = ["Page", "RunGroup", "Section", "SectionEntry", "SECTIONS", "section", "page_sections", "table_item",
           "fmt", "fmt_pm", "fmt_g", "is_number", "mean_of", "steps_label", "epochs_label", "file_slug", "join_values",
           "nearby", "found_section",
           "note_item", "para_item", "heading_item", "details_item", "fold"]
