"""The selectivity regularizer as an intervention: loss = cross-entropy - alpha * R in the configured windows.

Configured by the training config's reg_* keys (reg_alpha with reg_window, or reg_schedule; reg_layers, reg_mode,
reg_statistic, reg_group, reg_reduce); R is csn.training.regularizer.SelectivityRegularizer's. Its hooks are
attached only on steps where alpha != 0, so outside its windows a regularized run costs what a plain one does.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor

from csn import dist
from csn.core.alpha import alpha_windows
from csn.core.schema import Float, Schema
from csn.runs.config import TrainConfig
from csn.training.interventions.base import Context, Intervention, register
from csn.training.regularizer import SelectivityRegularizer, check_group_fits


class SelectivityOptions(Schema):
    """The regularizer's settings, read from a TrainConfig's reg_* keys (reg_mode's defaults filled in)."""

    schedule: str | None = None
    alpha: Float | None = None
    window: str | None = None
    layers: list[str] | None = None
    statistic: str = "means"
    group: int | str = "batch"
    eps: Float = Field(gt=0)
    reduce: str = "mean"

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> SelectivityOptions | None:
        """The options of a config that regularizes (alpha != 0 somewhere), else None."""
        if alpha_windows(cfg.reg_schedule, cfg.reg_alpha, cfg.reg_window).is_zero:
            return None
        return cls(schedule=cfg.reg_schedule, alpha=cfg.reg_alpha, window=cfg.reg_window, layers=cfg.reg_layers,
                   **cfg.reg_resolved)


@register
class Selectivity(Intervention):
    """-alpha * R added to the loss at every step inside a window (alpha < 0 suppresses selectivity)."""

    kind = "selectivity"
    Options = SelectivityOptions

    def __init__(self, options: SelectivityOptions, ctx: Context) -> None:
        super().__init__(options, ctx)
        self.windows = alpha_windows(options.schedule, options.alpha, options.window).resolve(
            ctx.steps_per_epoch, ctx.total, ctx.cfg.epochs)  # windows in optimizer steps [start, end)
        check_group_fits(options.group, ctx.cfg.batch_size, dist.world_size())  # groups are per process
        self.reg = SelectivityRegularizer(ctx.model, options.layers, num_classes=ctx.num_classes,
                                          statistic=options.statistic, group=options.group, eps=options.eps,
                                          reduce=options.reduce)
        self.alpha = 0.0
        self._last: tuple[Tensor, Tensor] | None = None
        # statistics since the last log line, on the device (no host sync per step): sum of R, steps whose R
        # counted; and batches skipped (< 2 classes present) since training (re)started
        self._sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        self._counted = torch.zeros((), dtype=torch.long, device=ctx.device)
        self._skipped = torch.zeros((), dtype=torch.long, device=ctx.device)

    def before_forward(self, step: int) -> None:
        self.alpha = self.windows.alpha_at(step)
        if self.alpha != 0.0:
            self.reg.attach()
        else:
            self.reg.detach()

    def loss_term(self, labels: Tensor) -> Tensor | None:
        if self.alpha == 0.0:
            self._last = None
            return None
        r, counted = self.reg.value_nowait(labels)  # R = 0 (no gradient) on a batch with < 2 classes present
        self._last = (r, counted)
        return -self.alpha * r

    def after_step(self, step: int) -> None:
        if self._last is not None:
            r, counted = self._last
            with torch.no_grad():
                self._sum += r.detach().double()
                self._counted += counted
                self._skipped += ~counted
            self._last = None

    def log(self) -> dict[str, Any]:
        n = int(self._counted)
        out = {"alpha": self.alpha, "reg_value": float(self._sum) / n if n else float("nan"),
               "reg_skipped": int(self._skipped)}
        self._sum.zero_()
        self._counted.zero_()
        return out

    def record(self) -> dict[str, Any]:
        return {"steps": self.windows.to_json(), "layers": list(self.reg.layers), "statistic": self.options.statistic,
                "group": self.options.group, "eps": self.options.eps, "reduce": self.options.reduce}

    def close(self) -> None:
        self.reg.detach()
