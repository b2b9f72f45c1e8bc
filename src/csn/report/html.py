"""The report: one self-contained HTML page over the tables of one run, several runs, or an experiment.

`build_report(paths)` discovers the runs (directories holding run.json), groups them into conditions
by name (`<condition>-s<seed>`; a run named otherwise is its own group), draws every figure its
tables support with the figure modules (csn.report.fig_*), and writes `report/index.html` with the
PNGs beside it, referenced by relative path: the page opens from disk, offline, with nothing fetched
from the network (no scripts, no CDN, no web fonts; the CSS is inline). The report reads tables; it
never runs a model. A section whose tables do not exist is replaced by a one-line note saying which
command makes them.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup, escape
from matplotlib.patches import Patch

from csn._version import __version__
from csn.analysis.ablation import summarize_ablation
from csn.analysis.cka import summarize_cka_runs
from csn.analysis.linearity import summarize_linearity
from csn.analysis.selectivity import stage_peaks, summarize, summarize_across_runs
from csn.core.progress import bar
from csn.core.resources import is_write_refused
from csn.core.stats import band, standard_error
from csn.errors import CsnError
from csn.experiments.claims import THRESHOLDS
from csn.experiments.regime import read_regime
from csn.experiments.regularize import condition_curves, regularized_stages
from csn.experiments.windows import gap_curves, read_map, trajectories
from csn.report import fig_ablation as fa
from csn.report import fig_cka as fc
from csn.report import fig_linearity as fl
from csn.report import fig_selectivity as fs
from csn.report import style
from csn.report.fig_regime import regime_figure
from csn.report.fig_regularize import regularize_figures
from csn.report.fig_windows import windows_figures
from csn.runs.io import atomic_path, read_table, write_text
from csn.runs.lock import lock_owner
from csn.runs.naming import condition_order, onset_of, parse_run_name
from csn.runs.run import Run

TEMPLATE = "report.html"
"""The jinja2 template (src/csn/report/templates/report.html)."""

VERDICT_CLASS = {"reproduced": "ok", "not reproduced": "bad", "inconclusive": "warn"}


# ------------------------------------------------------------------------------------------------
# discovering and grouping runs
# ------------------------------------------------------------------------------------------------

@dataclass
class RunGroup:
    """A condition: a group of runs that differ only by seed (one condition of an experiment, or a lone run)."""

    name: str
    runs: list[Run] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)

    @property
    def slug(self) -> str:
        return _slug(self.name)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "run"


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
        if (p / "run.json").is_file():
            found = [p]
        else:
            found = sorted(d for d in p.iterdir() if d.is_dir() and (d / "run.json").is_file())
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
            notes.append(_note(text))
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
# small formatting helpers
# ------------------------------------------------------------------------------------------------

def _isnum(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(float(x))


def _f(x, nd: int = 3) -> str:
    return f"{float(x):.{nd}f}" if _isnum(x) else "–"


def _pm(mean, se, nd: int = 3) -> str:
    return _f(mean, nd) + (f" ± {_f(se, nd)}" if _isnum(se) else "")


def _g(x) -> str:
    return f"{float(x):g}" if _isnum(x) else "–"


def _mean(v: Iterable[float]) -> float:
    a = np.asarray([x for x in v if _isnum(x)], dtype=float)
    return float(a.mean()) if len(a) else float("nan")


def _steps_text(steps: Sequence[int], limit: int = 14) -> str:
    steps = [int(s) for s in steps]
    if len(steps) <= limit:
        return ", ".join(map(str, steps))
    return ", ".join(map(str, steps[: limit - 3])) + f", … ({len(steps) - limit + 1} more) …, " + \
        ", ".join(map(str, steps[-2:]))


def _epochs_text(epochs: Sequence[float], limit: int = 10) -> str:
    eps = [f"{float(e):.4g}" for e in epochs]
    return ", ".join(eps) if len(eps) <= limit else ", ".join(eps[: limit - 2]) + f", … ({len(eps) - limit + 2} more)"


def _table(columns: Sequence[str], rows: Sequence[Sequence], caption: str = "", *, numeric: Sequence[int] = (),
           cls: str = "") -> dict:
    """A table item for the template: cells are strings (None shows as a dash), `numeric` columns are right-aligned."""
    return {"kind": "table", "columns": list(columns), "rows": [[("–" if c is None or c == "" else str(c)) for c in r] for r in rows],
            "caption": caption, "numeric": set(numeric), "cls": cls}


def _note(text: str) -> dict:
    return {"kind": "note", "text": text}


def _para(text: str) -> dict:
    return {"kind": "p", "text": text}


def _sub(text: str) -> dict:
    return {"kind": "h3", "text": text}


def _details(summary: str, items: list[dict]) -> dict:
    return {"kind": "details", "summary": summary, "items": items}


# ------------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------------

@dataclass
class Section:
    """One section of the page: an id (anchor), a title, a lead sentence and items (figures, tables, notes)."""

    id: str
    title: str
    lead: str = ""
    items: list[dict] = field(default_factory=list)


class _Report:
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
            return [_note(f"{what} could not be drawn: {msg} ({type(e).__name__}).")]
        figs = res if isinstance(res, list) else [res]
        return [self.fig_item(f) for f in figs if f is not None]

    def omit(self, title: str, text: str) -> None:
        self.omitted.append({"title": title, "text": text})

    def runs_with(self, name: str) -> list[tuple[RunGroup, list[Run]]]:
        out = []
        for c in self.conds:
            rs = [r for r in c.runs if self.table(r, name) is not None]
            if rs:
                out.append((c, rs))
        return out


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------

def _join(values: Iterable) -> str:
    vals = list(dict.fromkeys("–" if v is None or v == "" else str(v) for v in values))
    return ", ".join(vals)


def _reg_text(cfg: dict) -> str:
    if cfg.get("reg_schedule"):
        return f"schedule {cfg['reg_schedule']!r}"
    if cfg.get("reg_alpha"):
        layers = cfg.get("reg_layers")
        return (f"alpha {cfg['reg_alpha']:g} over epochs {cfg.get('reg_window') or 'all'}"
                f"{'; layers ' + ', '.join(layers) if layers else '; every stage but the last'}")
    return "none"


def _config_rows(cond: RunGroup) -> list[tuple[str, str]]:
    infos = [r.info for r in cond.runs]
    cfgs = [i.get("config", {}) for i in infos]
    data = [i.get("data", {}) for i in infos]

    def each(fn) -> str:
        out = []
        for i, c, d in zip(infos, cfgs, data):
            try:
                out.append(fn(i, c, d))
            except (KeyError, TypeError, ValueError):
                out.append(None)
        return _join(out)

    ck = [i.get("checkpoint_steps") or [] for i in infos]
    ck_text = _steps_text(ck[0]) if all(c == ck[0] for c in ck) else "differs between seeds"
    return [
        ("runs", ", ".join(r.name for r in cond.runs)),
        ("seeds", _join(cond.seeds)),
        ("dataset", each(lambda i, c, d: f"{d['name']} ({d['num_train']} train / {d['num_test']} test, "
                                         f"{d['num_classes']} classes)")),
        ("model", each(lambda i, c, d: f"{c['model']} (width {c.get('width', 1)})")),
        ("training", each(lambda i, c, d: f"{c['epochs']:g} epochs × {i['steps_per_epoch']} steps/epoch "
                                          f"= {i.get('total_steps', '?')} steps, batch {c['batch_size']}")),
        ("optimizer", each(lambda i, c, d: f"SGD lr {c['lr']:g} ({c.get('lr_schedule', '?')}"
                                           f"{', warm-up ' + format(c['warmup_epochs'], 'g') + ' ep' if c.get('warmup_epochs') else ''}), "
                                           f"momentum {c.get('momentum', 0):g}, weight decay {c.get('weight_decay', 0):g}")),
        ("augmentation", each(lambda i, c, d: c.get("augment", "–"))),
        ("regularizer", each(lambda i, c, d: _reg_text(c))),
        ("checkpoint schedule", each(lambda i, c, d: c.get("checkpoints"))),
        ("checkpoint steps", f"{len(ck[0])}: {ck_text}" if ck and ck[0] else "–"),
        ("device", each(lambda i, c, d: f"{i.get('device', '?')}" + (f" × {i['world_size']}" if i.get("world_size", 1) > 1 else ""))),
        ("versions", each(lambda i, c, d: f"csn {i.get('csn_version', '?')}, torch {i.get('torch_version', '?')}, "
                                          f"python {i.get('python', '?')}")),
    ]


def _bn_lines(rep: _Report) -> list[str]:
    """Per analysis table: at which checkpoints BatchNorm statistics were re-estimated (recorded per row)."""
    lines = []
    for name, what in (("selectivity", "selectivity"), ("ablation", "ablation"), ("linearity", "linearity"), ("cka", "CKA")):
        descs: dict[str, list[str]] = {}
        for run in rep.runs:
            df = rep.table(run, name)
            if df is None or "bn_recalibrated" not in df.columns:
                continue
            step_col, ep_col = ("step_a", "epoch_a") if name == "cka" else ("step", "epoch")
            if step_col not in df.columns:
                continue
            per = df.groupby(step_col).agg(bn=("bn_recalibrated", "max"),
                                           epoch=(ep_col, "first") if ep_col in df.columns else ("bn_recalibrated", "size"))
            on = per[per["bn"] > 0]
            if on.empty:
                d = f"off at all {len(per)} checkpoints (stored running statistics)"
            else:
                batches = _join(int(b) for b in sorted(on["bn"].unique()))
                d = (f"re-estimated from {batches} training batches at {len(on)} of {len(per)} checkpoints "
                     f"(steps {_steps_text(on.index.tolist())}; epochs {_epochs_text(on['epoch'].tolist())})"
                     + (", stored running statistics at the others" if len(on) < len(per) else ""))
            descs.setdefault(d, []).append(run.name)
        n_with = sum(len(v) for v in descs.values())
        for d, names in descs.items():
            who = "all runs" if len(names) == n_with == len(rep.runs) and len(rep.runs) > 1 else \
                ("" if len(rep.runs) == 1 else ", ".join(names))
            lines.append(f"{what}: BatchNorm statistics {d}" + (f" [{who}]" if who else "") + ".")
    return lines


def config_section(rep: _Report, extra: list[dict]) -> Section:
    sec = Section("config", "Runs, configuration and versions",
                  "What was trained, how, and with which software; BatchNorm re-estimation as recorded in each "
                  "analysis table (early checkpoints' running statistics lag the weights, see SPEC).")
    rows_by_cond = [_config_rows(c) for c in rep.conds]
    fields = [k for k, _ in rows_by_cond[0]]
    rows = [[f] + [dict(r)[f] for r in rows_by_cond] for f in fields]
    sec.items.append(_table(["", *[c.name for c in rep.conds]], rows,
                            "Configuration per condition (values that differ between seeds are listed together)."))
    bn = _bn_lines(rep)
    if bn:
        sec.items.append({"kind": "list", "title": "BatchNorm statistics re-estimation", "entries": bn})
    sec.items.extend(extra)
    return sec


# ------------------------------------------------------------------------------------------------
# training curves (drawn here)
# ------------------------------------------------------------------------------------------------

def _acc_series(run: Run) -> pd.Series:
    ck = run.checkpoints
    return pd.Series([c.metrics.get("test_acc") for c in ck], index=[round(c.epoch, 6) for c in ck], dtype=float)


def _loss_series(run: Run, tr: pd.DataFrame | None) -> pd.Series:
    if tr is not None and {"epoch", "train_loss"} <= set(tr.columns):
        d = tr.dropna(subset=["train_loss"])
        return pd.Series(d["train_loss"].to_numpy(float), index=d["epoch"].round(6).to_numpy(float)).groupby(level=0).mean()
    ck = [c for c in run.checkpoints if "train_loss" in c.metrics]
    return pd.Series([c.metrics["train_loss"] for c in ck], index=[round(c.epoch, 6) for c in ck], dtype=float)


def training_figure(rep_conds: list[RunGroup], out_dir: str | Path, *, tables: Callable[[Run], pd.DataFrame | None],
                    name: str = "training", log_epochs: bool = True):
    """Test accuracy (checkpoints) and training loss (logged) vs epoch, one colour per condition, ±1 SE over seeds."""
    fig, axes = style.new(ncols=2)
    ax_acc, ax_loss = axes[0]
    all_epochs: list[float] = []
    multi_seed = False
    subset = False
    for i, cond in enumerate(rep_conds):
        color = style.COND_COLORS[i % len(style.COND_COLORS)]
        label = cond.name + (f" ({len(cond.runs)} seeds)" if len(cond.runs) > 1 else "")
        multi_seed |= len(cond.runs) > 1
        for run in cond.runs:
            ns = [c.metrics.get("test_samples") for c in run.checkpoints if c.metrics.get("test_samples")]
            subset |= len(set(ns)) > 1
        for ax, b in ((ax_acc, band([_acc_series(r) for r in cond.runs])),
                      (ax_loss, band([_loss_series(r, tables(r)) for r in cond.runs]))):
            if b is None:
                continue
            x = b.index.to_numpy(dtype=float)
            all_epochs.extend(x.tolist())
            ax.plot(x, b["mean"], color=color, lw=1.5, marker="o" if ax is ax_acc else None, ms=3, label=label)
            if len(cond.runs) > 1:
                se = b["se"].fillna(0).to_numpy(float)
                ax.fill_between(x, b["mean"] - se, b["mean"] + se, color=color, alpha=0.18, lw=0)
    for ax, ylabel, title in ((ax_acc, "test accuracy (top-1)", "Test accuracy at checkpoints"),
                              (ax_loss, "training loss (running mean)", "Training loss")):
        style.epoch_axis(ax, log_epochs, sorted(set(all_epochs)))
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
    handles, _ = ax_acc.get_legend_handles_labels()
    if multi_seed:
        handles.append(Patch(facecolor="0.5", alpha=0.25, label="±1 SE over seeds"))
    if handles:
        ax_acc.legend(handles=handles, fontsize=8, loc="best")
    cap = ("Test accuracy at every checkpoint and the training loss as logged, versus epoch"
           f"{' (symlog axis, so initialization and the first steps stay visible)' if log_epochs else ''}"
           f"{'; one colour per condition, bands ±1 SE over seeds' if multi_seed else ''}"
           f"{'; intermediate checkpoints are scored on a fixed subset of the test split, the last on all of it' if subset else ''}.")
    return style.save(fig, out_dir, name, cap)


def training_section(rep: _Report) -> Section:
    sec = Section("training", "Training", "How each condition trained: accuracy and loss across the dense early checkpoints.")
    sec.items += rep.draw("the training curves", lambda: training_figure(rep.conds, rep.out_dir,
                                                                       tables=lambda r: rep.table(r, "training")))
    rows = []
    for c in rep.conds:
        finals = [r.checkpoints[-1] if r.checkpoints else None for r in c.runs]
        acc = [f.metrics.get("test_acc") if f else None for f in finals]
        best = [max((k.metrics.get("test_acc", float("nan")) for k in r.checkpoints), default=float("nan")) for r in c.runs]
        ep = _join(_g(f.epoch) if f else None for f in finals)
        loss = []
        for r in c.runs:
            s = _loss_series(r, rep.table(r, "training"))
            loss.append(float(s.iloc[-1]) if len(s) else None)
        rows.append([c.name, len(c.runs), ep, _pm(_mean(acc), standard_error(acc), 4), _join(_f(a, 4) for a in acc),
                     _f(_mean(best), 4), _f(_mean(loss), 4), _join(len(r.checkpoints) for r in c.runs)])
    sec.items.append(_table(["condition", "seeds", "final epoch", "final test acc (mean ± SE)", "per seed",
                             "best test acc (mean)", "final train loss", "checkpoints"], rows,
                            "Final test accuracy per condition (the last checkpoint is scored on the whole test split).",
                            numeric=(1, 3, 5, 6)))
    return sec


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
# selectivity
# ------------------------------------------------------------------------------------------------

def selectivity_section(rep: _Report) -> Section | None:
    have = rep.runs_with("selectivity")
    if not have:
        rep.omit("Class selectivity", "no selectivity table: run `csn selectivity RUN`.")
        return None
    sec = Section("selectivity", "Class selectivity (C1)",
                  "Mean class selectivity index (CSI) of each stage's units versus epoch, with the offset-invariant "
                  "class information η² beside it; the study's claim C1: selectivity rises in the first epochs, then "
                  "recedes, but not to its initial level.")
    rows = []
    for cond, runs in have:
        tables = {r.name: rep.table(r, "selectivity") for r in runs}
        if rep.multi or len(have) > 1:
            sec.items.append(_sub(f"{cond.name}" + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")))
        first = runs[0]
        t0 = tables[first.name]
        meta = []
        for col in ("split", "variant"):
            if col in t0.columns:
                meta.append(f"{col} {_join(t0[col].unique())}")
        n_units = int((t0["step"] == t0["step"].iloc[0]).sum())
        n_dead_last = int(t0[t0["step"] == t0["step"].max()]["dead"].astype(bool).sum()) if "dead" in t0 else 0
        sec.items.append(_para(f"{n_units} units in {t0['stage'].nunique()} stages, {t0['step'].nunique()} checkpoints; "
                               f"{'; '.join(meta)}; {n_dead_last} dead units at the last checkpoint of {first.name}."))
        figs: list[dict] = []
        if len(runs) > 1:
            figs += rep.draw(f"selectivity across seeds of {cond.name}",
                             lambda: fs.seeds_figures(tables, rep.out_dir, prefix=rep.prefix(cond, "selectivity_seeds"),
                                                      title=f"{cond.name}: {len(runs)} seeds"))
            items = rep.draw(f"CSI distribution of {first.name}",
                             lambda: fs.csi_distribution(t0, rep.out_dir, name=rep.prefix(cond, "selectivity_distribution"),
                                                         title=first.name))
            for it in items:
                if it["kind"] == "figure":
                    it["caption"] += f" (run {first.name}.)"
            figs += items
            try:
                summ = summarize_across_runs(tables)
            except Exception:
                summ = summarize(t0)
        else:
            figs += rep.draw(f"selectivity of {first.name}",
                             lambda: fs.selectivity_figures(t0, rep.out_dir, prefix=rep.prefix(cond, "selectivity"),
                                                            title=first.name if rep.multi else None))
            summ = summarize(t0)
        # the first condition's figures open; the others' folded (their numbers are in the table below)
        sec.items += figs if cond is have[0][0] else [_details(f"selectivity figures of {cond.name}", figs)]
        try:
            peaks = stage_peaks(summ)
            eta = stage_peaks(summ, "eta2").set_index("stage")
        except Exception:
            continue
        for p in peaks.itertuples():
            e = eta.loc[p.stage] if p.stage in eta.index else None
            rows.append([cond.name, p.stage, p.n_units, _f(p.init), f"{_f(p.peak)} (epoch {p.peak_epoch:.3g})",
                         _f(p.final), _f(e["init"]) if e is not None else "–", _f(e["final"]) if e is not None else "–"])
    if rows:
        sec.items.append(_table(["condition", "stage", "units", "CSI init", "CSI peak", "CSI final", "η² init", "η² final"],
                                rows, "Mean CSI per stage at initialization, at its peak and at the last checkpoint "
                                      "(mean over seeds at shared checkpoints where a condition has several).", numeric=(2, 3, 5, 6, 7)))
    return sec


# ------------------------------------------------------------------------------------------------
# ablation
# ------------------------------------------------------------------------------------------------

def ablation_section(rep: _Report) -> Section | None:
    have = rep.runs_with("ablation")
    if not have:
        rep.omit("Ablation", "no ablation table: run `csn ablate RUN`.")
        return None
    sec = Section("ablation", "Ablation: selective vs random units (C2)",
                  "Accuracy as the most class-selective units of every block of a stage are zeroed, against as many "
                  "random units (the control); claim C2: early in training the selective units matter more, later "
                  "the gap closes.")
    rows = []
    for cond, runs in have:
        if rep.multi or len(have) > 1:
            sec.items.append(_sub(cond.name + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")))
        for i, run in enumerate(runs):
            df = rep.table(run, "ablation")
            pre = rep.prefix(cond, "ablation") + (f"_{_slug(run.name)}" if len(runs) > 1 else "")
            title = run.name if (rep.multi or len(runs) > 1) else None
            figs = rep.draw(f"ablation curves of {run.name}",
                            lambda: fa.ablation_curves(df, rep.out_dir, name=f"{pre}_curves", title=title))
            figs += rep.draw(f"ablation areas of {run.name}",
                             lambda: fa.ablation_areas(df, rep.out_dir, name=f"{pre}_area", title=title))
            sec.items += figs if i == 0 else [_details(f"figures of {run.name}", figs)]
        gaps = []
        for run in runs:
            try:
                g = summarize_ablation(rep.table(run, "ablation")).gaps
            except Exception:
                continue
            gaps.append(g.assign(_run=run.name))
        if not gaps:
            continue
        g = pd.concat(gaps, ignore_index=True)
        if "epoch" not in g.columns:
            g["epoch"] = np.nan
        for (stage, step), d in g.groupby(["stage", "step"], sort=False):
            n = d["_run"].nunique()
            se = standard_error(d["gap"]) if n > 1 else _mean(d["gap_se"])
            rows.append([cond.name, stage, int(step), _g(_mean(d["epoch"])), _f(_mean(d["selective_area"])),
                         _f(_mean(d["random_area"])), _f(_mean(d["least_area"])), _pm(_mean(d["gap"]), se), n])
    if rows:
        cond_rank = {c.name: i for i, c in enumerate(rep.conds)}
        rows.sort(key=lambda r: (cond_rank.get(r[0], 0), str(r[1]), r[2]))
        sec.items.append(_table(["condition", "stage", "step", "epoch", "selective area", "random area", "least area",
                                 "gap (selective − random)", "seeds"], rows,
                                "Area under normalized top-1 vs fraction ablated (mean over seeds); the gap's ± is the SE "
                                "over seeds, or over random draws for one seed. Negative: selective units matter more.",
                                numeric=(2, 3, 4, 5, 6, 7, 8)))
    return sec


# ------------------------------------------------------------------------------------------------
# linearity
# ------------------------------------------------------------------------------------------------

def linearity_section(rep: _Report) -> Section | None:
    have = rep.runs_with("linearity")
    if not have:
        rep.omit("Linearity", "no linearity table: run `csn linearity RUN`.")
        return None
    sec = Section("linearity", "Linearity (C3)",
                  "How close the network is to a linear model at each checkpoint: agreement with a linear classifier "
                  "on the inputs, with the network linearized around initialization, and ReLU on/off pattern "
                  "stability; claim C3: high early, falling as training goes on.")
    if len(have) == 1:
        cond, runs = have[0]
        arg = rep.table(runs[0], "linearity") if len(runs) == 1 else {r.name: rep.table(r, "linearity") for r in runs}
    else:
        arg = {c.name: {r.name: rep.table(r, "linearity") for r in rs} for c, rs in have}
    sec.items += rep.draw("the linearity figure", lambda: fl.linearity_figures(arg, rep.out_dir, prefix="linearity"))
    rows = []
    order = ["acc", "linear_agreement", "linearized_agreement_init", "linearized_rel_dist_init", "relu_same_as_init",
             "linearized_agreement_prev", "relu_same_as_prev", "mu_y_bits"]
    for cond, runs in have:
        try:
            s = summarize_linearity({r.name: rep.table(r, "linearity") for r in runs})
        except Exception:
            continue
        for m in [m for m in order if m in set(s["measure"])]:
            d = s[s["measure"] == m].sort_values("step")
            v = d["mean"].to_numpy(float)
            ok = np.isfinite(v)
            if not ok.any():
                continue
            first = d[ok].iloc[0]
            last = d.iloc[-1]
            hi = d[ok].iloc[int(np.nanargmax(v[ok]))]
            rows.append([cond.name, m, f"{_f(first['mean'])} (epoch {first['epoch']:.3g})",
                         f"{_f(hi['mean'])} (epoch {hi['epoch']:.3g})", _pm(last["mean"], last["se"]),
                         int(d["n_runs"].max())])
    if rows:
        sec.items.append(_table(["condition", "measure", "first defined", "max", "last (± SE over seeds)", "seeds"], rows,
                                "Linearity measures at the first checkpoint where they are defined, at their maximum, and "
                                "at the last checkpoint (mean over seeds).", numeric=(5,)))
    return sec


# ------------------------------------------------------------------------------------------------
# regularization
# ------------------------------------------------------------------------------------------------

def _onset(cond: RunGroup) -> float | None:
    onset = onset_of(cond.name)
    if onset is not None:
        return onset
    cfg = cond.runs[0].config
    if cfg.reg_alpha and cfg.reg_window:
        try:
            return float(str(cfg.reg_window).split(":")[0])
        except ValueError:
            return None
    return None


def _is_regularized(cond: RunGroup) -> bool:
    cfg = cond.runs[0].config
    return bool(cfg.reg_alpha or cfg.reg_schedule)


def regularization_section(rep: _Report) -> Section | None:
    reg_table = None
    if rep.experiment is not None and (rep.experiment / "regularize.parquet").is_file():
        reg_table = read_table(rep.experiment / "regularize.parquet")
    elif rep.experiment is not None and (rep.experiment / "windows.parquet").is_file():
        return None  # a critical-period map: its windows are shown in "How early is early"
    if not any(_is_regularized(c) for c in rep.conds) and reg_table is None:
        rep.omit("Regularization", "no regularized runs: run `csn experiment regularize --preset fmnist --alpha -2 "
                                   "--onsets 0,1` (or `csn reproduce`).")
        return None
    sec = Section("regularization", "Suppressing selectivity: regularization onsets (C4)",
                  "The selectivity regularizer (loss = cross-entropy − α·R, α < 0 suppresses) switched on at different "
                  "onsets, same seeds; claim C4: suppressing selectivity from the start harms the final accuracy, "
                  "switching it on later costs little.")
    by_cond = {c.name: c.runs for c in rep.conds}
    onsets = {c.name: _onset(c) for c in rep.conds}
    reg = next((c for c in rep.conds if _is_regularized(c)), rep.conds[0])
    try:
        stages = regularized_stages(reg.runs[0])
    except CsnError:  # a model without declared stages: every layer read
        stages = []
    figs = rep.draw("the regularization figures",
                    lambda: regularize_figures(condition_curves(by_cond, stages), onsets, rep.out_dir, stages=stages))
    if any(it["kind"] == "note" for it in figs) and rep.experiment is not None:
        figs += _existing_figures(rep, ["regularize_accuracy", "regularize_selectivity"])
    sec.items += figs
    if reg_table is not None and len(reg_table):
        rows = []
        for r in reg_table.to_dict("records"):
            rows.append([r.get("condition"), _g(r.get("onset")) if _isnum(r.get("onset")) else "–", _g(r.get("alpha")),
                         r.get("seeds"), _pm(r.get("final_test_acc_mean"), r.get("final_test_acc_se"), 4),
                         r.get("final_test_acc_per_seed", ""), _pm(r.get("final_csi_mean"), r.get("final_csi_se")),
                         _pm(r.get("final_eta2_mean"), r.get("final_eta2_se"))])
        sec.items.append(_table(["condition", "onset (epoch)", "alpha", "seeds", "final test acc", "per seed",
                                 "final CSI (regularized stages)", "final η² (regularized stages)"], rows,
                                f"Per condition, mean ± SE over seeds, as written by the experiment "
                                f"({rep.experiment.name}/regularize.parquet).", numeric=(1, 2, 3, 4, 6, 7)))
    else:
        rows = []
        for c in rep.conds:
            acc = [r.checkpoints[-1].metrics.get("test_acc") for r in c.runs if r.checkpoints]
            csi, eta = [], []
            for r in c.runs:
                sel = rep.table(r, "selectivity")
                if sel is not None:
                    fin = sel[sel["step"] == sel["step"].max()]
                    part = fin[fin["stage"].isin(stages)] if stages else fin
                    csi.append(float(part["csi"].mean()))
                    eta.append(float(part["eta2"].mean()) if "eta2" in part else float("nan"))
            rows.append([c.name, _g(onsets[c.name]) if onsets[c.name] is not None else "–",
                         _g(c.runs[0].config.reg_alpha) if _is_regularized(c) else "0", len(c.runs),
                         _pm(_mean(acc), standard_error(acc), 4), _join(_f(a, 4) for a in acc), _pm(_mean(csi), standard_error(csi)),
                         _pm(_mean(eta), standard_error(eta))])
        stage_txt = ", ".join(stages) if stages else "all stages"
        sec.items.append(_table(["condition", "onset (epoch)", "alpha", "seeds", "final test acc", "per seed",
                                 f"final CSI ({stage_txt})", f"final η² ({stage_txt})"], rows,
                                "Per condition, mean ± SE over seeds, from the runs' manifests and selectivity tables.",
                                numeric=(1, 2, 3, 4, 6, 7)))
    return sec


def _existing_figures(rep: _Report, names: Sequence[str]) -> list[dict]:
    """Figures an experiment already drew into <experiment>/report, copied beside the page when it lives elsewhere."""
    items = []
    src_dir = rep.experiment / "report"
    for n in names:
        png = src_dir / f"{n}.png"
        if not png.is_file() or png.stat().st_size == 0:
            continue
        dst = rep.out_dir / png.name
        if dst.resolve() != png.resolve():
            with atomic_path(dst) as tmp:
                shutil.copyfile(png, tmp)
        items.append({"kind": "figure", "src": rep.rel(dst), "svg": None,
                      "caption": f"{n.replace('_', ' ')} as drawn by the experiment."})
    return items


# ------------------------------------------------------------------------------------------------
# the critical-period map (csn experiment windows)
# ------------------------------------------------------------------------------------------------

def windows_section(rep: _Report) -> Section | None:
    """"How early is early": the map's verdicts, figures and per-condition table for a windows experiment; for
    another experiment (e.g. a reproduction), links to the maps found in it or beside it."""
    exp = rep.experiment
    title = "How early is early: the critical-period map"
    lead = ("The selectivity regularizer only inside a window [start, end) of training (α < 0 suppresses, α > 0 "
            "promotes), every condition with the baseline's seeds; paired harm = the baseline's final test accuracy "
            "minus the condition's, same seed (after Achille, Rovere & Soatto 2019, critical learning periods).")
    if exp is not None and (exp / "windows.parquet").is_file():
        sec = Section("windows", title, lead)
        try:
            m = read_map(exp)
        except CsnError as e:
            sec.items.append(_note(f"the map's tables cannot be shown: {e}"))
            return sec
        table, verdicts, info, sel, acc = (m[k] for k in ("windows", "windows_verdicts", "info", "windows_selectivity",
                                                          "windows_accuracy"))
        sec.items += _windows_verdict_items(verdicts, info)
        sec.items.append(_note(_windows_design(info)))
        sec.items += rep.draw("the critical-period map figures", lambda: windows_figures(
            table, trajectories(sel, table), gap_curves(acc), rep.out_dir))
        sec.items.append(_windows_condition_table(table))
        wall = info.get("wall_seconds", {})
        if wall:
            sec.items.append(_note(f"Wall time of the last `csn experiment windows` call: training {_g(wall.get('training'))} s, "
                                   f"selectivity {_g(wall.get('selectivity'))} s ({info.get('parallel', '?')} runs at a "
                                   f"time; {len(info.get('conditions', []))} conditions x {len(info.get('seeds', []))} seeds)."))
        return sec
    near = _nearby(exp, "windows_verdicts.parquet")
    if not near:
        rep.omit("How early is early", "no critical-period map: run `csn experiment windows --preset fmnist` (or "
                                       "`--preset smoke` for a first look).")
        return None
    return _found_section(rep, "windows", title, lead + " Maps found with this experiment:", near, "map",
                          lambda d: _windows_verdict_items(read_map(d)["windows_verdicts"], {}))


def _windows_design(info: dict) -> str:
    """One sentence on how the map was run: learning-rate schedule, α per stage or split, accuracy at window ends."""
    cfg = info.get("train_config", {}) if isinstance(info.get("train_config"), dict) else {}
    lr = f"learning rate {cfg.get('lr_schedule', '?')}" if cfg else "learning rate not recorded"
    if info.get("reg_reduce", cfg.get("reg_reduce", "mean")) == "sum":
        alpha = "α applied in full to every regularized stage (reg_reduce=sum)"
    else:
        alpha = "α split over the regularized stages (reg_reduce=mean: a map run before 2026-12-05)"
    bn = info.get("end_bn_batches")
    end = (f"accuracy at each window's end and at the end of training on the whole test split after BatchNorm "
           f"re-estimation from {bn} batches" if bn else
           "accuracy at each window's end and at the end = the checkpoints' eval-mode values (no BatchNorm re-estimation)")
    return f"Design: {lr}; {alpha}; {end}."


def _nearby(exp: Path | None, marker: str) -> list[Path]:
    """Experiment folders (holding `marker`) inside an experiment directory or beside it (e.g. runs/windows-fmnist
    next to runs/reproduce-fmnist); folders that cannot be read are passed over."""
    found: set[Path] = set()
    for d in ([] if exp is None else [exp, exp.parent]):
        try:
            found |= {p for p in d.iterdir() if p != exp and (p / marker).is_file()}
        except OSError:
            continue
    return sorted(found)


def _found_section(rep: _Report, key: str, title: str, lead: str, near: list[Path], noun: str,
                   items: Callable[[Path], list[dict]]) -> Section:
    """A section listing the experiments found with this one: per folder, a link to its report (or how to build
    it) and `items(folder)`, or a note when its tables cannot be read."""
    sec = Section(key, title, lead)
    for d in near:
        sec.items.append(_sub(d.name))
        page = d / "report" / "index.html"
        sec.items.append({"kind": "link", "href": rep.rel(page), "text": f"the {noun}'s report ({d.name}/report/index.html)"}
                         if page.is_file() else _note(f"its report is not built yet: run `csn report {d}`."))
        try:
            sec.items += items(d)
        except CsnError as e:
            sec.items.append(_note(f"its tables cannot be shown: {e}"))
    return sec


def _windows_verdict_items(v: pd.DataFrame | None, info: dict) -> list[dict]:
    """The verdict table per (alpha, stage set) and the declared rules in words."""
    if v is None or v.empty:
        return [_note("no verdicts: the map has no regularized condition, or was run with --no-selectivity.")]
    pts = lambda x: _f(100 * x, 2) if _isnum(x) else "–"  # noqa: E731 - accuracy in points
    rows = [[_g(r["alpha"]), r["stage_set"], r["question"], r["verdict"], f"{pts(r['estimate'])} [{pts(r['lo'])}, "
             f"{pts(r['hi'])}]", pts(r["minimal"]), pts(r["mde"]), _f(r["rho"], 2),
             f"{100 * r['csi_change']:+.0f} %" if _isnum(r["csi_change"]) else "–", r["n_seeds"]]
            for r in v.to_dict("records")]
    items = [_table(["α", "stages", "question", "verdict", "estimate, points [95 % CI]", "minimal effect", "MDE",
                     "ρ(start, harm)", "CSI at the earliest window's end vs baseline", "seeds"],
                    rows, "Verdicts per (α, stage set) by the rules declared before the map was run "
                          "(csn.experiments.window_stats.WINDOW_RULES; ρ is a description, not a verdict).",
                    numeric=(0, 4, 5, 6, 7, 8, 9))]
    rules = [f"α < 0: {v[v['kind'] == 'suppress']['rule'].iloc[0]}" if (v["kind"] == "suppress").any() else None,
             f"α > 0: {v[v['kind'] == 'promote']['rule'].iloc[0]}" if (v["kind"] == "promote").any() else None]
    items.append({"kind": "list", "title": "Rules", "entries": [r for r in rules if r]})
    if info.get("rules"):
        items.append(_note("Thresholds: " + ", ".join(f"{k} = {val}" for k, val in dict(info["rules"]).items()) + "."))
    return items


def _windows_dose(r: dict) -> list[str]:
    """The dose cells of a regularized condition: regularized steps, mean lr and |α| over them, CSI and η² reduction at
    the window's end (a map written before the dose was recorded shows dashes)."""
    pct = lambda x: f"{100 * float(x):.0f} %" if _isnum(x) else "–"  # noqa: E731
    return [_g(r.get("reg_steps_mean")), _f(r.get("reg_mean_lr_mean"), 4), _g(r.get("reg_mean_abs_alpha_mean")),
            f"{pct(r.get('csi_reduction_end_mean'))} / {pct(r.get('eta2_reduction_end_mean'))}"]


