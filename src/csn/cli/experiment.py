"""`csn experiment regularize`: the causal experiment (claim C4) as one command."""

from __future__ import annotations

from pathlib import Path

import click

from csn import dist
from csn.cli.options import CONTEXT, build, echo, from_schema
from csn.errors import CsnError
from csn.experiments.regularize import (
    condition_curves,
    conditions,
    parse_onsets,
    regularize_experiment,
    regularized_stages,
)
from csn.experiments.runner import RunnerOptions
from csn.report.fig_regularize import regularize_figures
from csn.runs.config import preset as get_preset

# Defaults for the fmnist preset, chosen from measurement (README, "Choosing alpha and the onset").
FMNIST_ALPHA = -1.0
FMNIST_LATE_ONSET = 1.0


@click.group(context_settings=CONTEXT)
def experiment() -> None:
    """Multi-run experiments (conditions x seeds) with tables and figures."""


@experiment.command(context_settings=CONTEXT)
@click.option("--preset", default="fmnist", show_default=True, help="Training preset of every run.")
@click.option("--alpha", type=float, default=FMNIST_ALPHA, show_default=True,
              help="Regularizer strength; loss = ce - alpha*R, so alpha < 0 suppresses selectivity.")
@click.option("--onsets", default=f"0,{FMNIST_LATE_ONSET:g}", show_default=True,
              help="Epochs at which the regularizer switches on (one condition each, on until the end).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds, comma-separated (or a count N for 0..N-1).")
@click.option("--out", type=click.Path(file_okay=False), help="Experiment directory [default: runs/regularize-<preset>].")
@from_schema(RunnerOptions)
@click.option("--no-selectivity", is_flag=True, help="Skip the per-checkpoint selectivity pass (accuracy only).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.argument("overrides", nargs=-1)
def regularize(preset, alpha, onsets, seeds, out, parallel, no_selectivity, quiet, overrides) -> None:
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
        parallel = build(RunnerOptions, {"parallel": parallel}).parallel
        base = get_preset(preset).override(list(overrides))
        seed_list = _parse_seeds(seeds)
        onset_list = parse_onsets(onsets, base.epochs)
    root = Path(out) if out else Path("runs") / f"regularize-{preset}"
    per_seed, table, grouped = regularize_experiment(base, alpha, onset_list, seed_list, root, parallel=parallel,
                                                     progress=not quiet, selectivity=not no_selectivity)
    if dist.is_main():
        stages = regularized_stages(next(r for runs in grouped.values() for r in runs))
        regularize_figures(condition_curves(grouped, stages), {c.name: c.onset for c in conditions(alpha, onset_list)},
                           root / "report", stages=stages)
    cols = [c for c in ("condition", "seeds", "final_test_acc_mean", "final_test_acc_se", "final_csi_mean",
                        "final_eta2_mean", "final_test_acc_per_seed") if c in table]
    echo(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    echo(f"tables: {root / 'regularize.parquet'}, {root / 'regularize_runs.parquet'}; figures: {root / 'report'}")


def _parse_seeds(text: str) -> list[int]:
    text = str(text).strip()
    try:
        if "," not in text:
            n = int(text)
            if n < 1:
                raise ValueError
            return list(range(n))
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CsnError(f"--seeds {text!r} is not a count or a comma-separated list of integers; write e.g. 3 or 0,1,2.") from None
    if len(set(vals)) != len(vals) or not vals:
        raise CsnError(f"--seeds {text!r} repeats a seed or is empty; give distinct integers.")
    return vals


COMMANDS = [experiment]
