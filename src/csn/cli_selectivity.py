"""`csn selectivity`: class selectivity (CSI) and class information (eta^2) of every unit at every checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import click

from csn.cli import CONTEXT, analysis_setup, echo
from csn.errors import CsnError


def _split_patterns(layers: tuple[str, ...]) -> list[str] | None:
    """--layers may be repeated and/or comma-separated."""
    pats = [p.strip() for item in layers for p in item.split(",") if p.strip()]
    return pats or None


def _bn_pair(run, sel_name: str, sel):
    """Another table of this run (same split and variant) with the opposite BN setting, for the comparison figure.

    Returns (table with BN re-estimated, table without) or None.
    """
    from csn.runs import read_table

    if sel is None or sel.empty:
        return None
    mine_on = bool((sel["bn_recalibrated"] > 0).any())
    for p in sorted((run.path / "tables").glob("selectivity*.parquet")):
        if p.stem == sel_name:
            continue
        try:
            other = read_table(p)
        except CsnError:
            continue
        if not {"bn_recalibrated", "split", "variant", "csi"} <= set(other.columns) or other.empty:
            continue
        if set(other["split"]) != set(sel["split"]) or set(other["variant"]) != set(sel["variant"]):
            continue
        other_on = bool((other["bn_recalibrated"] > 0).any())
        if mine_on and not other_on:
            return sel, other
        if other_on and not mine_on:
            return other, sel
    return None


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


@click.command("selectivity", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="Evaluation split the class means are taken over (no augmentation).")
@click.option("--layers", multiple=True, metavar="PATTERN",
              help="Read points: module names or globs ('layer2.*', 'features.3'); repeat or comma-separate. "
                   "Default: the model's declared read points (every residual block's output).")
@click.option("--checkpoints", metavar="SPEC",
              help="Which checkpoints: all (default), first, last, steps '0,64,128', nearest epochs 'e0.5,e2', "
                   "epoch ranges '0:1' (comma-separate to combine).")
@click.option("--bn-recalibrate", type=int, metavar="N",
              help="Re-estimate BatchNorm statistics from N training batches before measuring (0 = off). "
                   "Default: 16 batches for checkpoints before epoch 1, where stored statistics lag the weights.")
@click.option("--variant", type=click.Choice(["mean", "study"]), default="mean", show_default=True,
              help="'mean': csn's CSI (class means, eps 1e-7). 'study': the original study's code (class sums, "
                   "eps 1e-6), for comparison.")
@click.option("--samples", type=int, metavar="N",
              help="Measure on a fixed random subset of N images of the split (faster, noisier) [default: all].")
@click.option("--tag", metavar="NAME",
              help="Write tables/selectivity-NAME.parquet (and class_means-NAME) instead, e.g. to keep a "
                   "--bn-recalibrate 0 table beside the default one.")
@click.option("--plot", is_flag=True, help="Also draw the figures (PNG + SVG) into each run's report/ folder.")
@click.option("--log-epochs/--linear-epochs", default=True, show_default=True,
              help="Symlog epoch axis (the action is in the first epoch) or a linear one.")
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the across-seed figures of several runs [default: the first run's report/].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def selectivity(runs, split, layers, checkpoints, bn_recalibrate, variant, samples, tag, plot, log_epochs, out, device,
                threads, quiet) -> None:
    """Class selectivity of every unit at every checkpoint -> tables/selectivity.parquet.

    A unit is one channel of a read point (its spatial mean per image). Its class selectivity index
    compares its mean response to its preferred class with its mean response to the other classes:

    \b
        CSI = (mu_max - mu_rest) / (mu_max + mu_rest + 1e-7)
        mu_max = largest class mean, mu_rest = mean of the other class means

    0 = no class preference, 1 = responds to one class only (post-ReLU units). Beside it, eta^2 is
    the between-class share of the unit's variance: class information that, unlike CSI, a shared
    offset cannot hide. Dead units (always 0) get CSI 0 and are counted as dead.

    One streaming pass over the split per checkpoint; checkpoints already in the table are skipped,
    so an interrupted run continues where it stopped. Per-class means go to
    tables/class_means.parquet (CSI over any subset of classes can be recomputed from them).

    \b
    Examples:
      csn selectivity runs/fmnist --plot
      csn selectivity runs/fmnist --checkpoints 0:1 --layers 'layer1.*'
      csn selectivity runs/fmnist --bn-recalibrate 0 --tag nobn --plot    # adds a BN on/off figure
      csn selectivity runs/fmnist-s0 runs/fmnist-s1 runs/fmnist-s2 --plot --out runs/figs
    """
    from csn import distributed
    from csn.analysis.selectivity_run import (
        describe_peaks,
        selectivity_for_run,
        summarize,
        summarize_runs,
        table_names,
    )
    from csn.runs import Run
    from csn.units import resolve_layers

    dev = analysis_setup(device, threads)  # under torchrun: every rank streams its shard, rank 0 writes
    plot = plot and distributed.is_main()
    patterns = _split_patterns(layers)
    sel_name, cm_name = table_names(tag)
    progress = not quiet and not os.environ.get("CSN_NO_PROGRESS")

    # validate everything first: a bad run, selector or layer pattern stops before any work
    run_objs = []
    with distributed.same_outcome():  # under torchrun: a bad request fails on every rank together
        for r in runs:
            run = Run(r)
            run.select(checkpoints)
            resolve_layers(run.build_model(), patterns)
            run_objs.append(run)

    tables = {}
    for run in run_objs:
        before = run.read(sel_name)
        selected = {c.step for c in run.select(checkpoints)}
        already = len(selected & set(before["step"].unique().tolist())) if before is not None else 0
        sel, _cm = selectivity_for_run(run, split=split, layers=patterns, checkpoints=checkpoints,
                                       bn_recalibrate=bn_recalibrate, device=dev, progress=progress,
                                       variant=variant, tag=tag, samples=samples, log=lambda s: echo(s, err=True))
        full = run.read(sel_name)
        n_cm = len(run.read(cm_name))
        n_steps = full["step"].nunique()
        units = int((full["step"] == full["step"].iloc[0]).sum())
        echo(f"{run.name}: {len(selected)} checkpoints ({len(selected) - already} computed, {already} already "
             f"in the table), {units} units in {full['stage'].nunique()} stages, {split} split "
             f"({int(full['n_images'].iloc[0])} images)")
        echo(f"  wrote {_rel(run.table_path(sel_name))} ({len(full)} rows) and "
             f"{_rel(run.table_path(cm_name))} ({n_cm} rows)")
        echo(f"  over all {n_steps} checkpoints in the table:")
        for line in describe_peaks(summarize(full)):
            echo(f"    {line}")
        key = run.name if run.name not in tables else str(run.path)
        tables[key] = full
        if plot:
            from csn.report.fig_selectivity import bn_comparison, selectivity_figures

            prefix = sel_name
            figs = selectivity_figures(full, run.report_dir, log_epochs=log_epochs, prefix=prefix, title=run.name)
            pair = _bn_pair(run, sel_name, full)
            if pair is not None:
                figs.append(bn_comparison(summarize(pair[0]), summarize(pair[1]), run.report_dir,
                                          log_epochs=log_epochs, name=f"{prefix}_bn_comparison", title=run.name))
            for f in figs:
                echo(f"  figure {_rel(f.png)} (+ .svg)")

    if len(tables) > 1:
        try:
            across = summarize_runs(tables)
        except CsnError as e:
            echo(f"across runs: skipped ({e})", err=True)
            return
        echo(f"across {len(tables)} runs (mean over runs at the {across['step'].nunique()} shared checkpoints):")
        for line in describe_peaks(across):
            echo(f"    {line}")
        if plot:
            from csn.report.fig_selectivity import seeds_figures

            dest = Path(out) if out else run_objs[0].report_dir
            for f in seeds_figures(tables, dest, log_epochs=log_epochs,
                                   prefix=sel_name.replace("selectivity", "selectivity_seeds", 1)):
                echo(f"  figure {_rel(f.png)} (+ .svg)")


COMMANDS = [selectivity]
