"""The `csn` command line: a thin layer over the Python API, one module per command group.

Every command prints where it wrote its outputs; a user error prints one sentence (`error: ...`)
naming the fix and exits with status 2; Ctrl-C stops cleanly and says how to resume.

The commands are the COMMANDS of every module of this package (found, not listed), plus one command per registered
analysis that no module provides (csn.analysis.registry: built from the analysis's Options by `analysis_command`),
so a new analysis is a command without an edit here.
"""

from __future__ import annotations

import importlib
import pkgutil
import shlex
import sys

import click

from csn.analysis.base import run_analysis
from csn.analysis.registry import AnalysisEntry, analyses
from csn.cli.options import CONTEXT, analysis_options, analysis_request, echo, rel
from csn.core.resources import is_disk_full, is_write_refused
from csn.errors import CsnError


class CsnGroup(click.Group):
    """Turns CsnError into a one-line message and exit status 2, and Ctrl-C into the command that continues."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | {e.command for e in analyses()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """A module's command, else the command of the registered analysis it names (analysis_command)."""
        found = super().get_command(ctx, cmd_name)
        if found is None:
            entry = next((e for e in analyses() if e.command == cmd_name), None)
            found = analysis_command(entry) if entry is not None else None
        return found

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["csn.argv"] = list(args)  # the command line, for "run `csn ...` to continue"
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CsnError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo(f"\ninterrupted: finished checkpoints and table rows are saved; {self.again(ctx)}.", err=True)
            sys.exit(130)
        except Exception as e:
            msg = os_error_message(e, self.again(ctx))
            if msg is None:
                raise  # a bug: keep the traceback
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)

    def again(self, ctx: click.Context) -> str:
        """'run `csn ...` to continue where it stopped': the same command line without --force, plus --resume
        where the command has that flag (`csn train`, `csn reproduce`; the others resume by themselves)."""
        args = [a for a in ctx.meta.get("csn.argv", []) if a != "--force"]
        cmd: click.Command | None = self
        for a in args:  # the command that ran: `experiment regularize ...` -> regularize
            if not isinstance(cmd, click.Group):
                break
            if not a.startswith("-"):
                cmd = cmd.get_command(ctx, a)
        if cmd is not None and any(p.name == "resume" for p in cmd.params) and "--resume" not in args:
            args.append("--resume")
        return f"run `{shlex.join(['csn', *args])}` to continue where it stopped"


def os_error_message(e: BaseException, again: str = "run the same command again to continue where it stopped") -> str | None:
    """One sentence for a full disk or a permission problem (any library's error); None for anything else.
    `again` says how to continue (CsnGroup passes the command line)."""
    where = f" while writing {e.filename}" if getattr(e, "filename", None) else ""
    if is_disk_full(e):
        return f"the disk is full{where}; nothing half-written was kept (writes are atomic), so free some space and {again}."
    if is_write_refused(e):
        return (f"{e.strerror or 'permission denied'}: {e.filename or e}; choose a location you can write to "
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


def analysis_command(entry: AnalysisEntry) -> click.Command:
    """`csn COMMAND RUN...` for a registered analysis without a command module of its own: its options (from its
    Options), the checkpoint and execution groups, and a line per table it wrote."""
    cls = entry.cls
    doc = (cls.__doc__ or entry.summary).strip()
    tables = ", ".join(f"tables/{spec.name}.parquet" for spec in cls.tables)

    @click.command(entry.command, context_settings=CONTEXT, help=f"{doc}\n\nWrites {tables} of each run.")
    @click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
    @analysis_options(cls, plot=())
    def command(runs: tuple[str, ...], **values: object) -> None:
        analysis, opts, _plot = analysis_request(values, cls)
        for res in run_analysis(list(runs), analysis, opts, log=lambda s: echo(s, err=True)):
            for name, rows in res.tables.items():
                echo(f"{res.run.name}: {len(rows)} rows of {name} -> {rel(res.run.table_path(name))}")

    return command


for _info in pkgutil.iter_modules(__path__):
    for _command in getattr(importlib.import_module(f"{__name__}.{_info.name}"), "COMMANDS", ()):
        main.add_command(_command)


__all__ = ["main", "CsnGroup", "os_error_message", "analysis_command"]
