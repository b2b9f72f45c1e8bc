"""`csn linearity`: how close the network is to a linear model at every checkpoint (claim C3)."""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd

from csn import dist
from csn.analysis.base import Result, run_analysis
from csn.analysis.linearity import (
    LINEARITY,
    Linearity,
    describe_linearity,
    linear_model_path,
    summarize_linearity,
)
from csn.cli.options import CONTEXT, PlotOptions, analysis_options, analysis_request, echo, rel
from csn.errors import CsnError
from csn.report.fig_linearity import linearity_figure
from csn.runs.run import Run
from csn.runs.table import tagged


def _selected_rows(res: Result, full: pd.DataFrame) -> pd.DataFrame:
    """Every row of the table at the checkpoints of the request (also measures of other groups computed before)."""
    steps = set(res.rows["step"].tolist())
    return full[full["step"].isin(steps)].sort_values(["step"], kind="stable").reset_index(drop=True)


def _across_runs(tables: dict[str, pd.DataFrame], plot: PlotOptions, draw: bool, first: Run, name: str) -> None:
    """The lines (and the figure) of the mean over several runs at their shared checkpoints."""
    try:
        across = summarize_linearity(tables)
    except CsnError as e:
        echo(f"across runs: skipped ({e})", err=True)
        return
    if across.empty:
        echo("across runs: skipped (the runs share no checkpoint step)", err=True)
        return
    echo(f"across {len(tables)} runs (mean over runs at the {across['step'].nunique()} shared checkpoints):")
    for line in describe_linearity(tables):
        echo(f"    {line}")
    if draw:
        dest = Path(plot.out) if plot.out else first.report_dir
        f = linearity_figure(tables, dest, log_epochs=plot.log_epochs,
                             name=name.replace("linearity", "linearity_seeds", 1), title=f"{len(tables)} runs")
        echo(f"  figure {rel(f.png)} (+ .svg)")


@click.command("linearity", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Linearity)
def linearity(runs, **values) -> None:
    """How linear the network is at every checkpoint -> tables/linearity.parquet (step, epoch, measure, value).

    \b
    F = the network's prediction, Y = the label, theta_0 = the step-0 checkpoint (initialization).
    linear      agreement = P(F = L); mu_Y(F; L) = I(F;Y) - I(F;Y|L) in bits (<= I(L;Y)) and its
                share mu_Y / I(F;Y); L = softmax regression on the flattened inputs, fit once per
                run on the training split (Adam, deterministic), cached in tables/
                [Kalimeris et al. 2019, SGD on neural networks learns functions of increasing
                complexity]
    linearized  f_lin = f(theta_0) + J(theta_0)(theta_t - theta_0), one JVP per batch;
                agreement = P(argmax f_t = argmax f_lin), distance = ||f_t - f_lin|| / ||f_t - f_0||;
                also around the previous checkpoint (_prev)
                [Lee et al. 2019, Wide neural networks evolve as linear models; Fort et al. 2020]
    relu        fraction of ReLU on/off states (units x inputs) equal to theta_0's / previous ckpt's
                [a ReLU net is linear where its pattern is fixed; cf. Hanin & Rolnick 2019]

    At step 0 the distance to the linearization is 0/0 and recorded as NaN; _prev measures are NaN at
    the first checkpoint. Checkpoints already in the table are skipped, so an interrupted run
    continues where it stopped.

    \b
    Examples:
      csn linearity runs/fmnist --plot
      csn linearity runs/fmnist --checkpoints 0:1 --samples all
      csn linearity runs/fmnist-s0 runs/fmnist-s1 runs/fmnist-s2 --plot --out runs/figs
    """
    analysis, opts, plot = analysis_request(values, Linearity)
    with dist.same_outcome():
        run_objs = [Run(r) for r in runs]
    name = tagged(LINEARITY.name, opts.tag)
    before = [run.read(name) for run in run_objs]
    results = run_analysis(run_objs, analysis, opts, log=lambda s: echo(s, err=True))
    draw = plot.plot and dist.is_main()
    o = analysis.options
    tables = {}
    for res, old in zip(results, before):
        run = res.run
        full = run.read(name)
        df = _selected_rows(res, full)
        echo(f"{run.name}: {df['step'].nunique()} checkpoints, {df['measure'].nunique()} measures "
             f"({len(full) - (0 if old is None else len(old))} rows added), {o.split} split")
        echo(f"  wrote {rel(run.table_path(name))} ({len(full)} rows)")
        lm = linear_model_path(run)
        if "linear" in o.measures and lm.is_file():
            echo(f"  linear classifier: {rel(lm)}")
        for line in describe_linearity(df):
            echo(f"    {line}")
        tables[run.name if run.name not in tables else str(run.path)] = df
        if draw:
            f = linearity_figure(df, run.report_dir, log_epochs=plot.log_epochs, name=name, title=run.name)
            echo(f"  figure {rel(f.png)} (+ .svg)")
    if len(tables) > 1:
        _across_runs(tables, plot, draw, run_objs[0], name)


COMMANDS = [linearity]
