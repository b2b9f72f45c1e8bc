"""Command-line options built from the options objects, never re-declared.

`from_schema(Options)` turns every field of a Schema into a click option (name, help, choices,
metavar and default come from the field), and `build(Options, kwargs)` validates what the user
typed with the same schema the Python API uses; a mistake is one line naming the option.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import click
import torch
from pydantic import Field

from csn import dist
from csn.analysis.base import Analysis, RunOptions
from csn.core.schema import Int, Schema
from csn.errors import CsnError
from csn.experiments.launcher import SLURM_ONLY, LauncherOptions, need_submitit
from csn.models.external import set_trust_code

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _literal_choices(annotation: Any) -> list[str] | None:
    """The values of a Literal[...] (possibly inside Optional/Annotated), else None."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [str(a) for a in typing.get_args(annotation)]
    if origin is typing.Annotated:
        return _literal_choices(typing.get_args(annotation)[0])
    for arg in typing.get_args(annotation) if origin is not None else ():
        found = _literal_choices(arg)
        if found:
            return found
    return None


def flag(name: str) -> str:
    """The command-line spelling of a field: bn_recalibrate -> --bn-recalibrate."""
    return "--" + name.replace("_", "-")


def from_schema(schema: type[Schema], *, exclude: Iterable[str] = (), include: Iterable[str] | None = None,
                defaults: dict[str, Any] | None = None, help: dict[str, str] | None = None) -> Callable[[F], F]:
    """A decorator adding one click option per field of `schema` (in field order).

    Bools become --x/--no-x switches (or a plain --x flag when the default is False), Literal fields
    choices; everything else is read as text and converted by the schema in `build` (include: only
    these fields, in this order; exclude: all but these). The option's
    default is None ("not given"), so the schema's default applies; `defaults` shows a different
    default in --help (and is passed to build by the caller).
    """
    exclude, defaults, help = set(exclude), defaults or {}, help or {}
    include = None if include is None else list(include)

    def decorate(fn: F) -> F:
        names = include if include is not None else list(schema.model_fields)
        for name in reversed(names):
            field = schema.model_fields[name]
            if name in exclude:
                continue
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            default = defaults.get(name, field.default)
            text = help.get(name, field.description or "")
            kw: dict[str, Any] = {"default": None, "help": text}
            if field.annotation is bool:
                off = extra.get("off", f"--no-{name.replace('_', '-')}")
                decls = [flag(name)] if default is False else [f"{flag(name)}/{off}"]
                kw.update(default=default, show_default=default is not False)
                if default is False:
                    kw["is_flag"] = True
                fn = click.option(*decls, name, **kw)(fn)
                continue
            choices = _literal_choices(field.annotation)
            if choices:
                kw["type"] = click.Choice(choices)
            if extra.get("metavar"):
                kw["metavar"] = extra["metavar"]
            if extra.get("multiple"):
                kw["multiple"] = True
            if default is not None and default != () and not extra.get("multiple"):
                shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else default
                kw["help"] = f"{text} [default: {shown}]"
            fn = click.option(flag(name), name, **kw)(fn)
        return fn

    return decorate


def analysis_options(analysis_cls: type[Analysis], *, exclude: Iterable[str] = (), plot: Iterable[str] | None = None,
                     run_help: dict[str, str] | None = None) -> Callable[[F], F]:
    """Every option of an analysis command: its own (from analysis_cls.Options, minus `exclude`), the checkpoint
    group (RunOptions), the figure group (PlotOptions, the fields in `plot`, default all) and the execution group."""
    groups = [from_schema(analysis_cls.Options, exclude=exclude),
              from_schema(RunOptions, exclude=("device", "progress"), help=run_help),
              from_schema(PlotOptions, include=plot),
              exec_options()]

    def decorate(fn: F) -> F:
        for group in reversed(groups):
            fn = group(fn)
        return fn

    return decorate


def build(schema: type[Schema], values: dict[str, Any], **fixed: Any) -> Schema:
    """The options object from parsed click values (only the schema's fields; None / () = not given)."""
    data = {k: v for k, v in values.items() if k in schema.model_fields and v is not None and v != ()}
    data.update({k: v for k, v in fixed.items() if v is not None})
    return schema.parse(data, what="option", flags=True)


def take(values: dict[str, Any], schema: type[Schema]) -> dict[str, Any]:
    """Remove and return the click values that belong to `schema` (so one callback can hold several groups)."""
    return {k: values.pop(k) for k in list(values) if k in schema.model_fields}


class ExecOptions(Schema):
    """How a command runs: on which device, with how many CPU threads, with or without progress bars."""

    device: str = Field("auto", description="auto (this process's GPU if any, else the CPU), cpu, cuda, cuda:1.")
    threads: Int | None = Field(None, ge=1, description="CPU threads for torch.", json_schema_extra={"metavar": "N"})
    quiet: bool = Field(False, description="No progress bars.")
    trust_code: bool = Field(False, description="Build runs whose run.json names the model as 'package.module:factory' "
                             "(code named by data: csn imports and runs it); only the command line can grant this.")


def exec_options(*names: str, help: dict[str, str] | None = None) -> Callable[[F], F]:
    """Options of the execution group (ExecOptions), declared there once: all of them, or the fields `names`
    (e.g. exec_options("quiet") for a command that runs no model). help: a command's own words for what a flag
    does there (what --trust-code grants differs between `csn train` and `csn verify`)."""
    return from_schema(ExecOptions, include=names or None, help=help)


