"""The `csn` command line: a thin layer over the Python API.

Every command prints where it wrote its outputs; a user error prints one sentence (`error: ...`)
naming the fix and exits with status 2; Ctrl-C stops cleanly and says how to resume.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import click

from csn.errors import CsnError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class CsnGroup(click.Group):
    """Turns CsnError into a one-line message and exit status 2, and Ctrl-C into a resume hint."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CsnError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("\ninterrupted: finished checkpoints and table rows are saved; run the same command again "
                       "(with --resume for `csn train`) to continue where it stopped.", err=True)
            sys.exit(130)
        except Exception as e:
            msg = _os_error_message(e)
            if msg is None:
                raise  # a bug: keep the traceback
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


def _os_error_message(e: BaseException) -> str | None:
    """One sentence for a full disk or a permission problem (any library's error); None for anything else."""
    code = getattr(e, "errno", None)
    text = str(e)
    where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
    if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in text or "Disk quota exceeded" in text:
        return (f"the disk is full{where}; nothing half-written was kept (writes are atomic), so free some space and run "
                "the same command again (with --resume for `csn train`) to continue where it stopped.")
    if isinstance(e, OSError) and code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"{e.strerror or 'permission denied'}: {e.filename or text}; choose a location you can write to "
                "(e.g. --out DIR) or fix its permissions.")
    return None


@click.group(cls=CsnGroup, context_settings=CONTEXT)
@click.version_option(package_name="csn")
def main() -> None:
    """csn: class-selective neurons across training.

    \b
    Typical session:
      csn train --preset fmnist --out runs/fmnist        # dense early checkpoints
      csn selectivity runs/fmnist --plot                 # CSI of every unit, every checkpoint
      csn ablate runs/fmnist --checkpoints e0.125,last   # selective vs random ablations
      csn report runs/fmnist                             # one HTML page
      csn reproduce                                      # the whole study, one command

    Run `csn COMMAND --help` for each command's options.
    """


def _threads(n: int | None) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def echo(message: str = "", err: bool = False) -> None:
    """click.echo on rank 0 only: under torchrun every rank runs the command, one of them reports."""
    from csn.distributed import is_main

    if is_main():
        click.echo(message, err=err)


def analysis_setup(device: str, threads: int | None):
    """What every analysis command does first: join torchrun's process group when launched by it,
    set CPU threads, and resolve the device ('auto' under torchrun: this rank's GPU)."""
    from csn import distributed
    from csn.training.loop import resolve_device

    distributed.init_from_env()
    _threads(threads)
    return resolve_device(device)


