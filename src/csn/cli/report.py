"""`csn report`: one self-contained HTML page over runs, a set of runs, or a whole experiment."""

from __future__ import annotations

import click

from csn.cli.options import CONTEXT, exec_options
from csn.core.progress import progress_enabled
from csn.report.html import build_report


@click.command("report", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True, type=click.Path(), metavar="RUN_OR_EXPERIMENT...")
@click.option("--out", type=click.Path(), metavar="DIR",
              help="Folder for index.html and its figures (or a path ending in .html) "
                   "[default: PATH/report; for several paths, the first's parent /report].")
@click.option("--title", help="Page title [default: 'csn report: <name>'].")
@exec_options("quiet")
def report(paths, out, title, quiet) -> None:
    """Write one HTML page (figures beside it) from the tables of runs or an experiment.

    \b
    RUN_OR_EXPERIMENT: run directories (holding run.json) and/or experiment directories (holding runs,
    e.g. baseline-s0, reg-from-0-s1, maybe claims.json and regularize.parquet). Runs named
    <condition>-s<seed> are grouped into conditions with bands over seeds.

    \b
    The page has, as far as the tables exist:
      - the claims table with verdicts and thresholds (claims.json of an experiment)
      - configuration, versions, and where BatchNorm statistics were re-estimated
      - training curves and final accuracy per condition
      - selectivity (CSI, eta²) per stage and block, CSI distributions   (csn selectivity)
      - ablation curves, areas and selective-vs-random gaps               (csn ablate)
      - linearity measures                                                (csn linearity)
      - accuracy and selectivity per regularization onset                 (csn experiment regularize)
      - how early is early: the critical-period map, its verdicts         (csn experiment windows)
      - CKA heatmaps and curves                                           (csn cka)
    A section whose table is missing is replaced by a note naming the command that makes it.
    The page works offline and opened from disk: PNG figures beside it, no network resources.

    \b
    Examples:
      csn report runs/fmnist
      csn report runs/reproduce-fmnist                  # an experiment: claims, conditions, seeds
      csn report runs/a runs/b --out figs/ab --title "a vs b"
    """
    index = build_report(list(paths), out=out, title=title, progress=progress_enabled(not quiet))
    click.echo(str(index))


COMMANDS = [report]
