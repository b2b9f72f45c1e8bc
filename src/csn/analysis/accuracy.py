"""Test accuracy of a checkpoint measured the way every analysis measures: eval mode, BatchNorm statistics
re-estimated on a copy by the policy of csn.core.bn (`bn_recalibrated` records the batches), on a whole split or
its fixed seeded subset (csn.analysis.base.SUBSET_SEED).

The training loop scores each checkpoint in eval mode with the running BatchNorm statistics it had at that step.
Early in training those lag the weights (SPEC "BatchNorm lag"): the eval-mode accuracy there understates what the
network computes, and two conditions whose statistics lag differently (a regularized window and the baseline) can
differ for that reason alone. The critical-period map compares accuracy at a window's end with this analysis.

    tables/accuracy.parquet   one row per checkpoint: step, epoch, split, n_images, bn_recalibrated, correct, acc, loss
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field

from csn import dist
from csn.analysis.base import Analysis, Context, Samples, Split, nonfinite_error
from csn.analysis.registry import register_analysis
from csn.core.schema import Schema
from csn.runs.run import Checkpoint
from csn.runs.table import TableSpec

ACCURACY = TableSpec(
    "accuracy",
    {"step": "int64", "epoch": "float64", "split": "str", "n_images": "int64", "bn_recalibrated": "int64",
     "correct": "int64", "acc": "float64", "loss": "float64"},
    key=("step",), settings=("split", "n_images"), row_settings=("bn_recalibrated",),
    flags={"split": "--split", "n_images": "--samples"},
    labels={"bn_recalibrated": "BatchNorm statistics re-estimated from {} batches"})
"""tables/accuracy.parquet: one row per checkpoint."""


class AccuracyOptions(Schema):
    """Options of the Accuracy analysis."""

    split: Split = Field("test", description="Split scored (no augmentation).")
    samples: Samples = Field(None, description="Score a fixed random subset of N images of the split [default: all].",
                             json_schema_extra={"metavar": "N|all"})


def correct_and_loss(model: torch.nn.Module, loader: Any, device: torch.device | str = "cpu") -> tuple[int, float, int]:
    """(correct top-1, summed cross-entropy, images) of an eval-mode model over a loader of (x, y) batches."""
    correct, loss, n = 0, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            out = model(x).float()
            if not bool(torch.isfinite(out).all()):
                raise nonfinite_error("the model's output layer")
            loss += float(F.cross_entropy(out, y, reduction="sum"))
            correct += int((out.argmax(1) == y).sum())
            n += len(y)
    return correct, loss, n


@register_analysis()
class Accuracy(Analysis):
    """Top-1 accuracy and mean cross-entropy at every checkpoint, BatchNorm re-estimated by the policy (or as asked).

    Under torchrun every rank scores its shard of the split and the counts are summed, so the rows equal one
    process's."""

    name = "accuracy"
    Options = AccuracyOptions
    tables = (ACCURACY,)

    def setup(self, ctx: Context) -> None:
        ctx.own["n_images"] = ctx.split_size(self.options.split, self.options.samples)

    def settings(self, ctx: Context) -> dict[str, dict[str, Any]]:
        return {"accuracy": {"split": self.options.split, "n_images": ctx.own["n_images"]}}

    def expected(self, ctx: Context, ckpt: Checkpoint) -> dict[str, pd.DataFrame]:
        return {"accuracy": pd.DataFrame({"step": [np.int64(ckpt.step)],
                                          "bn_recalibrated": [np.int64(ctx.bn[ckpt.step])]})}

    def compute(self, ctx: Context, ckpt: Checkpoint, missing: Mapping[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        o = self.options
        am = ctx.model(ckpt)
        with dist.same_outcome(enabled=ctx.shared):  # a bad batch on one rank stops every rank before the reduction
            correct, loss, n = correct_and_loss(am.model, ctx.loader(o.split, o.samples), ctx.device)
        if ctx.shared and dist.is_dist():
            t = dist.all_reduce_(torch.tensor([correct, loss, n], dtype=torch.float64, device=ctx.device)).tolist()
            correct, loss, n = int(t[0]), t[1], int(t[2])
        row = {"step": ckpt.step, "epoch": float(ckpt.epoch), "split": o.split, "n_images": n,
               "bn_recalibrated": am.bn_recalibrated, "correct": correct, "acc": correct / max(n, 1),
               "loss": loss / max(n, 1)}
        return {"accuracy": ACCURACY.frame([row])}


__all__ = ["ACCURACY", "AccuracyOptions", "Accuracy", "correct_and_loss"]
