"""`csn accuracy`: test accuracy of checkpoints after BatchNorm re-estimation (what C4 and the map compare)."""

from __future__ import annotations

import click

from csn.analysis.accuracy import Accuracy
from csn.analysis.base import run_analysis
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel


@click.command("accuracy", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Accuracy)
def accuracy(runs, **values) -> None:
    """Top-1 accuracy and mean cross-entropy of checkpoints -> tables/accuracy.parquet.

    The training loop scores each checkpoint with the BatchNorm running statistics it had; early in training,
    and at a constant learning rate, those lag the weights. This scores the checkpoints the way every analysis
    reads them: BatchNorm statistics re-estimated on a copy (--bn-recalibrate N; by default for checkpoints
    before epoch 1). C4 and the critical-period map compare final accuracies measured this way
    (--checkpoints last --bn-recalibrate 16, as `csn reproduce` and the experiments run it).

    \b
    Examples:
      csn accuracy runs/fmnist --checkpoints last --bn-recalibrate 16
      csn accuracy runs/reproduce-fmnist/*-s? --checkpoints last --bn-recalibrate 16
    """
    analysis, opts, _plot = analysis_request(values, Accuracy)
    for res in run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True)):
        for r in res["accuracy"].itertuples():
            echo(f"{res.run.name}: step {r.step} (epoch {r.epoch:g}): top-1 {r.acc:.4f}, loss {r.loss:.4f} on "
                 f"{r.n_images} {r.split} images, BatchNorm re-estimated from {r.bn_recalibrated} batches")
        echo(f"  wrote {rel(res.run.table_path('accuracy'))}")


COMMANDS = [accuracy]
