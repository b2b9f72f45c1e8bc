"""`csn reproduce` (the whole study in one command, on any dataset and model) and `csn claims` (its verdicts,
recomputed from the tables of a study folder)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from csn import dist
from csn.cli.options import (
    CONTEXT,
    echo,
    exec_options,
    launcher_options,
    launcher_request,
    tracker_option,
    with_tracker,
)
from csn.errors import CsnError
from csn.experiments.claims import verdict_table
from csn.experiments.judge import judge
from csn.experiments.launcher import Submitted
from csn.experiments.reproduce import plan_text, reproduction
from csn.experiments.reproduce import reproduce as run
from csn.experiments.study import launcher_table, load_study, study_names, study_text, to_toml
from csn.report.html import build_report


@dataclass(frozen=True)
class ReproduceArgs:
    """What `csn reproduce` was asked: its command-line values as one object (names as the options')."""

    preset: str | None
    config_file: str | None
    print_config: str | None
    dataset: str | None
    data_root: str | None
    model: str | None
    sets: tuple[str, ...]
    out: str | None
    seeds: int | None
    resume: bool
    force: bool
    dry_run: bool
    quiet: bool
    trust_code: bool
    tracker: str | None = None


def _print_config(name: str) -> None:
    _, cfg = load_study(name)
    head = [line[2:] if line.startswith("# ") else line[1:] for line in study_text(name).splitlines()
            if line.startswith("#")]
    header = "\n".join([f"csn study preset {name!r}, every key resolved; edit and run it with",
                        f"  csn reproduce --config {name}.toml", ""] + head)
    click.echo(to_toml(cfg, header), nl=False)


@click.command(context_settings=CONTEXT)
@click.option("--preset", help=f"A shipped study: {', '.join(study_names())} [default: fmnist]. smoke takes about "
              "3 min (CI, a first look), fmnist <= 30 min on 2 CPU cores, fmnist-vit the same study on a ViT, imagenet "
              "the study's ResNet-50 protocol (GPUs; needs --data-root).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), metavar="FILE",
              help="A study file (TOML or YAML): [train] and [study] tables, optionally preset = NAME to start from and a "
              "[launcher] table (where it runs).")
@click.option("--print-config", metavar="NAME", help="Print a shipped study as TOML (every key) to start a study file "
              "from, and exit.")
@click.option("--dataset", help="Shortcut for train.dataset: idx (MNIST-format folder), npz (one .npz file), "
              "imagefolder (train/ and val/ class folders), fashion-mnist, synthetic.")
@click.option("--data-root", type=click.Path(), help="Shortcut for train.data_root: the dataset's folder or .npz file.")
@click.option("--model", help="Shortcut for train.model: a csn model (resnet20, vit-tiny, ...), 'package.module:factory' "
              "or 'timm:NAME'.")
@click.option("--set", "sets", multiple=True, metavar="TABLE.KEY=VALUE",
              help="Override one key, e.g. --set study.alpha=-2 --set train.width=0.5 --set study.ablation.draws=5 "
                   "(repeatable).")
@click.option("--out", type=click.Path(file_okay=False), help="Output directory [default: runs/reproduce-<study>].")
@click.option("--seeds", type=int, help="Seeds of every condition (baseline and regularized; C4 pairs them) "
              "[default: the study's].")
@click.option("--resume", is_flag=True, help="Continue an interrupted reproduction (finished steps are skipped).")
@click.option("--force", is_flag=True, help="Delete an existing reproduction in --out and start over.")
@click.option("--dry-run", is_flag=True, help="Print the plan (runs, analyses and where, estimated time, each "
              "verdict's power, minimal detectable effect and seeds needed) and exit; writes nothing.")
@exec_options("quiet", "trust_code", help={
    "quiet": "Only the plan and the step lines, no progress bars.",
    "trust_code": "Let a model the study FILE names as 'package.module:factory' be imported and run (code named by "
                  "data runs only with this flag; --model typed here is explicit)."})
@tracker_option
@launcher_options()
def reproduce(**values) -> None:
    """Reproduce the study: train, measure, ablate, regularize, compare, judge, report.

    \b
    Prints its plan first (as --dry-run does), then runs these steps, each skipped when its outputs
    exist (so --resume continues where it stopped):
      1. train: baseline and regularized runs (from step 0 and from a later onset), the same N seeds
      2. selectivity (CSI, eta²): baseline runs from initialization through the first quarter of
         training and at the end (C1, each run's selectivity peak), regularized runs at the end (C4)
      3. ablation sweeps of the baseline runs at their selectivity peak and at the end (C2)
      4. linearity of the baseline runs at the peak and the end (C3; the linear classifier fit once)
      5. CKA regularized vs baseline at the end (no verdict reads it; study key cka_checkpoints)
      6. claims C1-C4 with verdicts, 7. the report
    With --launcher slurm steps 1-5 are Slurm jobs, one per training run and one per analysis task, all
    submitted at once, each waiting on the jobs it needs (Slurm dependencies); steps 6-7 run in this
    command once they have all completed. With --no-wait it submits them and returns, and the same
    command with --resume later waits for them and goes on.
    Ends by printing the claims table and the report's path (OUT/report/index.html); the verdicts
    and the thresholds behind them are also in OUT/claims.json (`csn claims OUT` recomputes them).

    \b
    A study file (csn reproduce --print-config fmnist > study.toml to start one):
      preset = "fmnist"                  # optional: start from a shipped study
      [train]                            # the keys of `csn train` configs, or preset = NAME + keys
      model = "resnet20"                 # a csn model, "package.module:factory" (any nn.Module) or "timm:NAME"
      layers = ["layer1.*", "layer2.*"]  # read points, one stage per pattern [default: the model's own]
      [study]
      seeds = 3
      late_onset = "f0.3333"             # times: step=64 (steps), 1.5 (epochs), f0.33 (fraction), end
      ablation_checkpoints = ["peak", "end"]   # peak: each baseline run's own selectivity peak
      [study.ablation]
      draws = 5
      [launcher]                         # optional: where it runs (the --launcher options' keys; flags override)
      launcher = "slurm"
      slurm_partition = "gpu"
    Times: the shipped studies count the early phase in steps and the rest in fractions of training.

    \b
    Examples:
      csn reproduce                                         # the fmnist study (ResNet-8 on Fashion-MNIST)
      csn reproduce --dry-run                               # its plan: work, time, power; writes nothing
      csn reproduce --dataset idx --data-root ~/mnist       # the same study on an MNIST-format folder
      csn reproduce --preset fmnist-vit --seeds 2           # on a Vision Transformer
      csn reproduce --config study.toml --set study.alpha=-2 --set train.width=0.5
    """
    config_file = values.get("config_file")
    launcher = launcher_request(values, launcher_table(config_file), f"study file {config_file}")
    a = ReproduceArgs(**values)
    if a.print_config:
        _print_config(a.print_config)
        return
    study = {"config": a.config_file, "dataset": a.dataset, "data_root": a.data_root, "model": a.model,
             "sets": with_tracker(a.sets, a.tracker, "train.tracker"),
             "seeds": a.seeds, "trust_code": a.trust_code}
    if a.dry_run:
        echo(plan_text(reproduction(a.preset, a.out, progress=False, **study), launcher=launcher))
        return
    dist.init_from_env()  # under torchrun: DDP training, sharded analyses, rank 0 writes and reports
    progress = not a.quiet

    def report_of(out_dir):
        return build_report([out_dir], out=out_dir / "report", progress=progress)

    try:
        report, verdicts = run(a.preset, a.out, resume=a.resume, force=a.force, progress=progress, report=report_of,
                               launcher=launcher, **study)
    except Submitted as e:
        echo(e.text("run the same command with --resume"))
        return
    echo(verdict_table(verdicts))
    echo(f"report: {report}")


@click.command(context_settings=CONTEXT)
@click.argument("study_dir", type=click.Path(file_okay=False), metavar="DIR")
@click.option("--late-onset", metavar="TIME", help="The late condition's onset, a point in training (an epoch 0.667, "
              "step=312 or f0.3333), when DIR holds several reg-from-X conditions [default: the study's, else the one "
              "nonzero onset].")
@click.option("--report/--no-report", "with_report", default=True, show_default=True,
              help="Also rebuild DIR/report/index.html with the verdicts.")
def claims(study_dir, late_onset, with_report) -> None:
    """Recompute the four verdicts of a study from its tables; write DIR/claims.json (and the report).

    \b
    DIR holds runs named <condition>-s<seed> (baseline-s0, reg-from-0-s0, reg-from-1-s0, ...), as
    `csn reproduce` and `csn experiment regularize --onsets 0,1` write them; finished runs only are used.
    Each claim needs its tables, and is inconclusive (saying what is missing) without them:
      C1  tables/selectivity.parquet of the baseline runs      (csn selectivity DIR/baseline-s*)
      C2  tables/ablation.parquet of the baseline runs, at each run's selectivity peak and last checkpoint
      C3  tables/linearity.parquet of the baseline runs        (csn linearity DIR/baseline-s*)
      C4  the regularized runs and the baseline with the same seeds, and their selectivity tables
    So an interrupted reproduction, or a study assembled by hand, can be judged.
    """
    out = Path(study_dir)
    if not out.is_dir():
        raise CsnError(f"{out} is not a folder; pass the folder of a reproduction (or of `csn experiment regularize`).")
    late, name, study, judged = _study_of(out)
    verdicts = judge(out, late_onset=late_onset if late_onset is not None else late, judge=judged, name=name,
                     study=study)
    echo(verdict_table(verdicts))
    echo(f"claims: {out / 'claims.json'}")
    if with_report:
        echo(f"report: {build_report([out], out=out / 'report', progress=False)}")


def _study_of(out: Path) -> tuple[float | None, str, dict, bool]:
    """(late onset epoch, name, study dict, judge) of a study folder: from its reproduce.json (this version's, or
    an earlier one's), else the study defaults."""
    path = out / "reproduce.json"
    if not path.is_file():
        return None, out.name, {}, True
    try:
        rec = json.loads(path.read_text())
        st = rec.get("reproduce_preset", {})
        name = rec.get("settings", {}).get("study") or st.get("name") or out.name
        late = rec.get("resolved", {}).get("late_onset_epoch", st.get("late_onset"))
        return (None if late is None else float(late)), name, st, bool(st.get("judge", True))
    except (json.JSONDecodeError, OSError, KeyError, TypeError, ValueError, AttributeError):
        raise CsnError(f"{path} is unreadable or not a csn reproduction record; fix or delete it (then pass "
                       "--late-onset if needed).") from None


COMMANDS = [reproduce, claims]
