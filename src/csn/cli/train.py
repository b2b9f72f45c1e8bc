"""`csn train` and `csn info`: make a run directory, and show what one holds."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import click

from csn import dist
from csn.cli.options import CONTEXT, exec_options, from_schema
from csn.errors import CsnError
from csn.models.external import require_trust
from csn.runs.config import TrainConfig, load_config_file
from csn.runs.config import preset as get_preset
from csn.runs.run import Run
from csn.training import loop

SHORTCUTS = ("dataset", "data_root", "model", "epochs", "optimizer", "seed", "checkpoints", "reg_alpha", "reg_window", "reg_schedule",
             "reg_layers", "reg_mode", "reg_statistic", "reg_group", "reg_reduce", "device", "threads", "tracker")
"""Config keys that `csn train` also takes as --options."""


@click.command(context_settings=CONTEXT)
@click.option("--preset", help="Start from a preset: smoke, fmnist, imagenet-resnet50.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or YAML config file (may name a preset).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/<name>].")
@click.option("--resume", is_flag=True, help="Continue an existing run from its last checkpoint (same config).")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@from_schema(TrainConfig, include=SHORTCUTS)
@exec_options("quiet", "trust_code", help={"trust_code": "Let a model named as 'package.module:factory' in --config's "
              "file (or in run.json with --resume) be imported and run; code typed here (--model, model=) needs no flag."})
@click.argument("overrides", nargs=-1)
def train(preset, config_file, out, resume, force, quiet, trust_code, overrides, **flags) -> None:
    """Train a classifier with dense early checkpoints into a run directory.

    OVERRIDES are key=value pairs for any config key (e.g. width=2 lr_schedule=cosine); unknown keys
    are reported with the closest valid one.

    \b
    Examples:
      csn train --preset fmnist
      csn train --preset fmnist --seed 1 --reg-alpha -2 --reg-window 0:end --out runs/reg0
      csn train --dataset idx --data-root ~/mnist --model resnet20 epochs=3
      csn train --dataset npz --data-root mydata.npz --model resnet8 epochs=3
      torchrun --nproc_per_node=8 -m csn train --preset imagenet-resnet50 --data-root /data/imagenet
    """
    dist.init_from_env()
    if resume and force:
        raise CsnError("--resume and --force contradict each other; pass only one.")
    source = "the preset"
    if resume and out and not preset and not config_file and Path(out, "run.json").is_file():
        cfg, source = Run(out).config, str(Path(out, "run.json"))
    elif config_file:
        source = f"config file {config_file}"
        cfg = load_config_file(config_file)
        if preset:
            raise CsnError("pass either --preset or --config, not both (a config file may name its preset).")
    elif preset:
        cfg = get_preset(preset)
    else:
        cfg = TrainConfig()
    given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items() if v is not None and v != ()}
    cfg = cfg.override([f"{k}={json.dumps(v)}" for k, v in given.items()] + list(overrides))
    typed = "model" in given or any(o.split("=", 1)[0].strip().replace("-", "_") == "model" for o in overrides)
    if not typed:  # a model typed on the command line is explicit; one named by a file needs --trust-code
        require_trust(cfg.model, trust_code, source)
    if "seed" in given and not out and cfg.seed != 0:
        cfg = cfg.replace(name=f"{cfg.name}-s{cfg.seed}")
    out_dir = Path(out) if out else Path("runs") / _run_folder_name(cfg.name)
    run = loop.train(cfg, out_dir, resume=resume, force=force, progress=not quiet)
    if dist.is_main():
        last = run.checkpoints[-1]
        click.echo(f"run written to {run.path} ({len(run.checkpoints)} checkpoints; final test acc "
                   f"{last.metrics.get('test_acc', float('nan')):.4f} at epoch {last.epoch:g})")


def _run_folder_name(name: str) -> str:
    """A run name used as the folder runs/<name>: it must stay inside runs/ (one plain folder name)."""
    control = next((c for c in name if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        raise CsnError(f"run name {name!r} holds a control character ({control!r}), which would become part of the "
                       "folder runs/<name>; choose a plain name (letters, digits, '-', '_', '.') or pass --out DIR.")
    bad = (not name.strip() or name in (".", "..") or "\x00" in name
           or any(len(P(name).parts) != 1 or P(name).anchor for P in (PurePosixPath, PureWindowsPath)))
    if bad:
        raise CsnError(f"run name {name!r} cannot be a folder under runs/ (it must be one plain folder name, without "
                       "'/', '\\', '..' or a drive); choose a plain name (e.g. name=my-run) or pass --out DIR.")
    return name


@click.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=False, file_okay=False))
def info(run_dir: str) -> None:
    """Show what a run directory holds: config, checkpoints with metrics, tables."""
    run = Run(run_dir)
    cfg, data = run.config, run.info["data"]
    click.echo(f"run {run.path}")
    click.echo(f"  model {cfg.model} (width {cfg.width}), dataset {data['name']} "
               f"({data['num_train']} train / {data['num_test']} test, {data['num_classes']} classes)")
    click.echo(f"  seed {cfg.seed}, {cfg.epochs} epochs x {run.info['steps_per_epoch']} steps, batch {cfg.batch_size}, "
               f"lr {cfg.lr} ({cfg.lr_schedule}), csn {run.info['csn_version']}, torch {run.info['torch_version']}")
    ckpts = run.checkpoints
    click.echo(f"  {len(ckpts)} checkpoints of {len(run.info.get('checkpoint_steps', []))} scheduled:")
    for c in ckpts:
        m = c.metrics
        click.echo(f"    step {c.step:>7}  epoch {c.epoch:8.4f}  test_acc {m.get('test_acc', float('nan')):.4f}  "
                   f"test_loss {m.get('test_loss', float('nan')):.4f}")
    tables = sorted(p.name for p in (run.path / "tables").glob("*.parquet"))
    click.echo(f"  tables: {', '.join(tables) if tables else 'none'}")


COMMANDS = [train, info]
