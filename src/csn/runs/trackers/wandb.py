"""Weights & Biases: offline by default, into RUN/tracker/wandb/offline-run-<time>-<id>/ (`wandb sync` uploads).

One W&B run per csn run: its id is made once and kept in RUN/tracker/wandb-id, and every part (training, a resumed
training, each analysis) opens it again with resume="allow", so `wandb sync RUN/tracker/wandb/offline-run-*` puts
them into one run, in order. Values are logged against a step metric of their own, `step` (the optimizer step),
not W&B's internal counter, so an analysis may log earlier checkpoints after training has ended. WANDB_MODE=online
streams instead; WANDB_PROJECT names the project (default: csn).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from csn.runs.io import write_text
from csn.runs.trackers import FOLDER, Tracker, finite, register_tracker, require

STEP = "step"
"""The step metric every logged value is drawn against (the optimizer step)."""


def run_id(run_dir: Path) -> str:
    """The W&B id of the run in `run_dir`: read from RUN/tracker/wandb-id, or made (random) and written there."""
    path = run_dir / FOLDER / "wandb-id"
    if path.is_file():
        return path.read_text().strip()
    rid = secrets.token_hex(8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, rid + "\n")
    return rid


@register_tracker("wandb", extra="wandb")
class WandbTracker(Tracker):
    """A W&B run (offline unless WANDB_MODE says otherwise), its config the run's, values against `step`."""

    def __init__(self, run_dir: Path, config: dict[str, Any], part: str, start_step: int | None) -> None:
        wandb = require("wandb", self.name, self.extra)
        folder = run_dir / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True, disable_git=True, save_code=False)
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(folder), id=run_id(run_dir),
                              resume="allow", project=os.environ.get("WANDB_PROJECT", "csn"),
                              name="/".join(run_dir.resolve().parts[-2:]), config=config, settings=settings,
                              reinit="create_new", job_type=part)
        self.run.define_metric(STEP)
        self.prefixes: set[str] = set()

    def log(self, step: int, values: Mapping[str, float]) -> None:
        values = finite(values)
        for prefix in {k.split("/", 1)[0] for k in values} - self.prefixes:
            self.run.define_metric(f"{prefix}/*", step_metric=STEP)
            self.prefixes.add(prefix)
        self.run.log({**values, STEP: step})

    def close(self) -> None:
        self.run.finish()


__all__ = ["WandbTracker", "run_id"]
