"""`csn linearity`: how close the network is to a linear model at every checkpoint (claim C3)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from csn.cli import CONTEXT, analysis_setup, echo
from csn.errors import CsnError


def rel(p) -> str:
    """A path relative to the working directory where possible (for messages)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def parse_samples(value: str | None, default: int | None) -> int | None:
    """--samples N | all -> an int, or None for the whole split."""
    if value is None:
        return default
    v = str(value).strip().lower()
    if v == "all":
        return None
    try:
        n = int(v)
    except ValueError:
        raise CsnError(f"--samples must be a number of examples or 'all', got {value!r}.") from None
    if n <= 0:
        raise CsnError(f"--samples must be a positive number of examples or 'all', got {value!r}.")
    return n


@click.command("linearity", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--checkpoints", metavar="SPEC",
              help="Which checkpoints: all (default), first, last, steps '0,64', nearest epochs 'e0.5,e2', epoch "
                   "ranges '0:1' (comma-separate to combine).")
@click.option("--measures", default="linear,linearized,relu", show_default=True, metavar="GROUPS",
              help="Comma-separated measure groups: linear, linearized, relu.")
@click.option("--samples", metavar="N|all",
              help="Examples (a seeded subset of the split) for the linearized and ReLU measures "
                   "[default: 2000; 'all' = the whole split]. The linear-model measures always use the whole split.")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="Evaluation split (no augmentation).")
@click.option("--fit-epochs", type=int, metavar="N",
              help="Epochs of the linear classifier's fit [default: 10]; it is fit once per run and cached.")
@click.option("--bn-recalibrate", type=int, metavar="N",
              help="Re-estimate BatchNorm statistics from N training batches before measuring (0 = off). "
                   "Default: 16 batches for checkpoints before epoch 1, where stored statistics lag the weights.")
@click.option("--plot", is_flag=True, help="Also draw the figure (PNG + SVG) into each run's report/ folder.")
@click.option("--log-epochs/--linear-epochs", default=True, show_default=True,
              help="Symlog epoch axis (the action is in the first epoch) or a linear one.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the across-seed figure of several runs [default: the first run's report/].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def linearity(runs, checkpoints, measures, samples, split, fit_epochs, bn_recalibrate, plot, log_epochs, out, device,
              threads, quiet) -> None:
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
    from csn import distributed
    from csn.analysis.linearity_run import (
        DEFAULT_SAMPLES,
        check_groups,
        describe_linearity,
        linearity_for_run,
    )
    from csn.runs import Run

    dev = analysis_setup(device, threads)  # under torchrun: every rank streams its shard, rank 0 writes
    plot = plot and distributed.is_main()
    n = parse_samples(samples, DEFAULT_SAMPLES)
    groups = check_groups(measures)
    progress = not quiet and not os.environ.get("CSN_NO_PROGRESS")
    run_objs = []
    with distributed.same_outcome():  # validate everything before any work (under torchrun: on every rank)
        for r in runs:
            run = Run(r)
            run.select(checkpoints)
            run_objs.append(run)

    tables = {}
    for run in run_objs:
        before = run.read("linearity")
        df = linearity_for_run(run, checkpoints=checkpoints, split=split, samples=n, bn_recalibrate=bn_recalibrate,
                               device=dev, progress=progress, linear_epochs=fit_epochs, measures=groups,
                               log=lambda s: echo(s, err=True))
        full = run.read("linearity")
        n_before = 0 if before is None else len(before)
        echo(f"{run.name}: {df['step'].nunique()} checkpoints, {df['measure'].nunique()} measures "
             f"({len(full) - n_before} rows added), {split} split")
        echo(f"  wrote {rel(run.table_path('linearity'))} ({len(full)} rows)")
        lm = run.path / "tables" / "linear_model.safetensors"
        if "linear" in groups and lm.is_file():
            echo(f"  linear classifier: {rel(lm)}")
        for line in describe_linearity(df):
            echo(f"    {line}")
        key = run.name if run.name not in tables else str(run.path)
        tables[key] = df
        if plot:
            from csn.report.fig_linearity import linearity_figure

            f = linearity_figure(df, run.report_dir, log_epochs=log_epochs, title=run.name)
            echo(f"  figure {rel(f.png)} (+ .svg)")

    if len(tables) > 1:
        from csn.analysis.linearity_run import summarize_linearity

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
        if plot:
            from csn.report.fig_linearity import linearity_figure

            dest = Path(out) if out else run_objs[0].report_dir
            f = linearity_figure(tables, dest, log_epochs=log_epochs, name="linearity_seeds",
                                 title=f"{len(tables)} runs")
            echo(f"  figure {rel(f.png)} (+ .svg)")


COMMANDS = [linearity]
