"""The analysis framework: one driver for every per-checkpoint analysis of a run.

An analysis is small by construction. It declares its options (a `Schema`), its tables
(`TableSpec`: columns, key, settings), what each checkpoint must hold (`expected`), and a
`compute(ctx, checkpoint, missing)` that returns the rows of one checkpoint. Everything around it
is written once here, in `run_analysis`:

- validation of every run before any work (under torchrun on every rank together);
- checkpoint selection (`--checkpoints`) and the BatchNorm policy (csn.core.bn: re-estimate BN
  statistics before epoch 1 by default, on a copy, recorded in `bn_recalibrated`; one note on stderr);
- the compatibility rule: rows computed with other settings are never mixed into a table
  (`--tag NAME` writes a side table instead);
- resume: checkpoints whose rows are all in the tables are skipped, each finished checkpoint is
  written atomically under the run's writer lock;
- torchrun: rank 0 reads and writes; every rank streams its shard of each checkpoint's evaluation
  split (`distribute="split"`) or takes whole checkpoints (`distribute="checkpoints"`);
- progress, and errors that name the run and the checkpoint;
- the run's tracker (its config's `tracker`): after each checkpoint is written, the analysis's `summary` of that
  checkpoint's rows (e.g. each stage's mean CSI) is logged to it at the checkpoint's step.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pandas as pd
import torch
from pydantic import Field

from csn import dist
from csn.core.bn import bn_note, bn_plan, has_batchnorm, recalibrate_bn
from csn.core.progress import bar
from csn.core.schema import AllIsNone, Int, Schema
from csn.core.trace import TraceDict
from csn.core.units import eval_mode, split_batch, stages, to_device
from csn.data import BatchLoader, DataSplits
from csn.data.loaders import in_memory, shard_split, split_loader, subset
from csn.data.split import split_labels
from csn.data.validate import require_every_class
from csn.errors import CsnError
from csn.runs.lock import main_lock
from csn.runs.run import Checkpoint, Run
from csn.runs.table import PROVENANCE, ResumableTable, TableSpec, tagged
from csn.runs.trackers import NONE, Tracker, open_tracker

SUBSET_SEED = 777
"""Seed of the fixed subset of an evaluation split that `--samples N` measures on (the same in every analysis)."""
BN_SEED_OFFSET = 99991
"""BN re-estimation reads the training split in an order seeded by the run's seed plus this."""
SPLITS = ("test", "train")

Split = Literal["test", "train"]
Samples = Annotated[Annotated[Int, Field(ge=1)] | None, AllIsNone]  # ge on the number alone: None passes
"""A number of examples of the split (a fixed seeded subset), or None / 'all' for the whole split."""


class RunOptions(Schema):
    """What every analysis of a run's checkpoints shares: which checkpoints, BatchNorm, table tag, devices."""

    checkpoints: str | None = Field(None, description="Which checkpoints: all (default), first, last/end, the "
                                    "checkpoint nearest each point 'step=64', an epoch '1.5' or a fraction 'f0.25', "
                                    "ranges 'A:B' ('0:1', 'step=0:f0.25'); comma-separated. A bare number is an epoch.",
                                    json_schema_extra={"metavar": "TIMES"})
    bn_recalibrate: Int | None = Field(None, ge=0, description="Re-estimate BatchNorm statistics from N training "
                                       "batches before measuring (0 = off). Default: 16 batches for checkpoints before "
                                       "epoch 1, where stored statistics lag the weights.",
                                       json_schema_extra={"metavar": "N"})
    tag: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Write tables/TABLE-NAME.parquet "
                            "instead, e.g. to keep a --bn-recalibrate 0 table beside the default one.",
                            json_schema_extra={"metavar": "NAME"})
    distribute: Literal["split", "checkpoints"] = Field("split", description="Under torchrun: every process scores its "
                                                        "shard of each checkpoint's split (statistics summed), or each "
                                                        "process takes whole checkpoints. Same rows either way.")
    device: str = Field("auto", description="auto (this process's GPU if any, else the CPU), cpu, cuda, cuda:1.")
    progress: bool = Field(True, description="Show progress bars.")


