"""`csn verify`: check the integrity of run directories (the logic lives in csn.runs.verify)."""

from __future__ import annotations

import click

from csn.cli.options import CONTEXT
from csn.runs.verify import verify_run


@click.command(context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
def verify(runs) -> None:
    """Check run directories: manifest, every checkpoint's sha256, readable tables, no half-written files.

    Exits with status 1 if anything is wrong and says, per problem, what to do.
    """
    bad = 0
    for r in runs:
        problems = verify_run(r)
        if problems:
            bad += 1
            click.echo(f"{r}: {len(problems)} problem(s)")
            for p in problems:
                click.echo(f"  - {p}")
        else:
            click.echo(f"{r}: ok")
    if bad:
        raise SystemExit(1)


COMMANDS = [verify]
