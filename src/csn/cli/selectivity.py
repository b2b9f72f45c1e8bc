"""`csn selectivity`: class selectivity (CSI) and class information (eta^2) of every unit at every checkpoint."""

from __future__ import annotations

from pathlib import Path

import click

from csn import dist
from csn.analysis.base import run_analysis
from csn.analysis.selectivity import Selectivity, describe_peaks, summarize, summarize_across_runs
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.errors import CsnError
from csn.report.fig_selectivity import bn_comparison, seeds_figures, selectivity_figures
from csn.runs.io import read_table
from csn.runs.run import Run


def _bn_pair(run: Run, sel_name: str, sel):
    """Another table of this run (same split and variant) with the opposite BN setting, for the comparison figure.

    Returns (table with BN re-estimated, table without) or None.
    """
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


@click.command("selectivity", context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@analysis_options(Selectivity)
def selectivity(runs, **values) -> None:
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
    analysis, opts, plot = analysis_request(values, Selectivity)
    results = run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True))
    draw = plot.plot and dist.is_main()
    tables = {}
    for res in results:
        run = res.run
        sel_name, cm_name = list(res.tables)
        selected = res[sel_name]["step"].nunique()
        full, n_cm = run.read(sel_name), len(run.read(cm_name))
        units = int((full["step"] == full["step"].iloc[0]).sum())
        echo(f"{run.name}: {selected} checkpoints ({len(res.computed)} computed, {selected - len(res.computed)} already in "
             f"the table), {units} units in {full['stage'].nunique()} stages, {analysis.options.split} split "
             f"({int(full['n_images'].iloc[0])} images)")
        echo(f"  wrote {rel(run.table_path(sel_name))} ({len(full)} rows) and {rel(run.table_path(cm_name))} ({n_cm} rows)")
        echo(f"  over all {full['step'].nunique()} checkpoints in the table:")
        for line in describe_peaks(summarize(full)):
            echo(f"    {line}")
        tables[run.name if run.name not in tables else str(run.path)] = full
        if draw:
            figs = selectivity_figures(full, run.report_dir, log_epochs=plot.log_epochs, prefix=sel_name, title=run.name)
            pair = _bn_pair(run, sel_name, full)
            if pair is not None:
                figs.append(bn_comparison(summarize(pair[0]), summarize(pair[1]), run.report_dir,
                                          log_epochs=plot.log_epochs, name=f"{sel_name}_bn_comparison", title=run.name))
            for f in figs:
                echo(f"  figure {rel(f.png)} (+ .svg)")
    if len(tables) > 1:
        try:
            across = summarize_across_runs(tables)
        except CsnError as e:
            echo(f"across runs: skipped ({e})", err=True)
            return
        echo(f"across {len(tables)} runs (mean over runs at the {across['step'].nunique()} shared checkpoints):")
        for line in describe_peaks(across):
            echo(f"    {line}")
        if draw:
            dest = Path(plot.out) if plot.out else results[0].run.report_dir
            sel_name = next(iter(results[0].tables))
            for f in seeds_figures(tables, dest, log_epochs=plot.log_epochs,
                                   prefix=sel_name.replace("selectivity", "selectivity_seeds", 1)):
                echo(f"  figure {rel(f.png)} (+ .svg)")


COMMANDS = [selectivity]
