"""`csn ablate`: do a checkpoint's most class-selective units matter more than random ones? (SPEC "Ablation (C2)")."""

from __future__ import annotations

import math
import os
from pathlib import Path

import click

from csn.cli import CONTEXT, analysis_setup, echo


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def _fmt_gap(row) -> str:
    se = row["gap_se"]
    spread = f" ± {se:.3f} SE over {int(row['draws'])} draws" if isinstance(se, float) and math.isfinite(se) else ""
    return f"{row['gap']:+.3f}{spread} (step {int(row['step'])}, epoch {row['epoch']:g})"


@click.command("ablate", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--stages", metavar="LIST",
              help="Comma-separated stages to ablate (e.g. layer1,layer2), or layer patterns ('layer2.*', 'layer2.1') "
                   "for a custom group. Default: every stage of the model.")
@click.option("--orders", default="selective,random,least", show_default=True, metavar="LIST",
              help="Which units go first: selective (highest CSI), random (seeded draws, the control), least (lowest CSI).")
@click.option("--draws", type=int, default=3, show_default=True,
              help="Random draws per (checkpoint, stage, n); their spread is the band around the control.")
@click.option("--grid", metavar="SPEC",
              help="Units ablated per block: counts '0,1,2,4,8' or fractions of the block width 'f:0,0.1,0.5,1' "
                   "(increasing; n=0 is always added). Default: 12 fractions from 0 to 1, dense at the start.")
@click.option("--checkpoints", metavar="SPEC",
              help="Which checkpoints: all (default), first, last, steps '0,64', nearest epochs 'e0.125,e5', "
                   "epoch ranges '0:1' (comma-separate to combine).")
@click.option("--rank-split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="Split whose CSI ranks the units (taken from tables/selectivity.parquet when it has it, else computed).")
@click.option("--score-split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="Split the ablated network is scored on (top-1, top-5, loss), always whole.")
@click.option("--bn-recalibrate", type=int, metavar="N",
              help="Re-estimate BatchNorm statistics from N training batches first (0 = off). Default: as "
                   "`csn selectivity` - 16 batches for checkpoints before epoch 1, where stored statistics lag.")
@click.option("--mode", type=click.Choice(["zero", "mean"]), default="zero", show_default=True,
              help="zero: set ablated units to 0 (the study). mean: set them to their mean over the rank split.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random draws (recorded in the table).")
@click.option("--samples", type=int, metavar="N",
              help="Score on a fixed seeded subset of N images of the score split (default: all of it).")
@click.option("--naive", is_flag=True,
              help="Reference protocol: a full forward pass per point (slow; gives the same numbers as the default).")
@click.option("--max-batch-masks", type=int, metavar="M",
              help="At most M masks share one forward pass (default: as many as a memory budget allows).")
@click.option("--distribute", type=click.Choice(["split", "checkpoints"]), default="split", show_default=True,
              help="Under torchrun: every process scores its shard of each checkpoint's split (counts summed), or "
                   "each process takes whole checkpoints (best with many checkpoints). Same rows either way.")
@click.option("--plot", is_flag=True, help="Also draw the figures (PNG + SVG) into each run's report/ folder.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def command(runs, stages, orders, draws, grid, checkpoints, rank_split, score_split, bn_recalibrate, mode, seed, samples,
            naive, max_batch_masks, distribute, plot, device, threads, quiet) -> None:
    """Ablate the most selective, random and least selective units, stage by stage, at every checkpoint.

    Per checkpoint and stage, each block's units are ranked by that checkpoint's class selectivity
    (CSI); for every n on the grid the top-n units of EVERY block of the stage are zeroed at once and
    the network is scored on the whole split. Random draws are the control. The stage input is
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
    from csn import distributed
    from csn.analysis.ablation import (
        check_orders,
        execute_plan,
        parse_grid,
        plan_ablation,
        summarize_ablation,
    )

    dev = analysis_setup(device, threads)  # under torchrun: see --distribute; rank 0 writes
    plot = plot and distributed.is_main()
    progress = not quiet and not os.environ.get("CSN_NO_PROGRESS")
    # validate every run before computing anything, so bad input never leaves rows behind (on every rank)
    with distributed.same_outcome():
        orders_t = check_orders(orders, draws)
        g = parse_grid(grid)
        plans = [plan_ablation(r, stages=stages, orders=orders_t, draws=draws, grid=g, checkpoints=checkpoints,
                               rank_split=rank_split, score_split=score_split, bn_recalibrate=bn_recalibrate,
                               naive=naive, device=dev, progress=progress, seed=seed, mode=mode,
                               max_batch_masks=max_batch_masks, score_samples=samples, distribute=distribute)
                 for r in runs]
    for plan in plans:
        run = plan.run
        df = execute_plan(plan)
        path = run.table_path("ablation")
        echo(f"ablation of {run.name}: {len(df)} rows for {df['step'].nunique()} checkpoints written to {_rel(path)}")
        gaps = summarize_ablation(df).gaps
        if {"selective", "random"} <= set(orders_t) and not gaps.empty:
            echo("  area gap, selective minus random (negative: selective units matter more):")
            for stage, gs in gaps.groupby("stage", sort=False):
                gs = gs.sort_values("step")
                first, last = gs.iloc[0], gs.iloc[-1]
                line = f"    {stage}: first {_fmt_gap(first)}"
                if len(gs) > 1:
                    line += f"; last {_fmt_gap(last)}"
                echo(line)
        if plot:
            from csn.report.fig_ablation import ablation_figures
            from csn.runs import read_table

            figs = ablation_figures(read_table(path), run.report_dir, title=run.name)
            for f in figs:
                echo(f"  figure: {_rel(f.png)} (+ .svg)")


COMMANDS = [command]