def _windows_condition_table(t: pd.DataFrame) -> dict:
    """Per condition: paired harm with both SEs and its CI, the dose, the gap at the window's end (BatchNorm
    re-estimated, and the checkpoints' eval-mode one), CSI/eta² at the window end and the end."""
    pts = lambda x: _f(100 * x, 2) if _isnum(x) else "–"  # noqa: E731
    rows = []
    for r in t.to_dict("records"):
        reg = r["alpha"] != 0
        ep = (f" (ep {r['start_epoch']:.3g}-{r['end_epoch']:.3g})" if _isnum(r.get("start_epoch")) and
              _isnum(r.get("end_epoch")) else "")
        rows.append([r["condition"], _g(r["alpha"]), f"[{r['start_step']}, {r['end_step']}){ep}" if reg else "–",
                     r["stages"] or "–", r["seeds"], _pm(r["final_test_acc_mean"], r["final_test_acc_se"], 4),
                     _pm(100 * r["harm_mean"], 100 * r["harm_se_paired"], 2) if reg else "–",
                     pts(r["harm_se_unpaired"]) if reg else "–",
                     f"[{pts(r.get('harm_lo'))}, {pts(r.get('harm_hi'))}]" if reg else "–",
                     pts(r.get("harm_eval_mean")) if reg else "–",
                     *(_windows_dose(r) if reg else ["–"] * 4),
                     _pm(100 * r["early_gap_mean"], 100 * r["early_gap_se"], 2) if reg else "–",
                     pts(r.get("early_gap_eval_mean")) if reg else "–",
                     f"{_f(r['csi_end_mean'])} / {_f(r['base_csi_end_mean'])}" if reg else "–",
                     f"{_f(r['eta2_end_mean'])} / {_f(r['base_eta2_end_mean'])}" if reg else "–",
                     f"{_f(r['csi_final_mean'])} / {_f(r['base_csi_final_mean'])}" if reg else "–",
                     r["final_test_acc_per_seed"]])
    return _table(["condition", "α", "window (steps)", "stages", "seeds", "final test acc", "paired harm, points (± paired "
                   "SE)", "unpaired SE", "harm CI", "harm, eval mode", "dose: regularized steps", "dose: mean lr", "dose: mean |α| per "
                   "stage", "dose: CSI / η² reduction at window end", "Δacc at window end, BN re-estimated",
                   "Δacc at window end, eval mode", "CSI at window end (cond / base)", "η² at window end (cond / base)",
                   "CSI at the end (cond / base)", "final acc per seed"], rows,
                  "Per condition, over seeds: harm = baseline − condition final test accuracy of the same seed (the "
                  "paired SE beside the unpaired one; CI = 95 % t interval), on the whole test split after BatchNorm "
                  "re-estimation (maps run before 2026-12-05: eval mode), the checkpoints' eval-mode harm beside it; "
                  "the dose = optimizer steps with α ≠ 0, the mean learning rate and |α| over them (α applies to every "
                  "regularized stage in full) and the CSI and "
                  "η² reduction at the window's end vs the baseline at that step; Δacc at the window's end = condition − "
                  "baseline test accuracy there, on the whole test split after BatchNorm re-estimation (the verdicts' "
                  "value; maps run before 2026-12-05 hold the eval-mode value there), beside the checkpoints' own "
                  "eval-mode value; CSI and η² are means over the live units of the regularized stages.",
                  numeric=(1, *range(4, 19)))


