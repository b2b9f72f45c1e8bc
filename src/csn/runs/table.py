"""Resumable analysis tables: what a table holds, what is left to compute, and the one compatibility rule.

An analysis writes long-form Parquet tables under RUN/tables/. Each is described by a `TableSpec`:
its columns and their types, the *key* (the columns one unit of work covers, e.g. step and layer),
and its *settings* columns (how the rows were computed: split, subset size, BatchNorm policy, ...).
`ResumableTable` reads a table once, refuses to mix rows computed with other settings into it (the
one compatibility rule of every analysis), tells which keys of a request are still missing, and
rewrites the table atomically after each unit of work (rows of the same key are replaced), so an
interrupted analysis resumes where it stopped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from csn.errors import CsnError
from csn.runs.io import register_table
from csn.runs.run import Run

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

PROVENANCE = "checkpoint_sha256"
"""The column every analysis row carries: the sha256 (the manifest's) of the checkpoint it was computed from, so
a re-run recomputes the rows of a replaced checkpoint and `csn verify` names rows that no longer match. Tables
written before it lack it and are read as before (the next run of their analysis records it)."""
NOT_FROM_CHECKPOINTS = ("training",)
"""Tables whose rows are not computed from a checkpoint (the training log): no provenance column."""


def tagged(name: str, tag: str | None) -> str:
    """A table's file name with an optional tag: 'selectivity' or 'selectivity-TAG'."""
    if tag is None or tag == "":
        return name
    if not _TAG.match(str(tag)):
        raise CsnError(f"table tag {tag!r} must be letters, digits, '_', '-' or '.', e.g. 'nobn'.")
    return f"{name}-{tag}"


@dataclass(frozen=True)
class TableSpec:
    """The schema of one analysis table.

    columns: {column: dtype} in table order (int64, float64, bool, str). key: the columns one unit
    of work covers; rows sharing a key are written and replaced together. settings: table-wide
    settings columns (one value per table). row_settings: settings that may differ between keys but
    must equal the request's wherever the request covers an existing key (e.g. the BatchNorm batches
    of a checkpoint). same_set: columns whose set of values must equal the request's (e.g. the layers
    read). step: the column holding the checkpoint step. flags: the option that sets each settings
    column (named in the error). labels: how to say a per-row setting's value in a sentence.
    row_scope: the columns a per-row setting is a function of (default: the key), e.g. the BatchNorm
    batches of a checkpoint, shared by every row of that checkpoint whatever else its key says.
    replace_by: the columns whose rows a new computation replaces as a whole (default: the key), e.g. a
    checkpoint's stage in ablation: a sweep on another grid replaces the stage's rows, never mixes in.
    fix: what to do about a damaged file of this table (default: delete it and run the analysis again).
    provenance: the rows carry PROVENANCE, the sha256 of the checkpoint at `step` they were computed from
    (appended to `columns` here, the one place; run_analysis fills it in; off for NOT_FROM_CHECKPOINTS).
    """

    name: str
    columns: Mapping[str, str]
    key: tuple[str, ...]
    settings: tuple[str, ...] = ()
    row_settings: tuple[str, ...] = ()
    same_set: tuple[str, ...] = ()
    step: str = "step"
    flags: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    row_scope: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    replace_by: tuple[str, ...] = ()
    fix: str = ""
    provenance: bool = True

    def __post_init__(self) -> None:
        own = {c: t for c, t in self.columns.items() if c != PROVENANCE}
        provenance = self.provenance and self.name not in NOT_FROM_CHECKPOINTS
        object.__setattr__(self, "provenance", provenance)
        object.__setattr__(self, "columns", {**own, PROVENANCE: "str"} if provenance else own)
        register_table(self.name, own, *([self.fix] if self.fix else []),  # read_table checks files by name
                       optional={PROVENANCE: "str"} if provenance else None, step=self.step if provenance else None)

    @property
    def required(self) -> dict[str, str]:
        """The columns a table file must hold (PROVENANCE may be missing from tables written before it)."""
        return {c: t for c, t in self.columns.items() if c != PROVENANCE}

    def frame(self, rows: pd.DataFrame | Iterable[Mapping[str, Any]] | None = None) -> pd.DataFrame:
        """Rows in this table's column order and types (an empty table for None); PROVENANCE, when the rows lack
        it, is empty (run_analysis fills it in)."""
        if rows is None:
            return pd.DataFrame({c: pd.Series(dtype=_pandas(t)) for c, t in self.columns.items()})
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=list(self.columns))
        if self.provenance and PROVENANCE not in df.columns:
            df = df.assign(**{PROVENANCE: None})
        missing = [c for c in self.columns if c not in df.columns]
        if missing:
            raise ValueError(f"rows for table {self.name} lack columns {missing}")
        df = df[list(self.columns)].astype({c: _pandas(t) for c, t in self.columns.items()})
        if self.provenance:
            df[PROVENANCE] = df[PROVENANCE].where(df[PROVENANCE].notna(), None)
        return df


