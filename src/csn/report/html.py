"""The report: one self-contained HTML page over the tables of one run, several runs, or an experiment.

`build_report(paths)` discovers the runs (directories holding run.json), groups them into conditions
by name (`<condition>-s<seed>`; a run named otherwise is its own group), draws every figure its
tables support with the figure modules (csn.report.fig_*), and writes `report/index.html` with the
PNGs beside it, referenced by relative path: the page opens from disk, offline, with nothing fetched
from the network (no scripts, no CDN, no web fonts; the CSS is inline). The report reads tables; it
never runs a model. A section whose tables do not exist is replaced by a one-line note saying which
command makes them.

This module keeps the page: runs, claims, the template and the order of the sections. What each section shows is
its own module in csn.report.sections, registered there (csn.report.page.section); the page lays out every
registered section and knows no analysis or experiment.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from csn._version import __version__
from csn.core.progress import bar
from csn.errors import CsnError
from csn.experiments.claims import THRESHOLDS
from csn.report.page import Page, RunGroup, Section, note_item, page_sections
from csn.report.sections.training import training_figure
from csn.runs.io import write_text
from csn.runs.lock import lock_owner
from csn.runs.naming import condition_order, parse_run_name
from csn.runs.run import Run, run_dirs

TEMPLATE = "report.html"
"""The jinja2 template (src/csn/report/templates/report.html)."""

VERDICT_CLASS = {"reproduced": "ok", "not reproduced": "bad", "inconclusive": "warn"}


# ------------------------------------------------------------------------------------------------
# discovering and grouping runs
# ------------------------------------------------------------------------------------------------

def discover_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Run], Path | None]:
    """Runs under `paths` (a run directory, or a directory whose sub-directories are runs) and the
    experiment directory (the first path that is a directory of runs), if any."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise CsnError("give at least one run or experiment directory, e.g. `csn report runs/fmnist`.")
    runs: list[Run] = []
    experiment: Path | None = None
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise CsnError(f"{p} does not exist; pass a run directory (with run.json) or an experiment directory holding runs.")
        if not p.is_dir():
            raise CsnError(f"{p} is not a directory; pass a run directory (with run.json) or an experiment directory holding runs.")
        found = run_dirs(p)
        if found != [p]:
            if not found:
                raise CsnError(f"{p} holds no csn run (no run.json in it or in its sub-directories); pass a run "
                               "directory written by `csn train` or an experiment directory holding such runs.")
            if experiment is None:
                experiment = p
        for d in found:
            key = d.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(Run(d))
    return runs, experiment


def _being_written(runs: Sequence[Run], log: Callable[[str], None]) -> list[Section]:
    """Runs whose writer lock another csn process holds (training, or an analysis adding rows): one note each on
    stderr, and a section at the top of the page saying that their tables are read as they are now."""
    notes = []
    for run in runs:
        owner = lock_owner(run.path)
        if owner is not None:
            text = (f"{run.path} is being written by another csn process (pid {owner[0]}: {owner[1]}); this page shows "
                    "its tables as they are now, and a table being written may be partial: run `csn report` again "
                    "when it has finished.")
            log(f"note: {text}")
            notes.append(note_item(text))
    return [Section("writing", "Runs being written", items=notes)] if notes else []


def group_runs(runs: Sequence[Run]) -> list[RunGroup]:
    """Conditions from run names `<condition>-s<seed>` (baseline first, then reg-from-X by onset, then by name).

    Runs that share a name but live in different directories get their parent's name as a prefix, so
    no two runs are confused.
    """
    names = [r.name for r in runs]
    groups: dict[str, RunGroup] = {}
    for run in runs:
        label = run.name if names.count(run.name) == 1 else f"{run.path.parent.name}/{run.name}"
        cond, seed = parse_run_name(label)
        if seed is None:
            seed = run.info.get("seed")
        g = groups.setdefault(cond, RunGroup(cond))
        g.runs.append(run)
        g.seeds.append(seed)
    for g in groups.values():
        order = sorted(range(len(g.runs)), key=lambda i: (g.seeds[i] is None, g.seeds[i] or 0, g.runs[i].name))
        g.runs = [g.runs[i] for i in order]
        g.seeds = [g.seeds[i] for i in order]
    return [groups[k] for k in sorted(groups, key=condition_order)]


def default_out(paths: Sequence[str | os.PathLike]) -> Path:
    """<dir>/report for one path; the first path's parent /report for several."""
    first = Path(paths[0])
    return (first if len(paths) == 1 else first.resolve().parent) / "report"


# ------------------------------------------------------------------------------------------------
# claims
# ------------------------------------------------------------------------------------------------

def _claim_dicts(claims) -> list[dict]:
    out = []
    for v in claims or []:
        d = v.to_dict() if hasattr(v, "to_dict") else dict(v)
        d = {k: ("" if d.get(k) is None else str(d.get(k))) for k in ("claim", "verdict", "statistic", "rule", "observed")}
        d["cls"] = VERDICT_CLASS.get(d["verdict"].strip().lower(), "neutral")
        out.append(d)
    return out


