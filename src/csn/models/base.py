"""Base class for csn models: declared read points grouped by stage, and forward split at a stage."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from csn.errors import unknown


class CsnModel(nn.Module):
    """A model whose forward is a sequence of named segments.

    `csn_stages` maps each stage to its read points (module names). `forward_until(stage, x)` returns
    the stage's input and `forward_from(stage, h)` runs from that stage to the logits, so analyses
    that change a stage (ablation) never recompute what comes before it.
    """

    csn_stages: dict[str, list[str]]

    def segments(self) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        for _, fn in self.segments():
            x = fn(x)
        return x

    def _index(self, stage: str) -> int:
        names = [n for n, _ in self.segments()]
        if stage not in names:
            raise unknown("stage", stage, [n for n in names if n in self.csn_stages])
        return names.index(stage)

    def forward_until(self, stage: str, x: Tensor) -> Tensor:
        """The input of `stage` (everything before it, run once)."""
        segs = self.segments()
        for _, fn in segs[: self._index(stage)]:
            x = fn(x)
        return x

    def forward_from(self, stage: str, h: Tensor) -> Tensor:
        """Run from `stage` (given its input) to the output."""
        segs = self.segments()
        for _, fn in segs[self._index(stage):]:
            h = fn(h)
        return h
