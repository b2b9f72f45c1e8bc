"""`csn ablate`: do a checkpoint's most class-selective units matter more than random ones? (SPEC "Ablation (C2)")."""

from __future__ import annotations

import math

import click
import pandas as pd

from csn import dist
from csn.analysis.ablation import Ablation, summarize_ablation
from csn.analysis.base import run_analysis
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.report.fig_ablation import ablation_figures


def _fmt_gap(row: pd.Series) -> str:
    se = row["gap_se"]
    spread = f" ± {se:.3f} SE over {int(row['draws'])} draws" if isinstance(se, float) and math.isfinite(se) else ""
    return f"{row['gap']:+.3f}{spread} (step {int(row['step'])}, epoch {row['epoch']:g})"


def _print_gaps(df: pd.DataFrame) -> None:
    """Per stage: area gap, selective minus random, at the first and the last checkpoint of the request."""
    gaps = summarize_ablation(df).gaps
    if gaps.empty:
        return
    echo("  area gap, selective minus random (negative: selective units matter more):")
    for stage, gs in gaps.groupby("stage", sort=False):
        gs = gs.sort_values("step")
        first, last = gs.iloc[0], gs.iloc[-1]
        line = f"    {stage}: first {_fmt_gap(first)}"
        if len(gs) > 1:
            line += f"; last {_fmt_gap(last)}"
        echo(line)


@click.command("ablate", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Ablation, plot=("plot",))
def ablate(runs, **values) -> None:
    """Ablate the most selective, random and least selective units, stage by stage, at every checkpoint.

    Per checkpoint and stage, each block's units are ranked by that checkpoint's class selectivity
    (CSI); for every n on the grid the top-n units of EVERY block of the stage are zeroed at once and
    the network is scored on the whole split (or a fixed subset: --samples). Random draws are the control. The stage input is
    computed once per batch and many masks share a forward pass, so this is far cheaper than the
    study's protocol while giving the same numbers (--naive runs that protocol).

    Writes RUN/tables/ablation.parquet (step, epoch, stage, order, n, fraction, draw, top1, top5, loss,
    ...); an interrupted run resumes at the checkpoint where it stopped. Prints, per stage, the area
    under normalized top-1 vs fraction ablated for selective minus random (negative: the selective
    units matter more) at the first and last checkpoint.

    \b
    Examples:
      csn ablate runs/fmnist
      csn ablate runs/fmnist --checkpoints e0.125,last --stages layer1,layer2 --draws 5 --plot
      csn ablate runs/fmnist --grid f:0,0.05,0.1,0.25,0.5,1 --rank-split train --score-split test
      torchrun --nproc_per_node=8 -m csn ablate runs/r50-s0 --checkpoints 0:10,last --distribute checkpoints
    """
    analysis, opts, plot = analysis_request(values, Ablation)
    plot = plot.plot and dist.is_main()
    results = run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True))
    for res in results:
        run, name = res.run, next(iter(res.tables))
        df = res.rows
        path = run.table_path(name)
        echo(f"ablation of {run.name}: {len(df)} rows for {df['step'].nunique()} checkpoints written to {rel(path)}")
        if {"selective", "random"} <= set(analysis.options.orders):
            _print_gaps(df)
        if plot:
            for f in ablation_figures(run.read(name), run.report_dir, title=run.name):
                echo(f"  figure: {rel(f.png)} (+ .svg)")


COMMANDS = [ablate]
