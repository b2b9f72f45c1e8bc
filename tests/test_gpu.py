"""Tests that need a CUDA GPU (skipped without one; run on a GPU machine: python3 -m pytest -q tests/test_gpu.py).

- SyncBatchNorm under DDP: one process in an NCCL group of one, told to take csn's distributed path (csn runs a
  single process without DDP), so csn converts BatchNorm to SyncBatchNorm and wraps the model in DDP as under
  torchrun. With one rank SyncBatchNorm takes PyTorch's plain BatchNorm
  path, so this is a smoke test of the GPU-distributed path (conversion, DDP, NCCL collectives in training and
  evaluation), not of statistics over several GPUs; those equal one process on the global batch by PyTorch's
  implementation, and the CPU tests check csn's DDP training against one process (tests/test_distributed.py).
- bf16 autocast + channels_last training runs, writes float32 weights, and resumes from a checkpoint.
- `csn reproduce --preset smoke` end to end on the GPU.
- What runs only on GPUs: the regularizer's masked CSI (no host sync) and the class statistics' deferred
  label check.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from csn.runs.run import Run
from csn.training.loop import train
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _weights(run: Run) -> dict[str, torch.Tensor]:
    return run.load_state(run.checkpoints[-1])


def _rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest relative L2 difference over the float tensors of two state dicts."""
    return max(float((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-12))
               for k in a if a[k].is_floating_point())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sync_batchnorm_under_ddp_on_one_gpu_trains_like_one_process(tmp_path):
    cfg = dict(device="cuda", sync_bn=True, epochs=1.0, checkpoints="0:end:0.5")
    script = textwrap.dedent(f"""
        import json, sys, torch, torch.distributed as dist
        import csn.training.loop as loop
        from tests.conftest import tiny_config
        import csn.dist
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        torch.cuda.set_device(0)
        # csn runs one process without DDP; a group of one takes the distributed path only when told so
        real_is_dist = csn.dist.is_dist
        for mod in [m for n, m in sys.modules.items() if n.startswith("csn")]:
            if getattr(mod, "is_dist", None) is real_is_dist:
                mod.is_dist = dist.is_initialized
        seen = {{}}
        real = loop.sync_batchnorm
        def spy(model, device, enabled=True):
            model, mode = real(model, device, enabled)
            seen["mode"] = mode
            seen["sync_layers"] = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
            return model, mode
        loop.sync_batchnorm = spy
        loop.train(tiny_config(**{cfg!r}), sys.argv[1], progress=False)
        dist.destroy_process_group()
        print(json.dumps(seen))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ddp")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    seen = json.loads(p.stdout.strip().splitlines()[-1])
    assert seen["mode"] == "sync" and seen["sync_layers"] > 0
    ddp, single = Run(tmp_path / "ddp"), train(tiny_config(**cfg), tmp_path / "one", progress=False)
    assert [c.step for c in ddp.checkpoints] == [c.step for c in single.checkpoints]
    # the same arithmetic up to cuDNN's kernel choices: weights within 1e-3 relative after 8 SGD steps
    assert _rel(_weights(ddp), _weights(single)) < 1e-3
    a, b = ddp.read("training"), single.read("training")
    assert (a["train_loss"] - b["train_loss"]).abs().max() < 1e-3


def test_bf16_channels_last_training_runs_and_resumes(tmp_path):
    cfg = tiny_config(device="cuda", amp=True, channels_last=True, epochs=2.0, checkpoints="0:end:0.5")
    whole = train(cfg, tmp_path / "whole", progress=False)
    stats = whole.read("training")
    assert stats["train_loss"].notna().all() and (stats["train_loss"] < 10).all()
    w = _weights(whole)
    assert all(t.dtype == torch.float32 for t in w.values() if t.is_floating_point())  # bf16 only inside autocast
    assert whole.checkpoints[-1].metrics["test_acc"] > 0.4  # 4 learnable classes (chance 0.25)
    train(cfg, tmp_path / "cut", progress=False, stop_after_step=9)  # a checkpoint at step 8, then it stops
    cut = train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert [c.step for c in cut.checkpoints] == [c.step for c in whole.checkpoints]
    # not bitwise on a GPU (cuDNN autotuning, atomics in convolution backward): close, and the same outcome
    assert _rel(_weights(cut), w) < 5e-2
    assert abs(cut.checkpoints[-1].metrics["test_acc"] - whole.checkpoints[-1].metrics["test_acc"]) < 0.1


def test_regularizer_on_gpu_equals_cpu():
    from csn.models import create_model
    from csn.training.regularizer import SelectivityRegularizer

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=10, in_channels=1, image_size=28, width=0.5).double()
    x, y = torch.randn(64, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (64,))
    values = []
    for dev in ("cpu", "cuda"):
        m = model.to(dev)
        reg = SelectivityRegularizer(m, num_classes=10)
        with reg:
            m(x.to(dev))
            r, counted = reg.value_nowait(y.to(dev))
            values.append(float(r.detach()))
            assert bool(counted)
            assert float(reg.value_nowait(torch.zeros(64, dtype=torch.long, device=dev))[0]) == 0.0
    assert abs(values[0] - values[1]) < 1e-9


def test_class_statistics_report_bad_labels_on_gpu_after_the_pass():
    from csn.analysis.selectivity import collect_class_stats
    from csn.errors import CsnError
    from csn.models import create_model

    model = create_model("resnet8", num_classes=4, in_channels=1, image_size=8, width=0.5).cuda()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    good = [(x, torch.arange(16, device="cuda") % 4)]
    stats = collect_class_stats(model, good, "layer1.0", 4, progress=False)
    assert int(stats["layer1.0"].counts.sum()) == 16
    bad = good + [(x, torch.full((16,), 7, device="cuda"))]
    with pytest.raises(CsnError, match="label 7 is out of range for num_classes=4"):
        collect_class_stats(model, bad, "layer1.0", 4, progress=False)
    with pytest.raises(CsnError, match="label -1 is negative"):
        collect_class_stats(model, [(x, torch.full((16,), -1, device="cuda"))], "layer1.0", 4, progress=False)


def test_reproduce_smoke_end_to_end_on_cuda(tmp_path):
    out = tmp_path / "smoke"
    p = subprocess.run([sys.executable, "-m", "csn", "reproduce", "--preset", "smoke", "--set", "train.device=cuda",
                        "--out", str(out), "--quiet"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    claims = json.loads((out / "claims.json").read_text())
    assert [c["claim"] for c in claims["claims"]] == ["C1", "C2", "C3", "C4"]
    assert (out / "report" / "index.html").is_file()
    assert json.loads((out / "baseline-s0" / "run.json").read_text())["device"].startswith("cuda")


def test_a_workers_gpu_memory_share_caps_what_it_may_allocate(monkeypatch):
    """A runner worker sharing its GPU resolves its device with the share set (CSN_GPU_MEMORY_SHARE): an allocation
    past the share fails with CUDA's out-of-memory error instead of starving the other workers."""
    from csn import dist

    monkeypatch.setenv(dist.GPU_SHARE_ENV, "0.01")
    device = dist.resolve_device("cuda")
    try:
        total = torch.cuda.get_device_properties(device).total_memory
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(total * 0.05), dtype=torch.uint8, device=device)
        torch.empty(int(total * 0.001), dtype=torch.uint8, device=device)  # within the share
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_several_runs_share_one_gpu_in_worker_processes(tmp_path):
    """`csn experiment windows --preset smoke device=cuda --parallel 3`: three workers on one GPU (a third of its
    memory each) train every run of the map to its end and write the report."""
    out = tmp_path / "map"
    p = subprocess.run([sys.executable, "-m", "csn", "experiment", "windows", "--preset", "smoke", "--out", str(out),
                        "--parallel", "3", "--quiet", "device=cuda"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [json.loads(f.read_text()) for f in out.glob("*/run.json")]
    assert len(runs) >= 3 and all(r["device"].startswith("cuda") for r in runs)
    assert (out / "report" / "index.html").is_file()
