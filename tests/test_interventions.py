"""Interventions as plug-ins (csn.training.interventions): the protocol, the stage rewind, the optimizer choice."""

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

# TINY: 8 steps per epoch, 16 steps in all; resnet8's stages layer1, layer2, layer3 (blocks layer1.0, ...)
EVERY_STEP = "0:end:0.125"


def _rewind(**kw) -> dict:
    return {"kind": "rewind", "stages": ["layer1"], "at": "step=10", "to": "step=5", **kw}


def _stage(state: dict, stage: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(f"{stage}.")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Run:
    """The TINY run without interventions, a checkpoint at every step."""
    return train(tiny_config(checkpoints=EVERY_STEP, threads=1), tmp_path_factory.mktemp("plain") / "run", progress=False)


def test_rewind_sets_the_stages_to_their_earlier_weights_and_leaves_the_rest(tmp_path, plain, one_thread):
    cfg = tiny_config(checkpoints="0:end:0.5", interventions=[_rewind(stages=["layer1", "layer2"])])
    run = train(cfg, tmp_path / "rewound", progress=False)
    steps = [c.step for c in run.checkpoints]
    assert 5 in steps and 10 not in steps  # the source (step 5) is checkpointed though the schedule lacks it
    # before the rewind the runs are the same; the checkpoint at 5 is the plain run's
    assert run.checkpoint(5).sha256 == plain.checkpoint(5).sha256
    # the rewound run's step-8 checkpoint is the plain one's too (8 < 10)
    assert run.checkpoint(8).sha256 == plain.checkpoint(8).sha256
    rec = run.info["interventions"]
    assert rec == [{"kind": "rewind", "stages": ["layer1", "layer2"], "at": "step=10", "to": "step=5", "at_step": 10,
                    "to_step": 5, "tensors": rec[0]["tensors"]}] and rec[0]["tensors"] > 10


def test_rewind_checkpoint_at_the_rewind_holds_the_rewound_weights(tmp_path, plain, one_thread):
    cfg = tiny_config(checkpoints=EVERY_STEP, interventions=[_rewind()])
    run = train(cfg, tmp_path / "r", progress=False, stop_after_step=10)  # the newest optimizer state: step 10's
    at, src, same = run.load_state(run.checkpoint(10)), plain.load_state(plain.checkpoint(5)), plain.load_state(
        plain.checkpoint(10))
    layer1 = _stage(at, "layer1")
    assert layer1 and all(torch.equal(v, src[k]) for k, v in layer1.items())  # weights and BN statistics at step 5
    assert any("running_mean" in k for k in layer1)
    others = {k: v for k, v in at.items() if k not in layer1}
    assert all(torch.equal(v, same[k]) for k, v in others.items())  # the rest is the plain run's at step 10
    # the optimizer state of layer1's parameters is reset (no momentum saved); the others keep theirs
    names = [n for n, _ in run.build_model().named_parameters()]
    momentum = load_tensors(run.ckpt_dir / state_file(10), what="state", fix="")
    kept = {names[int(k.split(".")[1])] for k in momentum}
    assert kept == {n for n in names if not n.startswith("layer1.")}
    # and training goes on from there (resumed after the rewind): later checkpoints differ from the plain run's
    run = train(cfg, tmp_path / "r", resume=True, progress=False)
    assert run.checkpoints[-1].step == 16 and run.checkpoints[-1].sha256 != plain.checkpoints[-1].sha256


def test_rewind_to_step_0_is_the_run_s_own_initialization(tmp_path, one_thread):
    run = train(tiny_config(checkpoints=EVERY_STEP, interventions=[_rewind(stages="layer3", to="0")]), tmp_path / "r",
                progress=False)
    init, at = run.load_state(run.checkpoint(0)), run.load_state(run.checkpoint(10))
    assert all(torch.equal(v, init[k]) for k, v in _stage(at, "layer3").items())
    assert not all(torch.equal(v, init[k]) for k, v in _stage(at, "layer2").items())


def test_a_rewound_run_resumes_bitwise(tmp_path, one_thread):
    cfg = tiny_config(checkpoints="0:end:0.25", interventions=[_rewind()])
    a = train(cfg, tmp_path / "a", progress=False)
    train(cfg, tmp_path / "b", progress=False, stop_after_step=11)  # checkpoint at 8 (and 5), stops after the rewind
    b = train(cfg, tmp_path / "b", resume=True, progress=False)
    assert [c.sha256 for c in a.checkpoints] == [c.sha256 for c in b.checkpoints]


@pytest.mark.parametrize(("entry", "message"), [
    (_rewind(stages=["layer9"]), "unknown stage 'layer9'"),
    (_rewind(at="step=5", to="step=5"), "does not go back in time"),
    (_rewind(at="step=16"), "is not inside training"),
    (_rewind(at="f2"), "outside [0, 1]"),
    (_rewind(when="step=3"), "when"),
    ({"kind": "rewnd", "stages": ["layer1"]}, "rewnd"),
    ({"kind": "selectivity", "alpha": -1}, "reg_* keys"),
])
def test_bad_interventions_are_one_sentence_before_anything_is_written(tmp_path, entry, message):
    with pytest.raises(CsnError, match=None) as e:
        train(tiny_config(interventions=[entry]), tmp_path / "run", progress=False)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


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
