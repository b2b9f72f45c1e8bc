"""TensorBoard: torch's SummaryWriter into RUN/tracker/tensorboard/<part> (`tensorboard --logdir runs/`).

Training logs into the folder `train`, each analysis into its own (`selectivity`, ...), so that TensorBoard shows
them as runs of their own and an analysis that fills in earlier checkpoints later never hides training's points. A
resumed training opens its writer with purge_step = the resumed step + 1: what the interrupted part logged after
its last checkpoint (and the resumed part logs again) is dropped by TensorBoard, not shown twice. The run's config
is logged once, at a fresh start, as hyperparameters (the HPARAMS tab) and as text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csn.runs.trackers import FOLDER, TRAIN, Tracker, finite, flat_config, register_tracker, require

FLUSH_SECS = 10
"""How often the writer flushes to disk (seconds), so a dashboard follows a running training."""


@register_tracker("tensorboard", extra="tensorboard")
class TensorBoardTracker(Tracker):
    """Scalars (float32, as TensorBoard stores them) at optimizer steps; the config as hparams and text."""

    def __init__(self, run_dir: Path, config: dict[str, Any], part: str, start_step: int | None) -> None:
        require("tensorboard", self.name, self.extra)
        writer_cls = require("torch.utils.tensorboard", self.name, self.extra).SummaryWriter
        purge = start_step + 1 if part == TRAIN and start_step else None
        self.log_dir = run_dir / FOLDER / "tensorboard" / part
        self.writer = writer_cls(log_dir=str(self.log_dir), purge_step=purge, flush_secs=FLUSH_SECS)
        if part == TRAIN and not start_step:
            self._hparams(config)

    def _hparams(self, config: dict[str, Any]) -> None:
        summary = require("torch.utils.tensorboard.summary", self.name, self.extra)
        for s in summary.hparams(flat_config(config), {"test/acc": 0.0}):
            self.writer.file_writer.add_summary(s)
        self.writer.add_text("config", "    " + json.dumps(config, indent=2).replace("\n", "\n    "), 0)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in finite(values).items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        self.writer.close()


__all__ = ["TensorBoardTracker"]
