"""Interventions as plug-ins (csn.training.interventions): the protocol, the regularizer as one, the optimizer choice
(the stage rewind has its own tests: test_rewind.py)."""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from csn.core.schema import Schema
from csn.errors import CsnError
from csn.runs.io import load_tensors
from csn.runs.naming import state_file
from csn.runs.run import Run
from csn.training.interventions import INTERVENTIONS, Intervention, register
from csn.training.interventions.base import parse_interventions
from csn.training.loop import train
from tests.conftest import tiny_config


def test_interventions_key_must_hold_tables_with_a_kind():
    with pytest.raises(CsnError, match="kind"):
        tiny_config(interventions=[{"stages": ["layer1"]}])
    assert tiny_config(interventions={"kind": "rewind", "stages": "layer1", "at": 1}).interventions == [
        {"kind": "rewind", "stages": "layer1", "at": 1}]  # one table is a list of one


class _Counting(Intervention):
    """A toy intervention defined outside csn: counts its hook calls and adds a zero loss term."""

    kind = "test-counting"
    Options: ClassVar = Schema  # no keys
    calls: ClassVar[dict[str, int]] = {}

    def before_forward(self, step: int) -> None:
        self.calls["before"] = self.calls.get("before", 0) + 1

    def loss_term(self, labels: torch.Tensor) -> torch.Tensor:
        self.calls["loss"] = self.calls.get("loss", 0) + 1
        return labels.new_zeros((), dtype=torch.float32)

    def after_step(self, step: int) -> None:
        self.calls.setdefault("steps", []).append(step)

    def record(self) -> dict[str, Any]:
        return {"seen": "yes"}


def test_a_new_intervention_is_one_registered_class(tmp_path, one_thread):
    register(_Counting)
    try:
        run = train(tiny_config(epochs=0.5, checkpoints="0:end:0.25", interventions=[{"kind": "test-counting"}]),
                    tmp_path / "r", progress=False)
    finally:
        INTERVENTIONS.unregister("test-counting")
    assert _Counting.calls["before"] == _Counting.calls["loss"] == 4 and _Counting.calls["steps"] == [1, 2, 3, 4]
    assert json.loads((run.path / "run.json").read_text())["interventions"] == [{"kind": "test-counting", "seen": "yes"}]


def test_the_regularizer_is_the_selectivity_intervention(tmp_path, one_thread):
    cfg = tiny_config(epochs=1.0, reg_alpha=-2.0, reg_window="step=2:step=6")
    assert [c.kind for c, _ in parse_interventions(cfg)] == ["selectivity"]
    assert parse_interventions(tiny_config()) == []
    run = train(cfg, tmp_path / "r", progress=False)
    (rec,) = run.info["interventions"]
    assert rec["kind"] == "selectivity" and rec["steps"] == [{"start_step": 2, "end_step": 6, "alpha": -2.0}]
    assert rec["statistic"] == "means" and rec["group"] == "batch" and rec["reduce"] == "mean"
    df = run.read("training")
    assert set(df.loc[df["alpha"] != 0, "step"]) == {4, 6}  # log lines at the end of steps 3-4 and 5-6


def test_adamw_trains_and_resumes_bitwise(tmp_path, one_thread):
    cfg = tiny_config(epochs=1.0, checkpoints="0:end:0.25", optimizer="adamw", lr=1e-3, weight_decay=0.05)
    a = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after_step=5)
    b = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert [c.sha256 for c in a.checkpoints] == [c.sha256 for c in b.checkpoints]
    state = load_tensors(a.ckpt_dir / state_file(8), what="state", fix="")
    assert {k.split(".")[0] for k in state} == {"exp_avg", "exp_avg_sq", "step"}
    assert float(state["step.0"]) == 8
    sgd = Run(train(tiny_config(epochs=1.0, checkpoints="0:end:0.25"), tmp_path / "sgd", progress=False).path)
    assert a.checkpoints[-1].sha256 != sgd.checkpoints[-1].sha256


def test_nesterov_is_sgd_s():
    with pytest.raises(CsnError, match="nesterov"):
        tiny_config(optimizer="adamw", nesterov=True)