def load_claims(experiment: Path | None) -> tuple[list[dict] | None, dict | None, Path | None]:
    """Claims and thresholds from <experiment>/claims.json ({"claims": [...], "thresholds": {...}} or a list)."""
    if experiment is None or not (experiment / "claims.json").is_file():
        return None, None, None
    path = experiment / "claims.json"
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError, RecursionError):
        raise CsnError(f"{path} is unreadable or corrupt; delete it and re-run `csn reproduce --resume` to rewrite it.") from None
    if isinstance(obj, list):
        return obj, None, path
    if not isinstance(obj, dict) or not isinstance(obj.get("claims", obj.get("verdicts")), list):
        raise CsnError(f"{path} holds no list of claims; delete it and re-run `csn reproduce --resume` to rewrite it.")
    return obj.get("claims", obj.get("verdicts")), obj.get("thresholds"), path


# ------------------------------------------------------------------------------------------------
# the page
# ------------------------------------------------------------------------------------------------

def _template():
    env = jinja2.Environment(loader=jinja2.PackageLoader("csn.report", "templates"),
                             autoescape=jinja2.select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["code"] = _code_spans
    return env.get_template(TEMPLATE)


def _code_spans(text: str):
    """Escape text, then show `backticked` commands as <code> (for the notes that name a command)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


def _resolve_out(paths: Sequence, out: str | os.PathLike | None) -> Path:
    if out is None:
        return default_out(paths) / "index.html"
    out = Path(out)
    if out.suffix.lower() in (".html", ".htm"):
        return out
    return out / "index.html"


def _thresholds(claim_rows: list[dict], thresholds: dict | None) -> dict | None:
    """The thresholds printed with the claims: the given ones (else csn's when there are claims), in declaration order."""
    if claim_rows and thresholds is None:
        thresholds = dict(THRESHOLDS)
    if thresholds:  # declaration order (claims.json sorts its keys), unknown keys last
        rank = {k: i for i, k in enumerate(THRESHOLDS)}
        thresholds = dict(sorted(thresholds.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
    return thresholds


def _sections(rep: Page, progress: bool) -> list[Section]:
    """Every section the tables support, in page order (the registered sections, csn.report.page; a progress bar
    over them)."""
    sections: list[Section] = []
    pbar = bar(page_sections(), desc="report", unit="section", progress=progress, file=sys.stderr)
    for entry in pbar:
        pbar.set_postfix_str(entry.name)
        sec = entry.build(rep)
        if sec is not None:
            sections.append(sec)
    return sections


def _title(paths: list, runs: list[Run], experiment: Path | None) -> str:
    if experiment is not None and len(paths) == 1:
        return f"csn report: {experiment.name}"
    if len(runs) == 1:
        return f"csn report: {runs[0].name}"
    return f"csn report: {len(runs)} runs"


def build_report(paths: Sequence[str | os.PathLike] | str | os.PathLike, *, out: str | os.PathLike | None = None,
                 claims: Sequence | None = None, title: str | None = None, thresholds: dict | None = None,
                 progress: bool = True) -> Path:
    """Write one self-contained HTML report over runs and return the path of its index.html.

    paths: one run directory, several, or an experiment directory (run directories inside it, maybe
    claims.json and regularize.parquet beside them). out: the page's path (``*.html``) or the
    folder to write index.html and the figures into [default: <path>/report, or for several paths
    the first's parent /report]. claims: Verdicts (or their dicts) for the claims table [default:
    the experiment's claims.json, when present]; thresholds: the rules' thresholds to print with it
    [default: claims.json's, else csn.experiments.claims.THRESHOLDS].
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    runs, experiment = discover_runs(paths)
    writing = _being_written(runs, lambda msg: print(msg, file=sys.stderr, flush=True))
    index = _resolve_out(paths, out)
    out_dir = index.parent
    if out_dir.exists() and not out_dir.is_dir():
        raise CsnError(f"{out_dir} exists and is not a directory; choose another --out.")
    conds = group_runs(runs)
    # claims: given, else claims.json of the experiment (read before anything is written)
    claims_src = None
    if claims is None:
        claims, file_thr, claims_src = load_claims(experiment)
        thresholds = file_thr if thresholds is None else thresholds
    claim_rows = _claim_dicts(claims)
    thresholds = _thresholds(claim_rows, thresholds)
    with _whole_page_or_nothing(out_dir):
        rep = Page(out_dir, conds, experiment, lambda msg: print(msg, file=sys.stderr, flush=True))
        sections = writing + _sections(rep, progress)
        html = _template().render(
            title=title or _title(paths, runs, experiment),
            generated=_dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
            csn_version=__version__,
            sources=[str(Path(p)) for p in paths],
            n_runs=len(runs), conditions=[{"name": c.name, "n": len(c.runs)} for c in conds],
            claims=claim_rows, claims_source=(claims_src.name if claims_src else None),
            thresholds=[(k, v) for k, v in (thresholds or {}).items()],
            sections=sections, omitted=rep.omitted,
        )
        write_text(index, html)
    return index


@contextlib.contextmanager
def _whole_page_or_nothing(out_dir: Path):
    """Make out_dir and check at once that it can be written; if the page is not finished (a full disk, Ctrl-C),
    remove the figures this attempt added (and out_dir if it made it), so no half page is left behind."""
    existed = out_dir.is_dir()
    before = set(out_dir.iterdir()) if existed else set()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd, probe = tempfile.mkstemp(prefix=".csn-write-test.", dir=out_dir)  # no permission: one error, now
        os.close(fd)
        os.unlink(probe)
        yield
    except BaseException:
        for p in set(out_dir.iterdir()) - before:
            if p.suffix in (".png", ".svg") and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
        if not existed:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only when empty
        raise


__all__ = ["build_report", "discover_runs", "group_runs", "default_out", "load_claims", "training_figure", "RunGroup",
           "Section", "Page", "TEMPLATE"]
