"""`csn fisher`: the trace of the Fisher information of each stage's weights at every checkpoint."""

from __future__ import annotations

import click

from csn import dist
from csn.analysis.base import run_analysis
from csn.analysis.fisher import FISHER, Fisher
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.report.fig_fisher import fisher_figure
from csn.runs.table import tagged


@click.command("fisher", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Fisher, plot=("plot",))
def fisher(runs, **values) -> None:
    """Trace of the Fisher information of each stage's weights at every checkpoint -> tables/fisher.parquet.

    \b
    tr F_stage = (1/N) sum_i E_{y ~ p(y|x_i)} ||grad_{w_stage} log p(y|x_i)||^2 on N examples of the split
    (default: a fixed subset of 1,000 test images), per stage (the parameters of the modules at its read
    points), 'other' (the rest) and 'all', with trace_se (standard error over the examples); per-example
    gradients with torch.func, in eval mode.
    [Achille, Rovere, Soatto, ICLR 2019, Critical learning periods in deep networks]

    \b
    --labels sampled  y drawn from the model's p(y|x), one seeded draw per example (default): an unbiased
                      estimate of the Fisher information, as Achille et al. define it
    --labels true     the data's labels: the empirical Fisher, not the Fisher (biased while the model
                      does not fit the data) [Kunstner et al., NeurIPS 2019]
    --labels exact    the expectation over every class in closed form (C times the cost)

    Checkpoints already in the table are skipped, so an interrupted run continues where it stopped.

    \b
    Examples:
      csn fisher runs/fmnist --plot
      csn fisher runs/fmnist --checkpoints 0:1 --labels exact --samples 500 --tag exact
    """
    analysis, opts, plot = analysis_request(values, Fisher)
    name = tagged(FISHER.name, opts.tag)
    for res in run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True)):
        run, df = res.run, res.rows
        echo(f"{run.name}: {df['step'].nunique()} checkpoints ({len(res.computed)} computed), "
             f"{len(df)} rows of {name} -> {rel(run.table_path(name))}")
        every = df[df["stage"] == "all"].sort_values("step")
        if len(every):
            peak = every.loc[every["trace"].idxmax()]
            echo(f"  tr F (all {int(peak['n_params']):,} parameters) peaks at step {int(peak['step'])} "
                 f"(epoch {peak['epoch']:g}): {peak['trace']:.4g}")
        if plot.plot and dist.is_main() and len(df):
            f = fisher_figure(run.read(name), run.report_dir, name=name, title=run.name)
            echo(f"  figure {rel(f.png)} (+ .svg)")


COMMANDS = [fisher]
