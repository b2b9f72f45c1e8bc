"""`csn cka`: representational similarity (linear CKA) within a checkpoint, across checkpoints, or between runs."""

from __future__ import annotations

import click

from csn import dist
from csn.analysis.base import run_analysis
from csn.analysis.cka import Cka, describe_cka
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.report.fig_cka import cka_figures
from csn.runs.run import Run
from csn.runs.table import tagged

_CHECKPOINTS_HELP = ("Which checkpoints of RUN: all (default), first, last/end, the checkpoint nearest 'step=64', an "
                     "epoch '1.5' or 'f0.25', ranges '0:20'. RUN_B's are matched to them (same step, else nearest "
                     "epoch).")


@click.command("cka", context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("run_b", required=False, type=click.Path(file_okay=False))
@analysis_options(Cka, exclude=("run_b",), plot=("plot", "log_epochs"), run_help={"checkpoints": _CHECKPOINTS_HELP})
def cka(run, run_b, **values) -> None:
    """Linear CKA between layers, checkpoints or runs -> RUN/tables/cka.parquet.

    \b
    X, Y: [n, units] activations of two layers on the same batch of n > 3 examples (a unit = a
    channel, its spatial mean), K = X X^T and L = Y Y^T with zeroed diagonals:
      HSIC1(K, L) = [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))   (unbiased)
      CKA(X, Y)   = mean_b HSIC1(K,L) / sqrt(mean_b HSIC1(K,K) * mean_b HSIC1(L,L))   over batches b
    in float64; 1 = equal up to rotation and isotropic scaling, 0 = unrelated.
    [Kornblith et al. 2019, Similarity of neural network representations revisited;
     minibatch estimator: Nguyen, Raghu & Kornblith 2021, Do wide and deep networks learn the same
     things?]

    The study compared stage outputs and logits of regularized vs unregularized runs at matched
    epochs 0-20 (--mode runs). Work already in the table is skipped (resume).

    \b
    Examples:
      csn cka runs/fmnist --plot                                   # layer x layer, every checkpoint
      csn cka runs/fmnist --mode across --reference last --plot
      csn cka runs/reg-s0 runs/unreg-s0 --checkpoints 0:20 --plot  # two runs, same layers
    """
    analysis, opts, plot = analysis_request(values, Cka, run_b=run_b)
    run_a = Run(run)
    name = tagged(Cka.tables[0].name, opts.tag)
    before = run_a.read(name)
    res = run_analysis(run_a, analysis, opts, log=lambda s: echo(s, err=True))
    df, full = res.rows, run_a.read(name)
    n_full = 0 if full is None else len(full)
    added = n_full - (0 if before is None else len(before))
    what = sorted(set(df["comparison"])) if len(df) else []
    echo(f"{run_a.name}: CKA {', '.join(what) or 'nothing'} over {df['step_a'].nunique()} checkpoints, "
         f"{df['layer_a'].nunique()} layers, {int(df['samples'].iloc[0]) if len(df) else 0} {analysis.options.split} "
         f"examples ({added} rows added)")
    echo(f"  wrote {rel(run_a.table_path(name))} ({n_full} rows)")
    for line in describe_cka(df):
        echo(f"    {line}")
    if plot.plot and dist.is_main() and len(df):
        for f in cka_figures(df, run_a.report_dir, log_epochs=plot.log_epochs, prefix=name, title=run_a.name):
            echo(f"  figure {rel(f.png)} (+ .svg)")


COMMANDS = [cka]