def _pandas(dtype: str) -> str:
    return "object" if dtype == "str" else dtype


class ResumableTable:
    """One analysis table of a run, as rank 0 (the only writer) holds it while an analysis runs."""

    def __init__(self, run: Run, spec: TableSpec, tag: str | None = None) -> None:
        self.run, self.spec = run, spec
        self.name = tagged(spec.name, tag)
        self.path = run.table_path(self.name)
        self.df: pd.DataFrame | None = None

    def load(self) -> ResumableTable:
        """Read the table (None when it does not exist yet); a table without this spec's columns and types is refused
        (a table written before row provenance gets an empty PROVENANCE column)."""
        self.df = self.run.read(self.name, columns=self.spec.required)
        if self.df is not None and self.spec.provenance and PROVENANCE not in self.df.columns:
            self.df = self.df.assign(**{PROVENANCE: None})
        return self

    # -- provenance: which checkpoint each row was computed from ---------------------------------------
    def provenance(self, manifest: Mapping[int, str]) -> tuple[list[int], list[int]]:
        """(stale, unrecorded): the steps of `manifest` ({step: sha256}) whose rows were computed from other weights
        (another sha256), and those with rows that record none (written before provenance)."""
        if not self.spec.provenance or self.df is None or self.df.empty:
            return [], []
        df = self.df[[self.spec.step, PROVENANCE]].drop_duplicates()
        df = df[df[self.spec.step].isin(set(manifest))]
        want = df[self.spec.step].map(dict(manifest))
        known = df[PROVENANCE].notna()
        stale = sorted(set(df.loc[known & (df[PROVENANCE] != want), self.spec.step].tolist()))
        unrecorded = sorted(set(df.loc[~known, self.spec.step].tolist()))
        return [int(s) for s in stale], [int(s) for s in unrecorded]

    def adopt(self, manifest: Mapping[int, str]) -> None:
        """Record the manifest's sha256 in the rows that record none (a table written before provenance) and
        rewrite the table."""
        step = self.df[self.spec.step]
        fill = self.df[PROVENANCE].isna() & step.isin(set(manifest))
        self.df.loc[fill, PROVENANCE] = step[fill].map(dict(manifest))
        self.run.write(self.name, self.df)

    def forget(self, steps: Iterable[int]) -> None:
        """Drop the rows of `steps` from the table in memory (they are computed again; the file is rewritten with
        the new rows)."""
        if self.df is not None:
            self.df = self.df[~self.df[self.spec.step].isin(set(steps))].reset_index(drop=True)

    # -- the one compatibility rule ---------------------------------------------------------------
    def _hint(self, col: str | None, have: Any) -> str:
        flag = self.spec.flags.get(col or "")
        use = f"pass {flag} {have} to use it, " if flag else "pass "
        return f"{use}--tag NAME to keep a separate table, or delete {self.path} to recompute it"

    def check(self, settings: Mapping[str, Any], expected: pd.DataFrame | None = None,
              sets: Mapping[str, Iterable[Any]] | None = None) -> None:
        """Refuse to mix rows computed with other settings into this table.

        settings: the request's value of every table-wide settings column; expected: the request's keys
        with their per-row settings; sets: the request's set of values of each same_set column.
        """
        df = self.df
        if df is None or df.empty:
            return
        for col in self.spec.settings:
            want = settings[col]
            have = list(dict.fromkeys(df[col].tolist()))
            if have != [want]:
                shown = ",".join(str(h) for h in have)
                raise CsnError(f"{self.path} holds {col}={shown} but this request asks for {col}={want}; "
                               f"{self._hint(col, have[0])}.")
        for col, want_set in (sets or {}).items():
            have = list(dict.fromkeys(df[col].tolist()))
            want = list(dict.fromkeys(want_set))
            if set(have) != set(want):
                raise CsnError(f"{self.path} holds {col} {', '.join(map(str, have))} but this request reads "
                               f"{', '.join(map(str, want))}; {self._hint(None, None)}.")
        if expected is None or expected.empty or not self.spec.row_settings:
            return
        for col in self.spec.row_settings:
            scope = list(self.spec.row_scope.get(col, self.spec.key))
            both = df[scope + [col]].drop_duplicates(scope).merge(
                expected[scope + [col]].drop_duplicates(scope), on=scope, suffixes=("", "__want"))
            want = both[f"{col}__want"]
            bad = both[want.notna() & (both[col] != want)]
            if not bad.empty:
                r = bad.iloc[0]
                shown = scope if col in self.spec.row_scope else [
                    k for k in scope if k in (self.spec.step, "measure", "stage", "comparison")]
                where = ", ".join(f"{k} {r[k]}" for k in shown)
                label = self.spec.labels.get(col, f"{col}={{}}")
                raise CsnError(f"{self.path} holds {where} with {label.format(_plain(r[col]))}, but this request asks "
                               f"for {_plain(r[col + '__want'])}; {self._hint(col, _plain(r[col]))}.")

    # -- what is left, and writing -----------------------------------------------------------------
    def missing(self, expected: pd.DataFrame) -> pd.DataFrame:
        """The rows of `expected` (key columns, maybe more) whose key is not in the table yet."""
        if self.df is None or self.df.empty or expected.empty:
            return expected.reset_index(drop=True)
        key = list(self.spec.key)
        have = self.df[key].drop_duplicates()
        m = expected.merge(have, on=key, how="left", indicator=True)
        return expected[(m["_merge"] == "left_only").to_numpy()].reset_index(drop=True)

    def add(self, rows: pd.DataFrame) -> None:
        """Add rows (replacing table rows with the same key, or replace_by columns) and rewrite the table
        atomically, ordered by step."""
        rows = self.spec.frame(rows)
        if self.df is not None and not self.df.empty:
            key = list(self.spec.replace_by or self.spec.key)
            m = self.df[key].merge(rows[key].drop_duplicates(), on=key, how="left", indicator=True)
            keep = self.df[(m["_merge"] == "left_only").to_numpy()]
            rows = pd.concat([keep, rows], ignore_index=True) if not keep.empty else rows
        self.df = rows.sort_values(self.spec.step, kind="stable").reset_index(drop=True)
        self.run.write(self.name, self.df)

    def rows(self, steps: Iterable[int] | None = None) -> pd.DataFrame:
        """The table's rows (of the given checkpoint steps), in table order; an empty frame if none."""
        if self.df is None:
            return self.spec.frame()
        df = self.df if steps is None else self.df[self.df[self.spec.step].isin(set(steps))]
        return df.reset_index(drop=True)


def _plain(v: Any) -> Any:
    """numpy scalars as plain Python values for messages."""
    return v.item() if hasattr(v, "item") else v


__all__ = ["TableSpec", "ResumableTable", "tagged", "PROVENANCE", "NOT_FROM_CHECKPOINTS"]
