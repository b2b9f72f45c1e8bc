"""`csn experiment regularize`: the causal experiment (claim C4) as one command."""

from __future__ import annotations

from pathlib import Path

import click
from pydantic import Field

from csn import dist
from csn.cli.options import (
    CONTEXT,
    build,
    echo,
    exec_options,
    from_schema,
    launcher_options,
    launcher_request,
    tracker_option,
    trust_code_for_command,
    with_tracker,
)
from csn.core import presets
from csn.core.schema import Float
from csn.errors import CsnError
from csn.experiments import regime as rg
from csn.experiments.launcher import Submitted
from csn.experiments.regularize import (
    OnsetGrid,
    condition_curves,
    parse_onsets,
    regularize_experiment,
    regularized_stages,
)
from csn.experiments.runner import RunnerOptions
from csn.experiments.study import load_study
from csn.experiments.windows import (
    WindowsOptions,
    heatmap_text,
    make_plan,
    parse_seeds,
    plan_text,
    planned_power,
    power_text,
    run_windows,
    verdict_text,
)
from csn.report.fig_regularize import regularize_figures
from csn.report.html import build_report
from csn.runs.config import preset as get_preset
from csn.runs.run import check_run_path
from csn.training.loop import training_length


@click.group(context_settings=CONTEXT)
def experiment() -> None:
    """Multi-run experiments (conditions x seeds) with tables and figures.

    Every run's model comes from this command line (a preset and key=value overrides), never from a file, so a
    model given as 'package.module:factory' here is explicit: the experiment builds it without --trust-code."""
    trust_code_for_command(True)


class RegularizeOptions(RunnerOptions):
    """What `csn experiment regularize` takes (its command-line options are built from these fields; --parallel
    from RunnerOptions, --quiet from the execution group)."""

    preset: str = Field("fmnist", description="Training preset of every run.")
    alpha: Float | None = Field(None, description="Regularizer strength; loss = ce - alpha*R, so alpha < 0 suppresses "
                                "selectivity [default: the alpha of the shipped study of the preset's name, e.g. -1 "
                                "for fmnist].", json_schema_extra={"metavar": "FLOAT"})
    onsets: str | None = Field(None, description="Points in training where the regularizer switches on, one condition "
                               "each, on until the end: epochs (0,1), steps (step=0) or fractions of training (f0.33) "
                               "[default: step=0 and the late onset of the shipped study of the preset's name, e.g. "
                               "step=0,f0.3333 for fmnist].", json_schema_extra={"metavar": "POINTS"})
    seeds: str = Field("0,1,2", description="Seeds, comma-separated (or a count N for 0..N-1).")
    out: str | None = Field(None, description="Experiment directory [default: runs/regularize-<preset>].",
                            json_schema_extra={"metavar": "DIR"})
    no_selectivity: bool = Field(False, description="Skip the per-checkpoint selectivity pass (accuracy only).")


