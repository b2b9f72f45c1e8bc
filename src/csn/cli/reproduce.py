"""`csn reproduce`: the whole study in one command, ending in the claims table and a report."""

from __future__ import annotations

import click

from csn import dist
from csn.cli.options import CONTEXT, echo
from csn.experiments.claims import verdict_table
from csn.experiments.reproduce import reproduce as run
from csn.report.html import build_report


@click.command(context_settings=CONTEXT)
@click.option("--preset", default="fmnist", show_default=True,
              help="smoke (about 3 min, CI and a first look), fmnist (the embedded default, <= 30 min on 2 CPU cores), "
                   "imagenet (the study's ResNet-50 protocol, GPUs; needs --data-root).")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: runs/reproduce-<preset>].")
@click.option("--seeds", type=int, help="Baseline seeds (regularized conditions use min(seeds, preset's)).")
@click.option("--resume", is_flag=True, help="Continue an interrupted reproduction (finished steps are skipped).")
@click.option("--force", is_flag=True, help="Delete an existing reproduction in --out and start over.")
@click.option("--data-root", type=click.Path(file_okay=False), help="Dataset directory (ImageNet folder for --preset imagenet).")
@click.option("--quiet", is_flag=True, help="Only the step lines, no progress bars.")
def reproduce(preset, out, seeds, resume, force, data_root, quiet) -> None:
    """Reproduce the study: train, measure, ablate, regularize, compare, judge, report.

    \b
    Steps (each skipped when its outputs exist, so --resume continues where it stopped):
      1. baseline runs (N seeds, dense early checkpoints)      5. regularized runs (from step 0 and a later onset)
      2. selectivity (CSI, eta²) at every checkpoint             6. their selectivity
      3. ablation sweeps at early / peak / last checkpoints      7. CKA regularized vs baseline, matched checkpoints
      4. linearity measures at every checkpoint                  8. claims C1-C4 with verdicts, 9. the report
    Ends by printing the claims table and the report's path (OUT/report/index.html); the verdicts
    and the thresholds behind them are also in OUT/claims.json.
    """
    dist.init_from_env()  # under torchrun: DDP training, sharded analyses, rank 0 writes and reports
    progress = not quiet

    def report_of(out_dir):
        return build_report([out_dir], out=out_dir / "report", progress=progress)

    report, verdicts = run(preset, out, seeds=seeds, resume=resume, force=force, data_root=data_root, progress=progress,
                           report=report_of)
    echo(verdict_table(verdicts))
    echo(f"report: {report}")


COMMANDS = [reproduce]
