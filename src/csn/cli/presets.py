"""`csn presets`: the shipped presets of every kind, or one preset's file (a template to copy and edit)."""

from __future__ import annotations

import click

from csn.cli.options import CONTEXT, echo
from csn.core import presets


def _summary(kind: str, name: str) -> str:
    """The first comment line of a preset's file."""
    for line in presets.text(kind, name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@click.command(context_settings=CONTEXT)
@click.argument("kind", required=False, type=click.Choice(presets.KINDS))
@click.argument("name", required=False)
def presets_command(kind: str | None, name: str | None) -> None:
    """List the shipped presets (train, study, windows, regime), or print one preset's TOML file.

    \b
    Examples:
      csn presets                      # every kind, every preset, the first line of its notes
      csn presets windows mechanism    # the file: its keys and where its numbers come from
      csn presets study fmnist > my_study.toml   # a template for `csn reproduce --config my_study.toml`
    """
    if name is not None:
        echo(presets.text(str(kind), name).rstrip("\n"))
        return
    for k in [kind] if kind else presets.KINDS:
        echo(f"{k}:")
        for n in presets.names(k):
            echo(f"  {n:<20} {_summary(k, n)}")


presets_command.name = "presets"
COMMANDS = [presets_command]