def launcher_options() -> Callable[[F], F]:
    """The launcher group (csn.experiments.launcher.LauncherOptions: --launcher local|slurm and the --slurm-* options)
    of every command that trains several runs, declared there once."""
    return from_schema(LauncherOptions)


def launcher_request(values: dict[str, Any], table: dict[str, Any] | None = None, where: str = "") -> LauncherOptions:
    """The launcher group's values (taken out of `values`), validated; --launcher slurm without submitit (or under
    torchrun) is refused here, before anything is planned or written. table: a study file's [launcher] table
    (`where`: the file, for messages), the defaults of what the command line does not give; its Slurm keys apply
    only when the launcher (the file's or the command line's) is slurm."""
    given = take(values, LauncherOptions)
    table = {k.replace("-", "_"): v for k, v in (table or {}).items()}
    file_launcher = table.get("launcher") if table.get("launcher") in ("local", "slurm") else None  # else: below
    launcher = build(LauncherOptions, given, launcher=given.get("launcher") or file_launcher)
    if table:
        merged = {**table, **{k: v for k, v in given.items() if v is not None and v != ()}}
        if merged.get("launcher", "local") == "local":
            merged = {k: v for k, v in merged.items() if k not in SLURM_ONLY}
        try:
            launcher = LauncherOptions.parse(merged, what="[launcher] key")
        except CsnError as e:
            raise CsnError(f"{where}: {e}") from None
    if launcher.launcher == "slurm":
        need_submitit()
    return launcher


class PlotOptions(Schema):
    """Figures drawn by analysis commands."""

    plot: bool = Field(False, description="Also draw the figures (PNG + SVG) into each run's report/ folder.")
    log_epochs: bool = Field(True, description="Symlog epoch axis (the action is in the first epoch) or a linear one.",
                             json_schema_extra={"off": "--linear-epochs"})
    out: str | None = Field(None, description="Folder for the across-seed figures of several runs [default: the first "
                            "run's report/].", json_schema_extra={"metavar": "DIR"})


def start(exec_opts: ExecOptions) -> torch.device:
    """What every command that runs a model does first: join torchrun's process group when launched by it,
    set CPU threads, and resolve the device ('auto' under torchrun: this rank's GPU)."""
    dist.init_from_env()
    if exec_opts.threads:
        torch.set_num_threads(exec_opts.threads)
    trust_code_for_command(exec_opts.trust_code)
    return dist.resolve_device(exec_opts.device)


TRACKER_HELP = ("Also log every run's training and analyses to a dashboard: tensorboard or wandb (files under "
                "RUN/tracker/; pip install 'csn[tensorboard]' or 'csn[wandb]'). Not part of a run's identity: finished "
                "runs are reused, interrupted ones resumed.")


def tracker_option(f: F) -> F:
    """--tracker NAME on a command that trains runs (the training config key `tracker` of each, checked by it)."""
    return click.option("--tracker", metavar="NAME", help=TRACKER_HELP)(f)


def with_tracker(overrides: Iterable[str], tracker: str | None, key: str = "tracker") -> tuple[str, ...]:
    """The command's key=value overrides with --tracker's (`key`: 'train.tracker' for a study's --set)."""
    return (*overrides, f"{key}={tracker}") if tracker else tuple(overrides)


def trust_code_for_command(enabled: bool) -> None:
    """--trust-code for the running command: code named by data (a run's 'package.module:factory') may be built
    until the command ends (the previous setting is restored when its click context closes)."""
    restore = set_trust_code(enabled)
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.call_on_close(restore)


def run_options(values: dict[str, Any], exec_opts: ExecOptions) -> RunOptions:
    """RunOptions from the click values of the checkpoint group and the execution group."""
    return build(RunOptions, values, device=exec_opts.device, progress=not exec_opts.quiet)


def analysis_request(values: dict[str, Any], analysis_cls: type[Analysis],
                     **fixed: Any) -> tuple[Analysis, RunOptions, PlotOptions]:
    """What an analysis command asked for: the analysis with its options, the RunOptions and the PlotOptions,
    each validated by its schema; then the process is set up (torchrun group, threads). `fixed` are
    analysis options given as arguments rather than --options (e.g. CKA's RUN_B)."""
    exec_opts = build(ExecOptions, take(values, ExecOptions))
    plot = build(PlotOptions, take(values, PlotOptions))
    analysis = analysis_cls(build(analysis_cls.Options, take(values, analysis_cls.Options), **fixed))
    start(exec_opts)  # under torchrun: every rank streams its shard of each checkpoint, rank 0 writes
    return analysis, run_options(values, exec_opts), plot


def echo(message: str = "", err: bool = False) -> None:
    """click.echo on rank 0 only: under torchrun every rank runs the command, one of them reports."""
    if dist.is_main():
        click.echo(message, err=err)


def rel(p: str | Path) -> str:
    """A path relative to the working directory where possible (for messages)."""
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


__all__ = ["CONTEXT", "from_schema", "build", "take", "flag", "ExecOptions", "exec_options", "PlotOptions", "start", "run_options",
           "analysis_options", "analysis_request", "echo", "rel", "trust_code_for_command", "launcher_options",
           "launcher_request"]