@main.command(context_settings=CONTEXT)
@click.option("--preset", help="Start from a preset: smoke, fmnist, imagenet-resnet50.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML or YAML config file (may name a preset).")
@click.option("--out", type=click.Path(file_okay=False), help="Run directory [default: runs/<name>].")
@click.option("--resume", is_flag=True, help="Continue an existing run from its last checkpoint (same config).")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--dataset", help="fashion-mnist, idx or npz (with --data-root), synthetic, imagefolder.")
@click.option("--data-root", type=click.Path(), help="Dataset directory (IDX files or ImageFolder) or .npz file.")
@click.option("--model", help="Model name, e.g. resnet20, resnet50, vgg16, cnn, mlp.")
@click.option("--epochs", type=float, help="Training length in epochs (fractions allowed).")
@click.option("--seed", type=int, help="Random seed (recorded in run.json).")
@click.option("--checkpoints", help="Checkpoint schedule, e.g. 'steps:log2:256,1:end:1' or '0:1:0.125,1:3:0.25,3:end:1'.")
@click.option("--reg-alpha", type=float, help="Selectivity regularizer strength (loss = ce - alpha*R; < 0 suppresses).")
@click.option("--reg-window", help="Epoch window START:END for --reg-alpha, e.g. 5:end.")
@click.option("--reg-schedule", help="Study-style alpha string, e.g. '0*5 -20*15' (alpha*epochs ...).")
@click.option("--reg-layers", multiple=True, help="Layers to regularize (patterns); default every stage but the last.")
@click.option("--device", help="auto, cpu, cuda, cuda:1.")
@click.option("--threads", type=int, help="CPU threads for torch.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.argument("overrides", nargs=-1)
def train(preset, config_file, out, resume, force, dataset, data_root, model, epochs, seed, checkpoints, reg_alpha,
          reg_window, reg_schedule, reg_layers, device, threads, quiet, overrides) -> None:
    """Train a classifier with dense early checkpoints into a run directory.

    OVERRIDES are key=value pairs for any config key (e.g. width=2 lr_schedule=cosine); `csn train
    --preset fmnist --help-keys` is not needed: unknown keys are reported with the valid ones.

    \b
    Examples:
      csn train --preset fmnist
      csn train --preset fmnist --seed 1 --reg-alpha -2 --reg-window 0:end --out runs/reg0
      csn train --dataset idx --data-root ~/mnist --model resnet20 epochs=3
      csn train --dataset npz --data-root mydata.npz --model resnet8 epochs=3
      torchrun --nproc_per_node=8 -m csn train --preset imagenet-resnet50 --data-root /data/imagenet
    """
    from csn import distributed
    from csn.training.config import TrainConfig, load_config_file, preset as get_preset
    from csn.training.loop import train as run_train

    distributed.init_from_env()
    if resume and force:
        raise CsnError("--resume and --force contradict each other; pass only one.")
    if resume and out and not preset and not config_file and Path(out, "run.json").is_file():
        import json

        cfg = TrainConfig.from_dict(json.loads(Path(out, "run.json").read_text())["config"])
    elif config_file:
        cfg = load_config_file(config_file)
        if preset:
            raise CsnError("pass either --preset or --config, not both (a config file may name its preset).")
    elif preset:
        cfg = get_preset(preset)
    else:
        cfg = TrainConfig()
    flags = dict(dataset=dataset, data_root=data_root, model=model, epochs=epochs, seed=seed, checkpoints=checkpoints,
                 reg_alpha=reg_alpha, reg_window=reg_window, reg_schedule=reg_schedule,
                 reg_layers=list(reg_layers) or None, device=device, threads=threads)
    cfg = cfg.override([f"{k}={_json(v)}" for k, v in flags.items() if v is not None] + list(overrides))
    if seed is not None and not out and cfg.seed != 0:
        cfg.name = f"{cfg.name}-s{cfg.seed}"
    _threads(cfg.threads)
    out_dir = Path(out) if out else Path("runs") / _run_folder_name(cfg.name)
    run = run_train(cfg, out_dir, resume=resume, force=force, progress=not quiet)
    if distributed.is_main():
        last = run.checkpoints[-1]
        click.echo(f"run written to {run.path} ({len(run.checkpoints)} checkpoints; final test acc "
                   f"{last.metrics.get('test_acc', float('nan')):.4f} at epoch {last.epoch:g})")


def _run_folder_name(name: str) -> str:
    """A run name used as the folder runs/<name>: it must stay inside runs/ (one plain folder name)."""
    from pathlib import PurePosixPath, PureWindowsPath

    bad = (not name.strip() or name in (".", "..") or "\x00" in name
           or any(len(P(name).parts) != 1 or P(name).anchor for P in (PurePosixPath, PureWindowsPath)))
    if bad:
        raise CsnError(f"run name {name!r} cannot be a folder under runs/ (it must be one plain folder name, without "
                       "'/', '\\', '..' or a drive); choose a plain name (e.g. name=my-run) or pass --out DIR.")
    return name


def _json(v) -> str:
    import json

    return json.dumps(v)


@main.command(context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=False, file_okay=False))
def info(run_dir: str) -> None:
    """Show what a run directory holds: config, checkpoints with metrics, tables."""
    from csn.runs import Run

    run = Run(run_dir)
    cfg = run.config
    click.echo(f"run {run.path}")
    click.echo(f"  model {cfg['model']} (width {cfg['width']}), dataset {run.info['data']['name']} "
               f"({run.info['data']['num_train']} train / {run.info['data']['num_test']} test, {run.info['data']['num_classes']} classes)")
    click.echo(f"  seed {cfg['seed']}, {cfg['epochs']} epochs x {run.info['steps_per_epoch']} steps, batch {cfg['batch_size']}, "
               f"lr {cfg['lr']} ({cfg['lr_schedule']}), csn {run.info['csn_version']}, torch {run.info['torch_version']}")
    ckpts = run.checkpoints
    click.echo(f"  {len(ckpts)} checkpoints of {len(run.info.get('checkpoint_steps', []))} scheduled:")
    for c in ckpts:
        m = c.metrics
        click.echo(f"    step {c.step:>7}  epoch {c.epoch:8.4f}  test_acc {m.get('test_acc', float('nan')):.4f}  "
                   f"test_loss {m.get('test_loss', float('nan')):.4f}")
    tables = sorted(p.name for p in (run.path / "tables").glob("*.parquet"))
    click.echo(f"  tables: {', '.join(tables) if tables else 'none'}")


def _register_optional() -> None:
    """Commands living beside their analyses; each module defines a click command named `command`."""
    import importlib

    for mod in ("csn.cli_selectivity", "csn.cli_ablate", "csn.cli_linearity", "csn.cli_cka", "csn.cli_report",
                "csn.cli_experiment", "csn.cli_reproduce", "csn.cli_verify"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        for cmd in getattr(m, "COMMANDS", []):
            main.add_command(cmd)


_register_optional()

if __name__ == "__main__":
    main()