# ------------------------------------------------------------------------------------------------
# which regularizer, which regime (csn experiment regime)
# ------------------------------------------------------------------------------------------------

def regime_section(rep: _Report) -> Section | None:
    """"Which regularizer, which regime": C4 per dataset x regularizer for a regime study (its cell table, figure and
    conditions); for another experiment, links to the regime studies found in it or beside it."""
    exp = rep.experiment
    title = "Which regularizer, which regime"
    lead = ("Claim C4 per dataset (10 vs 100 classes) and regularizer statistic (csn's class means over the global "
            "batch; the study's class sums per group of 32 images): suppression from step 0 and from a late onset "
            "against the baseline of the same seed, final test accuracy after BatchNorm re-estimation, 95 % t intervals "
            "over seeds (rule set 2, claims.c4_parts); the dose and the CSI / η² / per-image sparsity reductions beside.")
    pts = lambda r, k: (f"{100 * r[k + '_mean']:+.2f} [{100 * r[k + '_lo']:+.2f}, {100 * r[k + '_hi']:+.2f}]"  # noqa: E731
                        if _isnum(r.get(k + "_mean")) else "–")
    pct = lambda x: f"{-100 * x:+.0f} %" if _isnum(x) else "–"  # noqa: E731

    def cells(t: pd.DataFrame) -> dict:
        rows = [[r["dataset"], r["regularizer"], _g(r["alpha"]), r["n_seeds"], pts(r, "early_harm"), pts(r, "contrast"),
                 pts(r, "late_harm"), f"{r['verdict']} ({r['early_verdict']} / {r['late_verdict']})",
                 f"{_g(r['from0_reg_steps'])}, {_f(r['from0_reg_mean_lr'], 3)} | {_g(r['late_reg_steps'])}, "
                 f"{_f(r['late_reg_mean_lr'], 3)}",
                 " / ".join(pct(r.get(f"from0_{m}_reduction")) for m in ("csi", "eta2", "sparsity"))
                 + f" / {pct(r.get('own_reduction_from0'))}"] for r in t.to_dict("records")]
        return _table(["dataset", "regularizer", "α", "seeds", "early harm, points [95 % CI]", "late − early [CI]",
                       "late harm [CI]", "C4 (early / late costs little)", "dose from 0 | late (steps, mean lr)",
                       "CSI / η² / sparsity / own statistic, from 0 vs baseline"], rows,
                      "Per cell: harm = baseline − condition final test accuracy of the same seed (points); the verdict "
                      "by rule set 2's C4 rule; reductions of the regularized stages' measures at the end of training.",
                      numeric=(2, 3, 4, 5, 6))

    if exp is not None and (exp / "regime.parquet").is_file():
        sec = Section("regime", title, lead)
        try:
            m = read_regime(exp)
        except CsnError as e:
            sec.items.append(_note(f"the regime study's tables cannot be shown: {e}"))
            return sec
        table, conds, info = m["regime"], m["regime_conditions"], m["info"]
        sec.items.append(cells(table))
        sec.items += rep.draw("the regime figure", lambda: regime_figure(
            table, rep.out_dir, min_harm=THRESHOLDS["c4_min_harm"], little=THRESHOLDS["c4_little"]))
        sec.items.append(_table(["condition", "seeds", "final test acc", "per seed"],
                                [[r["condition"], r["seeds"], _pm(r["final_test_acc_mean"], r["final_test_acc_se"], 4),
                                  r.get("final_test_acc_per_seed", "")] for r in conds.to_dict("records")],
                                "Per condition, mean ± SE over seeds: test accuracy (whole split) at the end of "
                                "training, BatchNorm statistics re-estimated.", numeric=(1, 2)))
        if info.get("c4_rule"):
            sec.items.append(_note(f"Rule (rule set {info.get('rules_version', '?')}, declared "
                                   f"{info.get('rules_declared', '?')}): {info['c4_rule']}."))
        return sec
    near = _nearby(exp, "regime.parquet")
    if not near:
        rep.omit(title, "no regime study: run `csn experiment regime` (or `--preset smoke` for a first look).")
        return None
    return _found_section(rep, "regime", title, lead + " Regime studies found with this experiment:", near, "study",
                          lambda d: [cells(read_regime(d)["regime"])])


