"""The `csn` command line: a thin layer over the Python API, one module per command group.

Every command prints where it wrote its outputs; a user error prints one sentence (`error: ...`)
naming the fix and exits with status 2; Ctrl-C stops cleanly and says how to resume.
"""

from __future__ import annotations

import shlex
import sys

import click

from csn.cli import ablate, accuracy, cka, experiment, linearity, report, reproduce, selectivity, train, verify
from csn.cli.options import CONTEXT
from csn.core.resources import is_disk_full, is_write_refused
from csn.errors import CsnError


class CsnGroup(click.Group):
    """Turns CsnError into a one-line message and exit status 2, and Ctrl-C into the command that continues."""

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


for _module in (train, selectivity, ablate, linearity, cka, accuracy, report, experiment, reproduce, verify):
    for _command in _module.COMMANDS:
        main.add_command(_command)


__all__ = ["main", "CsnGroup", "os_error_message"]
