"""`csn verify`: check the integrity of run directories (the logic lives in csn.runs.verify)."""

from __future__ import annotations

import click

from csn.cli.options import CONTEXT, exec_options, trust_code_for_command
from csn.runs.verify import untrusted_model, verify_path


@click.command(context_settings=CONTEXT)
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@exec_options("trust_code", help={"trust_code": "Build the models that run.json names as 'package.module:factory' "
              "(code named by data) to check the checkpoints' tensors against them."})
def verify(runs, trust_code) -> None:
    """Check run directories, or experiment and reproduction directories (every run inside them and their own
    files): run.json against its schema, the manifest, every checkpoint's sha256, header and tensor shapes,
    the optimizer state and cached models (sha256 sidecars), every table against its schema, no half-written
    files.

    Exits with status 1 if anything is wrong and says, per problem, what to do.
    """
    trust_code_for_command(trust_code)
    bad = 0
    for r in runs:
        results = verify_path(r)
        if len(results) > 1:
            click.echo(f"{r}: experiment directory with {len(results) - 1} run(s)")
        for where, problems in results.items():
            if problems:
                bad += 1
                click.echo(f"{where}: {len(problems)} problem(s)")
                for p in problems:
                    click.echo(f"  - {p}")
            else:
                click.echo(f"{where}: ok")
            code = untrusted_model(where) if (where / "run.json").is_file() else None
            if code:
                click.echo(f"  note: run.json names the model {code!r} (code named by data); its checkpoints were "
                           "checked (sha256, headers) but not against the model: pass --trust-code to build it.")
    if bad:
        raise SystemExit(1)


COMMANDS = [verify]
