"""Stage rewind (csn.training.interventions.rewind): set chosen stages back to the run's own earlier weights."""

from __future__ import annotations

import pytest
import torch

from csn.errors import CsnError
from csn.runs.io import load_tensors
from csn.runs.naming import state_file
from csn.runs.run import Run
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
