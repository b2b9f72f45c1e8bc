"""Foundation: data, models, run directory, training loop, resume, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from csn.cli import main as cli
from csn.core.trace import run_with_cache
from csn.core.units import default_layers, resolve_layers, stages
from csn.data import BatchLoader, load_dataset, random_crop_flip, read_idx, synthetic, write_idx
from csn.errors import CsnError
from csn.models import create_model, list_models
from csn.runs import Run, atomic_path, sha256_file, write_json
from csn.runs.config import load_config_file, preset
from csn.training.loop import train
from tests.conftest import tiny_config


# ----------------------------------------------------------------------------- data
def _write_idx_dir(root: Path, n_train=40, n_test=20, classes=3, gz=True) -> None:
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    write_idx(root / f"train-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_train, 6, 6), dtype=np.uint8))
    write_idx(root / f"train-labels-idx1-ubyte{suffix}", (np.arange(n_train) % classes).astype(np.uint8))
    write_idx(root / f"t10k-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n_test, 6, 6), dtype=np.uint8))
    write_idx(root / f"t10k-labels-idx1-ubyte{suffix}", (np.arange(n_test) % classes).astype(np.uint8))


@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_roundtrip(tmp_path, gz):
    arr = np.random.default_rng(1).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(p, arr)
    np.testing.assert_array_equal(read_idx(p), arr)
    # a hand-built header, independent of write_idx
    raw = bytes([0, 0, 8, 1]) + (3).to_bytes(4, "big") + bytes([7, 8, 9])
    (tmp_path / "b.idx").write_bytes(raw)
    assert read_idx(tmp_path / "b.idx").tolist() == [7, 8, 9]


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(CsnError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"abc")
    with pytest.raises(CsnError, match="truncated"):
        read_idx(tmp_path / "short")


def test_idx_directory_dataset(tmp_path):
    _write_idx_dir(tmp_path, classes=3)
    data = load_dataset("idx", str(tmp_path))
    assert data.num_classes == 3 and data.in_channels == 1 and data.image_size == 6
    assert data.train.images.shape == (40, 1, 6, 6) and data.train.images.dtype == torch.uint8
    with pytest.raises(CsnError, match="--data-root"):
        load_dataset("idx", None)


def test_missing_fashion_mnist_names_apt_get(tmp_path, monkeypatch):
    monkeypatch.setenv("CSN_FASHION_MNIST", str(tmp_path))
    with pytest.raises(CsnError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_package():
    data = load_dataset("fashion-mnist")
    assert len(data.train) == 60000 and len(data.test) == 10000 and data.num_classes == 10
    assert data.class_names[0] == "T-shirt/top"
    assert torch.bincount(data.test.labels).tolist() == [1000] * 10


def test_augmentation_shapes_determinism_and_content():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    a = random_crop_flip(x, torch.Generator().manual_seed(3), pad=2, flip=True)
    b = random_crop_flip(x, torch.Generator().manual_seed(3), pad=2, flip=True)
    assert a.shape == x.shape and torch.equal(a, b)
    # every output is a shifted (maybe flipped) window of the zero-padded input
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [xp[i, :, r:r + 5, c:c + 5] for r in range(5) for c in range(5)]
        assert any(torch.equal(a[i], w) or torch.equal(a[i], w.flip(2)) for w in windows)
    assert torch.equal(random_crop_flip(x, torch.Generator(), pad=0, flip=False), x)


def test_loader_batches_shuffle_and_resume_slice():
    data = synthetic(num_train=100, num_test=10, num_classes=4, size=6)
    loader = BatchLoader(data.train, 16, shuffle=True, seed=5, augment={"crop_pad": 1, "flip": True}, drop_last=True)
    loader.set_epoch(2)
    full = list(loader)
    assert len(full) == 6 and all(x.shape == (16, 1, 6, 6) for x, _ in full)
    loader.set_epoch(2, start_batch=3)
    tail = list(loader)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[3:], tail))
    loader.set_epoch(3)
    assert not torch.equal(next(iter(loader))[1], full[0][1])
    # data-parallel ranks see slices of the same global batch
    parts = [list(BatchLoader(data.train, 16, shuffle=True, seed=5, drop_last=True, rank=r, world_size=2)) for r in (0, 1)]
    single = list(BatchLoader(data.train, 16, shuffle=True, seed=5, drop_last=True))
    assert torch.equal(torch.cat([parts[0][0][1], parts[1][0][1]]), single[0][1])


def test_synthetic_is_seeded_and_learnable():
    a, b = synthetic(seed=3), synthetic(seed=3)
    assert torch.equal(a.train.images, b.train.images)
    # class prototypes are separable: nearest class mean classifies well above chance
    means = torch.stack([a.train.images[a.train.labels == k].mean(0) for k in range(4)]).flatten(1)
    pred = torch.cdist(a.test.images.flatten(1), means).argmin(1)
    assert (pred == a.test.labels).float().mean() > 0.6


# ----------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", list_models())
def test_every_model_forward_and_read_points(name):
    big = name in ("resnet18", "resnet34", "resnet50")
    size = 32 if big else 16
    model = create_model(name, num_classes=7, in_channels=2, width=0.25 if big else 0.5, image_size=size).eval()
    x = torch.randn(3, 2, size, size)
    out, cache = run_with_cache(model, x)
    assert out.shape == (3, 7)
    layers = default_layers(model)
    assert layers and set(cache) == set(layers)
    for acts in cache.values():
        assert acts.shape[0] == 3 and acts.dim() == 2
    st = stages(model)
    first = list(st)[0]
    assert torch.allclose(model.forward_from(first, model.forward_until(first, x)), out, atol=1e-6)
    if name.startswith("resnet"):
        assert all(s.startswith("layer") for s in st)


def test_imagenet_resnet_state_dict_keys_match_torchvision_naming():
    keys = set(create_model("resnet50", num_classes=1000).state_dict())
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
              "layer4.2.bn3.bias", "fc.weight", "fc.bias"):
        assert k in keys
    m = create_model("resnet50", num_classes=1000)
    assert len(keys) == 320 and len(list(m.parameters())) == 161  # as torchvision's resnet50
    assert sum(p.numel() for p in m.parameters()) == 25557032


def test_unknown_model_and_layer_errors():
    with pytest.raises(CsnError, match="closest: 'resnet20'"):
        create_model("resnt20")
    model = create_model("resnet20", in_channels=1)
    with pytest.raises(CsnError, match="matches no module"):
        resolve_layers(model, ["layer9.*"])
    assert resolve_layers(model, ["layer2.*"]) == ["layer2.0", "layer2.1", "layer2.2"]
    seq = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    assert resolve_layers(seq, ["1"]) == ["1"]
    with pytest.raises(CsnError, match="declares no read points"):
        resolve_layers(seq)


# ----------------------------------------------------------------------------- run directory
def test_atomic_write_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_manifest_sha256_and_corruption_detected(tiny_run):
    run = Run(tiny_run)
    ckpts = run.checkpoints
    assert ckpts[0].step == 0 and ckpts[-1].step == run.info["total_steps"]
    assert [c.step for c in ckpts] == run.info["checkpoint_steps"]
    for c in ckpts:
        assert sha256_file(run.ckpt_dir / c.file) == c.sha256
        assert {"test_acc", "test_loss"} <= set(c.metrics)
    assert abs(ckpts[1].epoch - ckpts[1].step / run.info["steps_per_epoch"]) < 1e-12
    f = run.ckpt_dir / ckpts[1].file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CsnError, match="corrupt"):
        run.load_model(ckpts[1])
    run.load_model(ckpts[0])


def test_training_table_and_accuracy(tiny_run):
    run = Run(tiny_run)
    df = run.read("training")
    assert {"step", "epoch", "lr", "alpha", "train_loss", "train_acc", "reg_value"} <= set(df.columns)
    assert df["step"].is_monotonic_increasing and (df["alpha"] == 0).all()
    assert run.checkpoints[-1].metrics["test_acc"] > 0.5  # learnable synthetic data, 4 classes


def test_training_is_deterministic_and_resume_is_bitwise(tmp_path):
    cfg = tiny_config(epochs=1.0, checkpoints="0:end:0.25", augment="crop+flip")
    a = train(cfg, tmp_path / "a", progress=False)
    b = train(cfg, tmp_path / "b", progress=False, stop_after_step=3)  # dies after step 3 (checkpoint at 2)
    assert [c.step for c in Run(tmp_path / "b").checkpoints] == [0, 2]
    b = train(cfg, tmp_path / "b", resume=True, progress=False)
    sa, sb = a.load_state(a.checkpoints[-1]), b.load_state(b.checkpoints[-1])
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [c.sha256 for c in a.checkpoints] == [c.sha256 for c in b.checkpoints]
    ta, tb = a.read("training"), b.read("training")
    assert ta.drop(columns="time_s").equals(tb.drop(columns="time_s"))


def test_existing_output_and_resume_with_other_config(tmp_path):
    cfg = tiny_config(epochs=0.25, checkpoints="0:end:0.25")
    train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(CsnError, match="already exists"):
        train(cfg, tmp_path / "r", progress=False)
    with pytest.raises(CsnError, match=r"lr: 0.05 in the run, 0.2 now"):
        train(tiny_config(epochs=0.25, checkpoints="0:end:0.25", lr=0.2), tmp_path / "r", resume=True, progress=False)
    train(cfg, tmp_path / "r", force=True, progress=False)


def test_resume_accepts_the_same_checkpoint_steps_written_another_way(tmp_path):
    # The presets' schedules moved from epoch segments to fractions (same steps): older runs still resume.
    train(tiny_config(epochs=1.0, checkpoints="0:end:0.5"), tmp_path / "r", progress=False, stop_after_step=2)
    spe = Run(tmp_path / "r").info["steps_per_epoch"]
    same = tiny_config(epochs=1.0, checkpoints="f0.5,end")
    assert tiny_config(epochs=1.0, checkpoints="0:end:0.5").diff(same, steps_per_epoch=spe) == {}
    assert "checkpoints" in tiny_config(epochs=1.0, checkpoints="0:end:0.5").diff(same)  # text differs, no steps given
    run = train(same, tmp_path / "r", resume=True, progress=False)
    assert [c.step for c in run.checkpoints] == [0, spe // 2, spe]
    with pytest.raises(CsnError, match="checkpoints: 'f0.5,end' in the run, 'f0.25,end' now"):
        train(tiny_config(epochs=1.0, checkpoints="f0.25,end"), tmp_path / "r", resume=True, progress=False)


# ----------------------------------------------------------------------------- config and CLI
def test_config_overrides_and_files(tmp_path):
    cfg = preset("fmnist").override(["epochs=2", "width=1.5", "milestones=[1,2]", "reg_layers=layer1.0,layer1.1"])
    assert cfg.epochs == 2.0 and cfg.width == 1.5 and cfg.milestones == [1, 2] and cfg.reg_layers == ["layer1.0", "layer1.1"]
    with pytest.raises(CsnError, match="closest: 'epochs'"):
        cfg.override(["epoch=3"])
    with pytest.raises(CsnError, match="expects a float"):
        cfg.override(["lr=fast"])
    (tmp_path / "c.toml").write_text('preset = "smoke"\nepochs = 1.5\nseed = 3\n')
    c = load_config_file(tmp_path / "c.toml")
    assert c.dataset == "synthetic" and c.epochs == 1.5 and c.seed == 3
    (tmp_path / "c.yaml").write_text("model: cnn\nbatch-size: 64\n")
    assert load_config_file(tmp_path / "c.yaml").batch_size == 64
    (tmp_path / "bad.toml").write_text("epochs = = 3")
    with pytest.raises(CsnError, match="not valid"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "evil.yaml").write_text("!!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(CsnError):
        load_config_file(tmp_path / "evil.yaml")


@pytest.mark.parametrize("args,message", [
    (["train", "--preset", "fmnst"], "unknown preset 'fmnst' (closest: 'fmnist')"),
    (["train", "--preset", "smoke", "--model", "resnt20"], "unknown model 'resnt20'"),
    (["train", "--preset", "smoke", "--dataset", "cifar"], "unknown dataset 'cifar'"),
    (["train", "--preset", "smoke", "lr_schedul=cosine"], "unknown config key 'lr_schedul'"),
    (["train", "--preset", "smoke", "--reg-alpha", "-2"], "window"),
    (["info", "/nonexistent/run"], "not a csn run"),
])
def test_cli_bad_input_one_line_and_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(cli, args + (["--out", str(tmp_path / "o")] if args[0] == "train" else []))
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_cli_train_and_info(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(cli, ["train", "--preset", "smoke", "--out", str(out), "--quiet", "epochs=0.5",
                                   "checkpoints=0:end:0.25"])
    assert res.exit_code == 0, res.output
    assert f"run written to {out}" in res.output
    res = CliRunner().invoke(cli, ["info", str(out)])
    assert res.exit_code == 0 and "checkpoints" in res.output and "training.parquet" in res.output
    for cmd in ([], ["train"], ["info"]):
        assert CliRunner().invoke(cli, cmd + ["--help"]).exit_code == 0


def test_console_script_runs_as_module():
    res = subprocess.run([sys.executable, "-m", "csn", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "csn train" in res.stdout
