"""The `csn` command line: a thin layer over the Python API, one module per command group.

Every command prints where it wrote its outputs; a user error prints one sentence (`error: ...`)
naming the fix and exits with status 2; Ctrl-C stops cleanly and says how to resume.
"""

from __future__ import annotations

import errno
import sys

import click

from csn.cli import ablate, cka, experiment, linearity, report, reproduce, selectivity, train, verify
from csn.cli.options import CONTEXT
from csn.errors import CsnError


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
            msg = os_error_message(e)
            if msg is None:
                raise  # a bug: keep the traceback
            click.echo(f"error: {msg}", err=True)
            sys.exit(2)


def os_error_message(e: BaseException) -> str | None:
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


for _module in (train, selectivity, ablate, linearity, cka, report, experiment, reproduce, verify):
    for _command in _module.COMMANDS:
        main.add_command(_command)


__all__ = ["main", "CsnGroup", "os_error_message"]
