"""`csn cka`: representational similarity (linear CKA) within a checkpoint, across checkpoints, or between runs."""

from __future__ import annotations

import os

import click

from csn.cli import CONTEXT, analysis_setup, echo
from csn.cli_linearity import parse_samples, rel


def _patterns(layers: tuple[str, ...]) -> list[str] | None:
    pats = [p.strip() for item in layers for p in item.split(",") if p.strip()]
    return pats or None


@click.command("cka", context_settings=CONTEXT)
@click.argument("run", type=click.Path(file_okay=False))
@click.argument("run_b", required=False, type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice(["within", "across", "runs"]),
              help="within: every layer pair of each checkpoint; across: each layer vs itself at a reference "
                   "checkpoint (and the previous one); runs: each layer of RUN vs the same layer of RUN_B at "
                   "matched checkpoints. [default: runs with RUN_B, else within]")
@click.option("--layers", multiple=True, metavar="PATTERN",
              help="Module names or globs ('layer2.*'), 'logits' for the output; repeat or comma-separate. "
                   "Default: the declared read points (every residual block's output) + logits.")
@click.option("--checkpoints", metavar="SPEC",
              help="Which checkpoints of RUN: all (default), first, last, steps '0,64', nearest epochs 'e0.5,e2', "
                   "epoch ranges '0:20'. RUN_B's are matched to them (same step, else nearest epoch).")
@click.option("--reference", default="last", show_default=True, metavar="first|last|STEP|eE",
              help="Reference checkpoint for --mode across.")
@click.option("--previous/--no-previous", default=True, show_default=True,
              help="With --mode across, also compare each checkpoint with the previous one of the run.")
@click.option("--samples", metavar="N|all", help="A seeded subset of N examples of the split [default: all].")
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True,
              help="Evaluation split of RUN (no augmentation); RUN_B is evaluated on the same data.")
@click.option("--batch-size", type=int, metavar="N",
              help="Examples per minibatch of the estimator (> 3) [default: the run's eval_batch_size].")
@click.option("--bn-recalibrate", type=int, metavar="N",
              help="Re-estimate BatchNorm statistics from N training batches before measuring (0 = off). "
                   "Default: 16 batches for checkpoints before epoch 1, where stored statistics lag the weights.")
@click.option("--plot", is_flag=True, help="Also draw the figures (PNG + SVG) into RUN's report/ folder.")
@click.option("--log-epochs/--linear-epochs", default=True, show_default=True,
              help="Symlog epoch axis (the action is in the first epoch) or a linear one.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def cka(run, run_b, mode, layers, checkpoints, reference, previous, samples, split, batch_size, bn_recalibrate, plot,
        log_epochs, device, threads, quiet) -> None:
    """Linear CKA between layers, checkpoints or runs -> RUN/tables/cka.parquet.

    \b
    X, Y: [n, units] activations of two layers on the same batch of n > 3 examples (a unit = a
    channel, its spatial mean), K = X X^T and L = Y Y^T with zeroed diagonals:
      HSIC1(K, L) = [tr(KL) + (1'K1)(1'L1)/((n-1)(n-2)) - 2/(n-2) 1'KL1] / (n(n-3))   (unbiased)
      CKA(X, Y)   = mean_b HSIC1(K,L) / sqrt(mean_b HSIC1(K,K) * mean_b HSIC1(L,L))   over batches b
    in float64; 1 = equal up to rotation and isotropic scaling, 0 = unrelated.
    [Kornblith et al. 2019, Similarity of neural network representations revisited;
     minibatch estimator: Nguyen, Raghu & Kornblith 2021, Do wide and deep networks learn the same
     things?]

    The study compared stage outputs and logits of regularized vs unregularized runs at matched
    epochs 0-20 (--mode runs). Work already in the table is skipped (resume).

    \b
    Examples:
      csn cka runs/fmnist --plot                                   # layer x layer, every checkpoint
      csn cka runs/fmnist --mode across --reference last --plot
      csn cka runs/reg-s0 runs/unreg-s0 --checkpoints 0:20 --plot  # two runs, same layers
    """
    from csn import distributed
    from csn.analysis.cka_run import cka_for_runs, describe_cka
    from csn.runs import Run

    dev = analysis_setup(device, threads)  # under torchrun: every rank streams its shard, rank 0 writes
    plot = plot and distributed.is_main()
    n = parse_samples(samples, None)
    progress = not quiet and not os.environ.get("CSN_NO_PROGRESS")
    run_a = Run(run)
    rb = Run(run_b) if run_b else None
    before = run_a.read("cka")
    df = cka_for_runs(run_a, rb, layers=_patterns(layers), checkpoints=checkpoints, mode=mode, reference=reference,
                      previous=previous, samples=n, split=split, batch_size=batch_size, bn_recalibrate=bn_recalibrate,
                      device=dev, progress=progress, log=lambda s: echo(s, err=True))
    full = run_a.read("cka")
    added = len(full) - (0 if before is None else len(before))
    what = sorted(set(df["comparison"])) if len(df) else []
    echo(f"{run_a.name}: CKA {', '.join(what) or 'nothing'} over {df['step_a'].nunique()} checkpoints, "
         f"{df['layer_a'].nunique()} layers, {int(df['samples'].iloc[0]) if len(df) else 0} {split} examples "
         f"({added} rows added)")
    echo(f"  wrote {rel(run_a.table_path('cka'))} ({len(full)} rows)")
    for line in describe_cka(df):
        echo(f"    {line}")
    if plot and len(df):
        from csn.report.fig_cka import cka_figures

        for f in cka_figures(df, run_a.report_dir, log_epochs=log_epochs, title=run_a.name):
            echo(f"  figure {rel(f.png)} (+ .svg)")


COMMANDS = [cka]