# ------------------------------------------------------------------------------------------------
# CKA
# ------------------------------------------------------------------------------------------------

def cka_section(rep: _Report) -> Section | None:
    have = rep.runs_with("cka")
    if not have:
        rep.omit("Representational similarity (CKA)", "no CKA table: run `csn cka RUN` (or `csn cka RUN_A RUN_B`).")
        return None
    sec = Section("cka", "Representational similarity (CKA)",
                  "Linear CKA (unbiased minibatch estimator) between layers, across checkpoints, and between runs at "
                  "matched checkpoints (the study compared regularized with unregularized networks).")
    cond_of_run = {r.name: c.name for c in rep.conds for r in c.runs}
    rows = []
    for cond, runs in have:
        # between runs: one figure per (this condition, other condition), mean over seed pairs
        pairs: dict[str, list[pd.DataFrame]] = {}
        for run in runs:
            df = rep.table(run, "cka")
            if "comparison" not in df.columns:
                continue
            d = df[df["comparison"] == "runs"]
            for rb, g in d.groupby("run_b", sort=False):
                other = cond_of_run.get(str(rb), parse_run_name(str(rb).split("/")[-1])[0])
                pairs.setdefault(other, []).append(g)
        within = [r for r in runs if "comparison" in rep.table(r, "cka").columns
                  and (rep.table(r, "cka")["comparison"] != "runs").any()]
        if (rep.multi or len(have) > 1) and (pairs or within):
            sec.items.append(_sub(cond.name))
        for other, tables in pairs.items():
            sec.items += rep.draw(f"CKA {cond.name} vs {other}",
                                  lambda: fc.cka_runs_vs_epoch(tables, rep.out_dir, name=f"cka_runs_{cond.slug}_vs_{_slug(other)}",
                                                               label_a=cond.name, label_b=other))
            try:
                s = summarize_cka_runs(tables)
                last = s[s["step_a"] == s["step_a"].max()]
                for r in last.itertuples():
                    rows.append([f"{cond.name} vs {other}", r.layer, _g(r.epoch_a), _pm(r.mean, r.se), int(r.n_pairs)])
            except Exception:
                pass
        for i, run in enumerate(within):
            df = rep.table(run, "cka")
            df = df[df["comparison"] != "runs"]
            figs = rep.draw(f"CKA within {run.name}",
                            lambda: fc.cka_figures(df, rep.out_dir, prefix=f"cka_{_slug(run.name)}",
                                                   title=run.name if (rep.multi or len(within) > 1) else None))
            sec.items += figs if i == 0 else [_details(f"CKA figures of {run.name}", figs)]
    if rows:
        sec.items.append(_table(["runs compared", "layer", "epoch", "CKA (mean ± SE over seed pairs)", "pairs"], rows,
                                "Same-layer CKA between conditions at the last matched checkpoint.", numeric=(2, 3, 4)))
    return sec


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