# ------------------------------------------------------------------------------------------------
# evaluation data and the analysis model of a checkpoint
# ------------------------------------------------------------------------------------------------

def split_of(data: DataSplits, split: str) -> Any:
    """The 'train' or 'test' split of a dataset, as analyses read it: without augmentation."""
    if split not in SPLITS:
        raise CsnError(f"unknown split {split!r}; use 'train' or 'test'.")
    if split == "test":
        return data.test
    return data.train if getattr(data, "train_eval", None) is None else data.train_eval


def eval_loader(run: Run, data: DataSplits, split: str = "test", *, batch_size: int | None = None,
                device: str | torch.device = "cpu", samples: int | None = None, shard: bool = False,
                whole_batches: bool = False) -> Any:
    """Deterministic, unaugmented batches of a split (in the run's order), optionally a seeded subset.

    shard=True (under torchrun): this rank's contiguous part of the split (csn.data.loaders.shard_split),
    a run of the single-process batches, so every rank computes exactly the activations one process
    would and statistics summed over ranks (class sums/counts, correct counts, minibatch HSIC) equal
    the single-process ones up to the order of summation. With fewer batches than ranks the split is
    cut into equal chunks of examples instead (sums over examples do not depend on batch boundaries;
    float32 activations may then differ in the last bits), unless whole_batches=True (per-batch
    statistics such as minibatch HSIC), which leaves the extra ranks without data. A single process
    gets the whole split.
    """
    s = subset(split_of(data, split), samples, SUBSET_SEED)
    bs = batch_size or run.config.eval_batch_size
    if shard:
        s = shard_split(s, bs if whole_batches or -(-len(s) // bs) >= dist.world_size() else None)
    cfg = run.config
    return split_loader(s, bs, device, run_seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last)


def check_subset(data: DataSplits, split: str, samples: int | None, num_classes: int | None) -> None:
    """Refuse a seeded subset of a split (--samples N) that misses a class, naming the subset (the split itself
    holds every class: the readers check that at load time), before anything is measured on it."""
    whole = split_of(data, split)
    s = subset(whole, samples, SUBSET_SEED)
    if s is whole or not num_classes:
        return
    labels = split_labels(s)
    if labels is None:
        return
    require_every_class(labels, int(num_classes), f"the {len(s):,}-image subset of the {split} split (--samples "
                        f"{samples}; the split itself holds every class)", "raise --samples so that every class has an "
                        "example, or leave it out to measure on the whole split")


def bn_loader(run: Run, data: DataSplits, device: str | torch.device = "cpu") -> Any:
    """Training batches without augmentation, in a fixed seeded order, for BN re-estimation.

    The order is a seeded shuffle for folder datasets too (an ImageFolder lists its images class by
    class, so its first batches in file order would hold one or two classes).
    """
    cfg = run.config
    return split_loader(split_of(data, "train"), cfg.batch_size, device, seed=cfg.seed + BN_SEED_OFFSET,
                       run_seed=cfg.seed, workers=cfg.workers, channels_last=cfg.channels_last)


@dataclass
class AnalysisModel:
    """A model ready for eval-mode analysis and how its BN statistics were obtained (recorded in tables)."""

    model: torch.nn.Module
    bn_recalibrated: int  # number of training batches used; 0 = checkpoint's running statistics


def analysis_model(run: Run, ckpt: Checkpoint, data: DataSplits, *, bn_recalibrate: int | None = None,
                   device: str | torch.device = "cpu", shared: bool = True) -> AnalysisModel:
    """The model at `ckpt` in eval mode; BN statistics re-estimated on a copy when the policy says so.

    Under torchrun with shared=True every rank calls this for the same checkpoint (a collective):
    each re-estimates BN statistics on the same batches and rank 0's are broadcast, so every rank
    scores its shard with one model. shared=False: ranks load different checkpoints, no collective.
    """
    with dist.same_outcome(enabled=shared):
        model = run.load_model(ckpt, device=device)
        n = bn_plan({ckpt.step: ckpt.epoch}, bn_recalibrate, has_bn=has_batchnorm(model), available=None)[ckpt.step]
        if n > 0:
            model = recalibrate_bn(model, bn_loader(run, data, device), n, device=device)
            n = int(getattr(model, "csn_bn_recalibrated", n))  # batches actually used (a small split has fewer)
        require_finite_outputs(model, data, device)
    if shared and n > 0:
        dist.broadcast_buffers_(model)
    return AnalysisModel(model.eval(), n)


FIRST_BATCH = 32
"""Examples of the test split whose outputs every analysis model must give finite (require_finite_outputs)."""


def nonfinite_error(where: str) -> CsnError:
    """The one message for NaN or infinite values out of a model (a diverged checkpoint, or bad input data)."""
    return CsnError(f"{where} produced NaN or infinite activations; check the model's weights (a diverged "
                    "checkpoint?) and the input data.")


def traced_batches(model: torch.nn.Module, loader: Iterable[Any], layers: Sequence[str],
                   device: str | torch.device = "cpu") -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """One eval-mode, no-grad pass over `loader`: per batch ({layer: its traced output}, labels), every output
    checked finite (a non-finite one: the one CsnError naming the layer)."""
    with eval_mode(model), torch.no_grad(), TraceDict(model, list(layers)) as cache:
        for item in loader:
            x, y = split_batch(item)
            cache.clear()
            model(to_device(x, device))
            for name in layers:
                if not torch.isfinite(cache[name]).all():
                    raise nonfinite_error(f"layer {name!r}")
            yield {name: cache[name] for name in layers}, y


def require_finite_outputs(model: torch.nn.Module, data: DataSplits, device: str | torch.device = "cpu") -> None:
    """Refuse a model whose outputs on the first FIRST_BATCH test examples are not all finite, before any
    analysis measures it, so that no row is ever computed from a diverged checkpoint."""
    split = split_of(data, "test")
    n = min(FIRST_BATCH, len(split))
    if in_memory(split):
        x = next(iter(BatchLoader(split, n, shuffle=False, device=device)))[0]
    else:
        x = torch.stack([split[i][0] for i in range(n)]).to(device)
    try:
        layers = [name for names in stages(model).values() for name in names]
    except CsnError:
        layers = []  # a model without declared read points: only its output is checked
    with torch.no_grad(), TraceDict(model, layers, retain="output", strict=False) as cache:
        out = model.eval()(x)  # eval mode: BatchNorm statistics are read, never updated
        first = next((name for name in layers if name in cache and not _finite(cache[name])), None)
    if first is not None or not _finite(out):
        raise nonfinite_error(f"layer {first!r}" if first else "the model's output layer")


def _finite(out: Any) -> bool:
    tensors = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors)


def run_bn_plan(run: Run, data: DataSplits, requested: int | None, device: str | torch.device = "cpu") -> dict[int, int]:
    """Training batches BN re-estimation will use at each of the run's checkpoints (0 = off, or no BatchNorm)."""
    epochs = {c.step: c.epoch for c in run.checkpoints}
    has_bn = has_batchnorm(run.build_model())
    plan = bn_plan(epochs, requested, has_bn=has_bn, available=None)
    if any(plan.values()):
        try:
            available = len(bn_loader(run, data, device))
        except TypeError:
            available = None
        plan = bn_plan(epochs, requested, has_bn=has_bn, available=available)
    return plan


# ------------------------------------------------------------------------------------------------
# the context of one run, and the Analysis protocol
# ------------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What an analysis sees of one run while it runs: the run, its data, the device, the checkpoints asked
    for, the BatchNorm plan, and helpers to get the analysis model and the evaluation data."""

    run: Run
    data: DataSplits
    device: torch.device
    options: RunOptions
    checkpoints: list[Checkpoint]
    bn: dict[int, int]
    log: Callable[[str], None]
    shared: bool = True           # every rank works on the same checkpoint (shard the evaluation split)
    own: dict[str, Any] = field(default_factory=dict)  # per-run values the analysis sets in setup (e.g. its layers)
    state: Any = None             # what Analysis.prepare returned (on every rank)
    progress: Any = None          # the progress bar; compute may advance it in finer units than checkpoints
    other_plans: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def num_classes(self) -> int | None:
        info = self.run.info.get("data", {})
        return int(info["num_classes"]) if "num_classes" in info else None

    @property
    def class_names(self) -> list[str] | None:
        return self.run.info.get("data", {}).get("class_names") or None

    def plan(self, run: Run | None = None) -> dict[int, int]:
        """The BN plan of this run, or of another run compared with it (same data)."""
        if run is None or run.path.resolve() == self.run.path.resolve():
            return self.bn
        key = str(run.path.resolve())
        if key not in self.other_plans:
            self.other_plans[key] = run_bn_plan(run, self.data, self.options.bn_recalibrate, self.device)
        return self.other_plans[key]

    def model(self, ckpt: Checkpoint, run: Run | None = None) -> AnalysisModel:
        """The analysis model at `ckpt` (of this run, or of `run`), BN statistics per the policy."""
        run = run or self.run
        return analysis_model(run, ckpt, self.data, bn_recalibrate=self.options.bn_recalibrate, device=self.device,
                              shared=self.shared)

    def split_size(self, split: str, samples: int | None = None) -> int:
        """Examples the analysis reads from a split (all, or a seeded subset of `samples`)."""
        n = len(split_of(self.data, split))
        return n if samples is None else min(samples, n)

    def loader(self, split: str, samples: int | None = None, *, batch_size: int | None = None,
               whole_batches: bool = False) -> Any:
        """Unaugmented batches of a split (or its seeded subset); this rank's shard when checkpoints are shared."""
        n = len(split_of(self.data, split))
        return eval_loader(self.run, self.data, split, batch_size=batch_size, device=self.device,
                           samples=None if samples is None or samples >= n else samples, shard=self.shared,
                           whole_batches=whole_batches)


class Analysis(ABC):
    """A per-checkpoint analysis: its options, its tables, and the rows of one checkpoint.

    Subclasses set `name`, `Options` (a Schema) and `tables`, and implement `expected` and `compute`;
    `setup`, `settings`, `sets`, `prepare` and `work` have defaults.
    """

    name: ClassVar[str]
    Options: ClassVar[type[Schema]]
    tables: ClassVar[tuple[TableSpec, ...]]
    unit: ClassVar[str] = "ckpt"  # what the progress bar counts (see work())
    every_class: ClassVar[bool | None] = None
    """Whether what it measures (its options' `split`, subset to `samples`) must hold every class, checked before
    any work (check_subset); None: yes for an analysis with a per-class table (a 'class' column, e.g. CSI's class
    means), no otherwise (accuracy, CKA and linearity are defined on any subset)."""

    def needs_every_class(self) -> bool:
        """every_class, or (None) whether one of its tables holds per-class rows."""
        if self.every_class is not None:
            return self.every_class
        return any("class" in spec.columns for spec in self.tables)

    def __init__(self, options: Schema | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an options object or keyword options, not both")
        if options is None:
            options = self.Options.parse(kwargs, what=f"{self.name} option")
        elif not isinstance(options, self.Options):
            raise TypeError(f"{type(self).__name__} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    def setup(self, ctx: Context) -> None:  # noqa: B027 - optional hook, empty by default
        """Validate the options against the run and keep what every rank needs in ctx.own (no writes; every run
        is set up before any is computed, so per-run values belong in ctx.own, not on the analysis). Default: nothing."""

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        """{table: {settings column: value}} of this request (the table-wide settings). Default: none."""
        return {}

    def sets(self, ctx: Context) -> dict[str, dict[str, Iterable[Any]]]:
        """{table: {column: values}} whose set in the table must equal the request's. Default: none."""
        return {}

    @abstractmethod
    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        """{table: key columns (+ row settings) that checkpoint `ckpt` must hold}."""

    def prepare(self, ctx: Context, todo: Sequence[Checkpoint]) -> Any:
        """Rank 0's work before computing (read another table, fit a model); the result reaches every rank
        as ctx.state. Default: nothing."""
        return None

    def work(self, ctx: Context, ckpt: Checkpoint) -> float:
        """Progress units of one checkpoint (default 1; compute may advance ctx.progress itself)."""
        return 1.0

    @abstractmethod
    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """{table: rows} of one checkpoint; `missing` says which expected keys the tables lack."""

    def summary(self, rows: Mapping[str, pd.DataFrame]) -> dict[str, float]:
        """A few numbers of one checkpoint for the run's tracker (a dashboard), e.g. {'layer1/csi': mean CSI}, from
        every row the tables hold for it ({table: rows}, by the table's declared name); logged as '<name>/<key>' at
        the checkpoint's step. Default: none (the analysis logs nothing)."""
        return {}


@dataclass
class Result:
    """What run_analysis gives for one run: the rows of the request in each table (the full tables stay on disk)."""

    run: Run
    tables: dict[str, pd.DataFrame]
    computed: list[int] = field(default_factory=list)  # checkpoint steps computed by this call (the rest were done)

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    @property
    def rows(self) -> pd.DataFrame:
        """The rows of the analysis's main (first) table."""
        return next(iter(self.tables.values()))


# ------------------------------------------------------------------------------------------------
# the driver
# ------------------------------------------------------------------------------------------------

def note(message: str) -> None:
    """The analyses' default `log`: a one-line note on stderr (rank 0's alone under torchrun)."""
    if dist.is_main():
        print(message, file=sys.stderr, flush=True)


def run_analysis(runs: Run | str | Path | Sequence[Run | str | Path], analysis: Analysis,
                 options: RunOptions | None = None, *, data: DataSplits | None = None,
                 log: Callable[[str], None] | None = None, **kwargs: Any) -> Result | list[Result]:
    """Run `analysis` over the checkpoints of one run or several; returns a Result (or a list, for a list).

    options (or keyword arguments) are RunOptions: checkpoints, bn_recalibrate, tag, distribute,
    device, progress. Every run is validated before any work; under torchrun every process calls
    this alike (after csn.dist.init_from_env()), each streams its shard, rank 0 writes.
    """
    single = isinstance(runs, (Run, str, Path))
    if options is not None and kwargs:
        raise TypeError("pass either a RunOptions object or keyword options, not both")
    with dist.same_outcome():  # a bad request fails on every rank together, before any work
        options = options or RunOptions.parse(kwargs, what="analysis option")
        ctxs = [_context(r, analysis, options, data, log or note) for r in ([runs] if single else list(runs))]
    results = [_execute(analysis, ctx) for ctx in ctxs]
    return results[0] if single else results


def _context(run: Run | str | Path, analysis: Analysis, options: RunOptions, data: DataSplits | None,
             log: Callable[[str], None]) -> Context:
    run = run if isinstance(run, Run) else Run(run)
    ckpts = run.select(options.checkpoints)  # no checkpoints / bad selector: CsnError
    device = dist.resolve_device(options.device)
    data = data if data is not None else run.dataset()
    ctx = Context(run, data, device, options, ckpts, run_bn_plan(run, data, options.bn_recalibrate, device), log)
    if analysis.needs_every_class():  # a subset without a class is named as such, before any work
        o = analysis.options
        check_subset(data, getattr(o, "split", "test"), getattr(o, "samples", None), ctx.num_classes)
    analysis.setup(ctx)
    return ctx


def _execute(analysis: Analysis, ctx: Context) -> Result:
    """Skip finished checkpoints, compute the rest, write each checkpoint's rows atomically (rank 0)."""
    run, tag = ctx.run, ctx.options.tag
    tables = {spec.name: ResumableTable(run, spec, tag) for spec in analysis.tables}
    expected = {c.step: analysis.expected(ctx, c) for c in ctx.checkpoints}
    wanted = {name: pd.concat([e[name] for e in expected.values()], ignore_index=True) for name in tables}
    by_step = {c.step: c for c in ctx.checkpoints}

    def prepare() -> tuple[list[tuple[int, dict[str, pd.DataFrame]]], Any]:
        settings, sets = analysis.settings(ctx), analysis.sets(ctx)
        for name, table in tables.items():
            table.load()
            _check_provenance(ctx, table)
            table.check(settings.get(name, {}), wanted[name], sets.get(name))
        todo = []
        for c in ctx.checkpoints:
            missing = {name: table.missing(expected[c.step][name]) for name, table in tables.items()}
            if any(not m.empty for m in missing.values()):
                todo.append((c.step, missing))
        msg = bn_note(ctx.bn, [s for s, _ in todo], ctx.options.bn_recalibrate)
        if msg:
            ctx.log(msg)
        return todo, analysis.prepare(ctx, [by_step[s] for s, _ in todo])

    def write(*done: tuple[int, dict[str, pd.DataFrame]] | None) -> None:
        # The first declared (primary) table is written last: a checkpoint found there has its rows in every table.
        for step, rows in (d for d in done if d is not None):
            for name in reversed(tables):
                if name in rows:
                    tables[name].add(rows[name])
            if tracker is not None:  # the summary of every row the checkpoint now has, at its step
                tracker.log(step, {f"{tagged(analysis.name, tag)}/{k}": v for k, v in analysis.summary(
                    {name: table.rows([step]) for name, table in tables.items()}).items()})

    tracker: Tracker | None = None
    with main_lock(run.path, analysis.name):
        todo, ctx.state = dist.on_main(prepare)
        with dist.same_outcome():
            tracker = _open_tracker(analysis, ctx) if todo else None
        by_checkpoint = ctx.options.distribute == "checkpoints" and dist.is_dist()
        world, rank = dist.world_size(), dist.rank()
        mine = [t for i, t in enumerate(todo) if not by_checkpoint or i % world == rank]
        ctx.shared = not by_checkpoint
        ctx.progress = bar(total=sum(analysis.work(ctx, by_step[s]) for s, _ in mine), desc=f"{analysis.name} {run.name}",
                           progress=ctx.options.progress and dist.is_main(), unit=analysis.unit)
        try:
            if by_checkpoint:
                for i in range(0, len(todo), world):
                    rows = None
                    with dist.same_outcome():
                        if i + rank < len(todo):
                            step = todo[i + rank][0]
                            rows = (step, _compute(analysis, ctx, by_step[step], todo[i + rank][1]))
                    dist.on_main(write, *dist.all_gather_objects(rows))
            else:
                for step, missing in todo:
                    dist.on_main(write, (step, _compute(analysis, ctx, by_step[step], missing)))
        finally:
            ctx.progress.close()
            if tracker is not None:
                tracker.close()
    out = {}
    for name, table in tables.items():
        if table.df is None:  # other ranks (rank 0 holds the table it wrote)
            table.load()
        out[table.name] = _rows_of(table, wanted[name])
    return Result(run, out, [s for s, _ in todo])


def stage_summary(rows: pd.DataFrame, columns: Sequence[str], by: str = "stage") -> dict[str, float]:
    """{'<stage>/<column>': the mean of the column over the rows of that stage}: an Analysis.summary's usual body."""
    if rows.empty:
        return {}
    means = rows.groupby(by, sort=False)[list(columns)].mean()
    return {f"{stage}/{col}": float(means.at[stage, col]) for stage in means.index for col in columns}


def _open_tracker(analysis: Analysis, ctx: Context) -> Tracker | None:
    """Rank 0: the run's tracker opened for this analysis, when the run names one and the analysis has a summary.
    A tracker whose package is missing here (the run trained elsewhere) is left out with one note: the tables are
    the analysis's product, the dashboard a copy of a few of their numbers."""
    name = ctx.run.config.tracker
    if name == NONE or type(analysis).summary is Analysis.summary or not dist.is_main():
        return None
    try:
        return open_tracker(name, ctx.run.path, ctx.run.config.to_dict(), tagged(analysis.name, ctx.options.tag))
    except CsnError as e:
        ctx.log(f"note: {analysis.name} of {ctx.run.name} is not logged to its tracker: {e}")
        return None


def _check_provenance(ctx: Context, table: ResumableTable) -> None:
    """Rank 0, before any work: rows computed from a checkpoint that was replaced since (their sha256 is not the
    manifest's) are computed again, with one note; rows of a table written before provenance record the
    manifest's sha256 from now on (csn cannot tell what they were computed from), with one note."""
    manifest = {c.step: c.sha256 for c in ctx.run.checkpoints}
    stale, unrecorded = table.provenance(manifest)
    if unrecorded:
        table.adopt(manifest)
        ctx.log(f"note: {table.path} was written before csn recorded each row's checkpoint; its rows of "
                f"{len(unrecorded)} checkpoint(s) now record the sha256 of the checkpoints in the manifest (delete the "
                "table to recompute them instead).")
    redo = sorted(set(stale) & {c.step for c in ctx.checkpoints})
    if redo:
        table.forget(redo)
        shown = ", ".join(map(str, redo[:8])) + (", ..." if len(redo) > 8 else "")
        ctx.log(f"note: {table.path} holds rows computed from other weights than the checkpoints now at step(s) {shown} "
                "(their sha256 changed since): recomputing them.")


def _compute(analysis: Analysis, ctx: Context, ckpt: Checkpoint, missing: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """One checkpoint's rows, each recording the checkpoint's sha256 (PROVENANCE); errors name the run and the
    checkpoint; progress topped up to the checkpoint's work."""
    before = ctx.progress.n
    try:
        rows = analysis.compute(ctx, ckpt, missing)
    except CsnError as e:
        raise CsnError(f"run {ctx.run.name}, checkpoint step {ckpt.step} (epoch {ckpt.epoch:g}): {e}") from None
    traced = {spec.name for spec in analysis.tables if spec.provenance}
    rows = {name: (df.assign(**{PROVENANCE: ckpt.sha256}) if name in traced else df) for name, df in rows.items()}
    left = analysis.work(ctx, ckpt) - (ctx.progress.n - before)
    if left > 1e-9:
        ctx.progress.update(left)
    return rows


def _rows_of(table: ResumableTable, expected: pd.DataFrame) -> pd.DataFrame:
    """The table's rows whose key is among the request's expected keys (table order)."""
    df = table.rows()
    if expected.empty or df.empty:
        return df.iloc[0:0]
    key = list(table.spec.key)
    m = df[key].merge(expected[key].drop_duplicates(), on=key, how="left", indicator=True)
    return df[(m["_merge"] == "both").to_numpy()].reset_index(drop=True)


__all__ = [
    "RunOptions", "Split", "Samples", "SPLITS", "SUBSET_SEED", "split_of", "eval_loader", "check_subset", "bn_loader", "AnalysisModel",
    "analysis_model", "require_finite_outputs", "nonfinite_error", "FIRST_BATCH", "run_bn_plan", "Context", "Analysis", "Result", "note", "run_analysis",
    "stage_summary",
]
