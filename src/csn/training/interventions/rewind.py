"""Stage rewind: at step `at`, set chosen stages' weights and BatchNorm statistics back to the run's own at step `to`.

After the optimizer step that brings the run to `at` (and before that step's checkpoint, which therefore holds the
rewound weights), every parameter and buffer of the chosen stages is loaded from the run's checkpoint at `to`
(`to` = step 0: a re-initialization to the run's own initial weights), and the optimizer state of those
parameters is reset (SGD's momentum zeroed; AdamW's moments and step count restart). The rest of the network and
its optimizer state are untouched. `to` is added to the run's checkpoint schedule, so the source is exact.

A stage's tensors are those of the modules at its read points (csn_stages or the config's `layers`), e.g. for a
ResNet stage ``layer1`` the blocks ``layer1.0``, ``layer1.1``, ...: every tensor whose name starts with one of them.

The study ran one such experiment (src/frankenstein.py of Omkar-Ranadive/Class-Selective-Neurons: at one epoch every
stage but layer4 loaded back from an earlier epoch's weights); here any stages, `to` and `at` can be chosen.
Configure it in a run's config::

    [[interventions]]
    kind = "rewind"
    stages = ["layer1", "layer2"]
    at = "step=40"          # a point in training (csn.core.times): step=N, an epoch, fF; after at least one step
    to = "step=0"           # an earlier point (default step 0)
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
from pydantic import Field, field_validator

from csn.core.schema import CommaList, Schema
from csn.core.times import TIME_FORMS, parse_time
from csn.core.units import stages
from csn.errors import CsnError, unknown
from csn.runs.run import Run
from csn.training.interventions.base import Context, Intervention, register


class RewindOptions(Schema):
    """A rewind's config keys."""

    stages: Annotated[list[str], CommaList] = Field(min_length=1, description="Stages to rewind (the model's stage "
                                                    "names, e.g. layer1,layer2).")
    at: str = Field(description=f"When: {TIME_FORMS}.")
    to: str = Field("step=0", description="To which earlier point's weights (default step=0: the initial weights).")

    @field_validator("at", "to", mode="before")
    @classmethod
    def _point(cls, v: Any) -> str:
        return str(parse_time(v, "a rewind's time"))


@register
class Rewind(Intervention):
    """Rewind chosen stages to their own weights at an earlier step."""

    kind = "rewind"
    Options = RewindOptions

    def __init__(self, options: RewindOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        declared = stages(ctx.model)
        for s in options.stages:
            if s not in declared:
                raise unknown("stage", s, list(declared))
        self.at = parse_time(options.at).step(ctx.steps_per_epoch, ctx.total)
        self.to = parse_time(options.to).step(ctx.steps_per_epoch, ctx.total)
        if not 1 <= self.at < ctx.total:
            raise CsnError(f"a rewind at {options.at} (step {self.at}) is not inside training (steps 1 to "
                           f"{ctx.total - 1}); choose 'at' after the first step and before the end.")
        if self.to >= self.at:
            raise CsnError(f"a rewind at {options.at} (step {self.at}) to {options.to} (step {self.to}) does not go back "
                           "in time; choose 'to' earlier than 'at'.")
        prefixes = tuple(f"{m}." for s in options.stages for m in declared[s])
        self.names = [n for n in ctx.model.state_dict() if n.startswith(prefixes)]
        if not self.names:
            raise CsnError(f"stages {', '.join(options.stages)} hold no weights at their read points "
                           f"({', '.join(p[:-1] for p in prefixes)}); declare stages whose read points are the blocks "
                           "that hold the weights (config key layers).")

    def checkpoint_steps(self) -> set[int]:
        return {self.to}

    def after_step(self, step: int) -> None:
        if step != self.at:
            return
        run = Run(self.ctx.out)
        source = run.load_state(run.checkpoint(self.to))
        model, opt = self.ctx.model, self.ctx.optimizer
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        with torch.no_grad():
            for name in self.names:
                tensors[name].copy_(source[name])
        for name in self.names:
            opt.state.pop(tensors[name], None)  # momentum / moments restart (buffers hold no optimizer state)

    def record(self) -> dict[str, Any]:
        return {"stages": list(self.options.stages), "at": self.options.at, "to": self.options.to,
                "at_step": self.at, "to_step": self.to, "tensors": len(self.names)}
