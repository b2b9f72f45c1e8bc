"""The intervention protocol: what a training run does besides minimizing cross-entropy, as a plug-in.

The training loop (csn.training.loop) knows no intervention by name. For every optimizer step it calls, on each
intervention of the run, in the order they are configured:

1. ``before_forward(step)``  before the forward pass of the step that starts with `step` steps done;
2. ``loss_term(labels)``     after the forward pass (inside autocast): a tensor added to the loss, or None;
3. ``after_step(step)``      after the optimizer step, `step` now counting it, before that step's log line and
                             checkpoint (so a checkpoint at `step` holds what the intervention did there);
4. ``log()``                 at each line of tables/training.parquet: values of its columns there;

and once: ``checkpoint_steps()`` (steps it needs checkpointed, e.g. a rewind's source), ``record()`` (what it did, in
run.json's "interventions" list) and ``close()``. An intervention keeps no state a resume could lose: what it needs
is a function of the step, the configuration and the run's checkpoints (resumed runs stay bitwise the same on CPU).

A new intervention is one module in this package: a subclass with a `kind`, an `Options` schema (its config keys,
validated by pydantic) and the hooks it needs, registered with :func:`register`. A run asks for it in its config:
``interventions = [{kind = "rewind", stages = ["layer1"], at = "step=40", to = "step=0"}]`` (TOML:
``[[interventions]]``). The selectivity regularizer is the intervention of kind ``selectivity``, configured by the
``reg_*`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from csn.core.schema import Schema
from csn.errors import CsnError
from csn.registry import Registry
from csn.runs.config import TrainConfig

LOG_DEFAULTS: dict[str, Any] = {"alpha": 0.0, "reg_value": float("nan"), "reg_skipped": 0}
"""The training table's intervention columns and their values where no intervention fills them."""


@dataclass(frozen=True)
class Context:
    """What an intervention may use: the run's model (not DDP-wrapped), optimizer, configuration and its length."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    num_classes: int
    steps_per_epoch: int
    total: int
    out: Path
    device: torch.device


class Intervention:
    """One intervention of a training run (see the module's docstring for when each hook is called); every hook has
    a default that does nothing, a subclass overrides those it needs."""

    kind: ClassVar[str]
    Options: ClassVar[type[Schema]]

    def __init__(self, options: Schema, ctx: Context) -> None:
        """Check the options against the run (stages, steps) and prepare; reads and writes no file."""
        self.options, self.ctx = options, ctx

    def checkpoint_steps(self) -> set[int]:
        """Steps at which the run must save a checkpoint for this intervention."""
        return set()

    def before_forward(self, step: int) -> None:
        """Called before the forward pass of each step (`step` = steps done so far)."""

    def loss_term(self, labels: Tensor) -> Tensor | None:
        """A term added to the step's loss (after the forward pass, inside autocast); None adds nothing."""
        return None

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (`step` counts it), before its log line and checkpoint."""

    def log(self) -> dict[str, Any]:
        """Values of the training table's intervention columns (LOG_DEFAULTS) since the last log line."""
        return {}

    def record(self) -> dict[str, Any]:
        """What this intervention does in this run, for run.json (its kind is added)."""
        return {}

    def close(self) -> None:
        """Release hooks; called when training ends or fails."""


INTERVENTIONS: Registry[type[Intervention]] = Registry("intervention kind", package="csn.training.interventions")
"""Every intervention kind, registered where it is defined (this package's modules are found by themselves)."""


def register(cls: type[Intervention]) -> type[Intervention]:
    """Class decorator: make an intervention available to configs by its `kind`."""
    return INTERVENTIONS.register(cls.kind, cls)


def parse_interventions(cfg: TrainConfig) -> list[tuple[type[Intervention], Schema]]:
    """The config's interventions as (class, validated options), the selectivity regularizer (reg_* keys) first; an
    unknown kind or a bad key is one CsnError naming the fix. Needs no model: experiments check their plans with it."""
    out: list[tuple[type[Intervention], Schema]] = []
    selectivity = INTERVENTIONS.get("selectivity")
    options = selectivity.Options.from_config(cfg)  # type: ignore[attr-defined]
    if options is not None:
        out.append((selectivity, options))
    for i, entry in enumerate(cfg.interventions):
        kind = entry["kind"]
        if kind == "selectivity":
            raise CsnError(f"interventions[{i}] is of kind 'selectivity': the selectivity regularizer is set by the reg_* "
                           "keys (reg_alpha, reg_window, reg_layers, ...); use those instead.")
        cls = INTERVENTIONS.get(kind)
        out.append((cls, cls.Options.parse({k: v for k, v in entry.items() if k != "kind"},
                                           what=f"interventions[{i}] ({kind}) key")))
    return out


def build_interventions(cfg: TrainConfig, ctx: Context) -> list[Intervention]:
    """The run's interventions, built and checked against its model and length."""
    return [cls(options, ctx) for cls, options in parse_interventions(cfg)]


__all__ = ["Context", "Intervention", "INTERVENTIONS", "LOG_DEFAULTS", "register", "parse_interventions",
           "build_interventions"]