@experiment.command(context_settings=CONTEXT)
@from_schema(RegularizeOptions, include=("preset", "alpha", "onsets", "seeds", "out", "parallel", "no_selectivity"))
@exec_options("quiet")
@tracker_option
@launcher_options()
@click.argument("overrides", nargs=-1)
def regularize(overrides, quiet, tracker, **values) -> None:
    """Baseline vs the selectivity regularizer from each onset, same seeds for every condition.

    Trains the unregularized baseline and one regularized condition per onset (finished runs are
    skipped, interrupted ones resumed), measures CSI and eta^2 at every checkpoint, and writes
    regularize.parquet (per condition: final test accuracy mean, SE and every seed; final mean CSI
    and eta^2 of the regularized stages) plus figures under OUT/report/.

    \b
    Example (the study's C4 on Fashion-MNIST):
      csn experiment regularize --preset fmnist --alpha -2 --onsets 0,1 --seeds 3
    """
    dist.init_from_env()  # under torchrun: DDP training, sharded selectivity, rank 0 writes and reports
    with dist.same_outcome():
        launcher = launcher_request(values)
        o = build(RegularizeOptions, values)
        base = get_preset(o.preset).override(list(with_tracker(overrides, tracker)))
        seed_list = _parse_seeds(o.seeds)
        alpha, onsets = _study_defaults(o)
        onset_list = parse_onsets(onsets, *training_length(base))
    root = Path(o.out) if o.out else Path("runs") / f"regularize-{o.preset}"
    check_run_path(root, "--out")
    grid = OnsetGrid(alpha, onset_list, seed_list, root, parallel=o.parallel, selectivity=not o.no_selectivity,
                     launcher=launcher)
    try:
        per_seed, table, grouped = regularize_experiment(base, grid, progress=not quiet)
    except Submitted as e:
        echo(e.text())
        return
    if dist.is_main():
        stages = regularized_stages(next(r for runs in grouped.values() for r in runs))
        regularize_figures(condition_curves(grouped, stages), {c.name: c.onset for c in grid.conditions},
                           root / "report", stages=stages)
    cols = [c for c in ("condition", "seeds", "final_test_acc_mean", "final_test_acc_se", "final_csi_mean",
                        "final_eta2_mean", "final_test_acc_per_seed") if c in table]
    echo(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo(f"tables: {root / 'regularize.parquet'}, {root / 'regularize_runs.parquet'}; figures: {root / 'report'}")


def _study_defaults(o: RegularizeOptions) -> tuple[float, str]:
    """--alpha and --onsets as given, else from the shipped study of the preset's name (one place for them)."""
    if o.alpha is not None and o.onsets is not None:
        return o.alpha, o.onsets
    if o.preset not in presets.names("study"):
        raise CsnError(f"no shipped study is named {o.preset!r} to take the defaults from; give --alpha and --onsets "
                       "(e.g. --alpha -1 --onsets step=0,f0.3333).")
    study = load_study(o.preset)[1].study
    return (o.alpha if o.alpha is not None else study.alpha,
            o.onsets if o.onsets is not None else f"step=0,{study.late_onset}")


def _parse_seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except CsnError as e:
        raise CsnError(f"--{e}") from None


@experiment.command(context_settings=CONTEXT)
@from_schema(WindowsOptions)
@tracker_option
@launcher_options()
@click.argument("overrides", nargs=-1)
def windows(overrides, tracker, **values) -> None:
    """How early is early? The critical-period map of selectivity suppression.

    Trains the baseline and one condition per (alpha, window, stage set), the regularizer on only inside
    the window with alpha applied to every regularized stage in full (reg_reduce=sum), every condition with
    the same seeds (same initialization, same batches); measures final test accuracy (paired with the
    baseline of the same seed), accuracy at every checkpoint and, after BatchNorm re-estimation, at each
    window's end, the dose, and CSI/eta² of the regularized stages at the window's end and at the end of
    training; judges, per (alpha, stage set), whether the earliest window harms, whether early windows harm
    more than late ones and whether late windows cost little (promotion: whether it changes accuracy) by the
    rules declared in csn.experiments.window_stats (printed with the results). Prints the plan first;
    finished runs are skipped and interrupted ones resumed, so the same command continues an interrupted
    map. --dry-run also prints, per verdict, the power at the seeds asked, the minimal detectable effect
    there and the seeds the declared effect needs. OVERRIDES are key=value pairs for the training config of
    every run (e.g. epochs=2). Writes OUT/windows*.parquet, OUT/windows.json and the report
    OUT/report/index.html.

    \b
    Examples:
      csn experiment windows --preset fmnist                    # the map, about 1 h 33 min on 2 CPU cores
      csn experiment windows --preset fmnist --dry-run          # the plan and the verdicts' power only
      csn experiment windows --preset fmnist --dry-run --seeds 6
      csn experiment windows --preset fmnist --alphas -1,-5 --windows tile:8 --lr-schedule cosine --stages default,each
    """
    dist.init_from_env()  # under torchrun: DDP training, sharded selectivity, rank 0 writes and reports
    with dist.same_outcome():
        launcher = launcher_request(values)
        opts = build(WindowsOptions, values)
        plan = make_plan(opts, with_tracker(overrides, tracker))
    echo(plan_text(plan, launcher), err=True)
    if opts.dry_run:
        echo(power_text(plan, planned_power(plan)))
        return
    try:
        tables = run_windows(plan, progress=not opts.quiet, launcher=launcher)
    except Submitted as e:
        echo(e.text())
        return
    if dist.is_main():
        build_report([plan.root], out=plan.root / "report", progress=not opts.quiet)
    echo(heatmap_text(tables["windows"]))
    echo("")
    echo(verdict_text(tables["windows_verdicts"]))
    echo(f"tables: {plan.root}/windows*.parquet; report: {plan.root / 'report' / 'index.html'}")


@experiment.command(context_settings=CONTEXT)
@from_schema(rg.RegimeOptions)
@tracker_option
@launcher_options()
@click.argument("overrides", nargs=-1)
def regime(overrides, tracker, **values) -> None:
    """Which regularizer, which regime: where does suppressing selectivity early harm (claim C4 per cell)?

    Crosses two datasets (fashion-mnist, 10 classes; fmnist-pairs, 100 classes) with two regularizer
    statistics (csn's: class means over the global batch; the study's: class sums per group of 32 images,
    reg_mode=study), each with three conditions: the baseline (shared by both regularizers of a dataset),
    suppressed from step 0 and suppressed from a late onset (25 % of training) to the end, every condition
    with the same seeds. Per condition: final test accuracy, the dose, CSI/eta² and per-image sparsity of the
    regularized stages; per cell: C4 by rule set 2 (claims.c4_parts) with 95 % t intervals, in one table.
    Finished runs are skipped and interrupted ones resumed, so the same command continues. --pilot runs the
    alpha pilot instead. OVERRIDES are key=value pairs for every run's training config. Writes
    OUT/regime*.parquet, OUT/regime.json and the report OUT/report/index.html.

    \b
    Examples:
      csn experiment regime --dry-run          # the plan, the estimate and C4's power per cell; writes nothing
      csn experiment regime                    # 50 runs into runs/regime-fmnist, under 2 h on 2 CPU cores
      csn experiment regime --pilot            # the alpha pilot: 14 short runs into runs/regime-fmnist/pilot
      csn experiment regime --seeds 3 --parallel 1 --out runs/regime3
      csn experiment regime --preset smoke     # synthetic data, seconds per run
      csn report runs/regime-fmnist            # the "Which regularizer, which regime" section
    """
    dist.init_from_env()  # under torchrun: DDP training, one run after the other; rank 0 writes
    with dist.same_outcome():
        launcher = launcher_request(values)
        opts = build(rg.RegimeOptions, values)
        plan = rg.make_plan(opts, with_tracker(overrides, tracker))
    if opts.pilot:
        echo(rg.pilot_text_plan(plan), err=True)
        if not opts.dry_run:
            try:
                echo(rg.pilot_text(rg.run_pilot(plan, progress=not opts.quiet, launcher=launcher)))
            except Submitted as e:
                echo(e.text())
                return
            echo(f"tables: {plan.root / 'pilot' / 'pilot.parquet'}, {plan.root / 'pilot' / 'pilot_runs.parquet'}")
        return
    echo(rg.plan_text(plan, launcher), err=True)
    if opts.dry_run:
        return
    try:
        tables = rg.run_regime(plan, progress=not opts.quiet, launcher=launcher)
    except Submitted as e:
        echo(e.text())
        return
    if dist.is_main():
        build_report([plan.root], out=plan.root / "report", progress=not opts.quiet)
    echo(rg.cell_text(tables["regime"]))
    echo(f"tables: {plan.root}/regime*.parquet, {plan.root / 'regime.json'}; report: {plan.root / 'report' / 'index.html'}")


COMMANDS = [experiment]