PROTOCOL_KEYS = ("seeds", "reg_seeds", "alpha", "late_onset", "early_checkpoint", "early_epoch", "ablation_checkpoints",
                 "linearity_checkpoints", "reg_selectivity_checkpoints", "cka_checkpoints", "ablation.draws",
                 "selectivity.samples", "linearity.samples", "cka.samples")
"""The settings of a reproduction (reproduce.json) shown in the configuration section (those it holds: reg_seeds,
early_checkpoint and early_epoch are keys of earlier versions' reproductions)."""


def _protocol(experiment: Path | None) -> list[dict]:
    """The reproduction's protocol table (reproduce.json), if the experiment is a reproduction."""
    if experiment is None or not (experiment / "reproduce.json").is_file():
        return []
    try:
        rp = json.loads((experiment / "reproduce.json").read_bytes().decode("utf-8"))
        settings, study = rp.get("settings", {}), rp.get("reproduce_preset", {})
        keep = {}
        for key in PROTOCOL_KEYS:
            value: object = study
            for part in key.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            if value is not None:
                keep[key] = value
        keep.update(rp.get("resolved", {}))  # the study's times on this dataset (steps per epoch, late onset step)
        return [_table(["setting", "value"], [[k, v] for k, v in {**settings, **keep}.items()],
                       "The reproduction's protocol (reproduce.json).", cls="config narrow")]
    except (ValueError, OSError, AttributeError, RecursionError):
        return [_note(f"{experiment / 'reproduce.json'} could not be read.")]


def _sections(rep: _Report, extra: list[dict], progress: bool) -> list[Section]:
    """Every section the tables support, in page order (a progress bar over them)."""
    builders = [("configuration", lambda: config_section(rep, extra)), ("training", lambda: training_section(rep)),
                ("selectivity", lambda: selectivity_section(rep)), ("ablation", lambda: ablation_section(rep)),
                ("linearity", lambda: linearity_section(rep)), ("regularization", lambda: regularization_section(rep)),
                ("how early is early", lambda: windows_section(rep)),
                ("which regularizer", lambda: regime_section(rep)), ("cka", lambda: cka_section(rep))]
    sections: list[Section] = []
    pbar = bar(builders, desc="report", unit="section", progress=progress, file=sys.stderr)
    for what, fn in pbar:
        pbar.set_postfix_str(what)
        sec = fn()
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
        rep = _Report(out_dir, conds, experiment, lambda msg: print(msg, file=sys.stderr, flush=True))
        sections = writing + _sections(rep, _protocol(experiment), progress)
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
           "Section", "TEMPLATE"]
