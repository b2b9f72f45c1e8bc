"""`csn probe`: class information per stage, a linear probe on each stage's units at every checkpoint."""

from __future__ import annotations

import click

from csn import dist
from csn.analysis.base import run_analysis
from csn.analysis.probe import Probe, describe_probe
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.report.fig_probe import probe_curves

DISTRIBUTE = ("Under torchrun: every process computes each checkpoint's probes on the whole data and rank 0 writes "
              "(split), or each process takes whole checkpoints (checkpoints: faster). Same rows either way.")


@click.command("probe", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Probe, plot=("plot", "log_epochs"), run_help={"distribute": DISTRIBUTE})
def probe(runs, **values) -> None:
    """Linear-probe accuracy of each stage's units at every checkpoint -> tables/probe.parquet.

    A stage's features are the units of its read points (the units CSI is measured on: each channel's spatial
    mean), standardized. The probe is softmax regression with an L2 penalty (--l2, default 1e-3; bias
    unpenalized), fit in float64 by Newton-CG (to a gradient near 1e-12) on a fixed seeded subset of the training
    split (--train-samples, default 2,000) and scored on the evaluation split (--split, default test). Columns:
    acc and loss (mean cross-entropy, nats) on the evaluation split, train_acc and train_loss on the training
    subset, n_features, n_constant (features constant on the training subset: dead units), iterations, grad_norm
    and converged.

    Beside CSI it separates "suppression removed class information" (probe accuracy falls) from "suppression
    spread it over units" (CSI falls, probe accuracy stays). Checkpoints already in the table are skipped.

    \b
    Examples:
      csn probe runs/fmnist --plot
      csn probe runs/fmnist --checkpoints step=0,f0.25,end --train-samples 5000
    """
    analysis, opts, plot = analysis_request(values, Probe)
    for res in run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True)):
        run, name = res.run, next(iter(res.tables))  # probe, or probe-TAG
        full = run.read(name)
        selected = res.rows["step"].nunique()
        echo(f"{run.name}: {selected} checkpoints ({len(res.computed)} computed, {selected - len(res.computed)} already "
             f"in the table), {full['stage'].nunique()} stages, probes fit on {int(full['train_samples'].iloc[0])} "
             f"training images, scored on {int(full['n_images'].iloc[0])} {analysis.options.split} images")
        echo(f"  wrote {rel(run.table_path(name))} ({len(full)} rows); over all "
             f"{full['step'].nunique()} checkpoints in the table:")
        for line in describe_probe(full):
            echo(f"    {line}")
        if plot.plot and dist.is_main():
            k = run.info.get("data", {}).get("num_classes")
            fig = probe_curves(full, run.report_dir, log_epochs=plot.log_epochs, name=name,
                               title=run.name, num_classes=int(k) if k else None)
            echo(f"  figure {rel(fig.png)} (+ .svg)")


COMMANDS = [probe]
