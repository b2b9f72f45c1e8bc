"""GPU benchmark of the ImageNet-shaped path (ResNet-50, 224x224, bf16 autocast, channels_last), 1..N GPUs.

Measures, on synthetic ImageNet-shaped data held on the GPU (uint8 images, 1000 classes, so the data
pipeline is the same cheap gather + normalize for both loops and the numbers compare the loops):

1. training images/s of csn's loop (`csn.training.loop.train`, the one `csn train` runs) against a
   minimal hand-written (DDP) loop on the same model, batch, optimizer and data   (target >= 0.95);
2. the selectivity regularizer's overhead: csn's loop with / without it           (target <= 1.10);
3. a CSI pass (`collect_class_stats` over every read point, 1000 classes) against a plain eval
   pass over the same batches                                                     (target <= 1.10).

Run it on one GPU, or under torchrun on several (batch is per GPU; the global batch is batch x GPUs;
SyncBatchNorm as csn uses it by default, in both loops):

    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --model resnet8 --image-size 28 --channels 1 --classes 10 --batch 128 \\
        --eval-batch 1000     # the fmnist preset's model and batch on Fashion-MNIST-shaped data
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_gpu.py [--batch 256] [--steps 80]

Without CUDA it prints what it would run and exits 0. Rank 0 prints the exact command line, the
device, every timing and a Markdown block for benchmarks/RESULTS.md (and writes --json FILE).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TARGETS = {"train_ratio": 0.95, "reg_overhead": 1.10, "csi_overhead": 1.10}
IMAGENET_TRAIN = 1_281_167  # images in the ImageNet-1k training split (one epoch)
_CPU = [False]  # --cpu: smoke test on the CPU


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not _CPU[0] else torch.device("cpu")


def _sync() -> None:
    if _device().type == "cuda":
        torch.cuda.synchronize()


def _autocast(args):
    dev = _device()
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.amp and dev.type == "cuda")


def command_line() -> str:
    """The exact command that started this process (torchrun form when launched by torchrun)."""
    args = " ".join(sys.argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_WORLD_SIZE" in os.environ:
        return f"torchrun --standalone --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')} {args}"
    return f"{Path(sys.executable).name} {args}"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--batch", type=int, default=256, help="training batch per GPU (global = batch x GPUs)")
    ap.add_argument("--eval-batch", type=int, default=250, help="evaluation batch per GPU for the CSI pass")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--channels", type=int, default=3, help="input channels (1: Fashion-MNIST-shaped data)")
    ap.add_argument("--warmup", type=int, default=20, help="steps excluded from timing (cudnn autotuning, allocator)")
    ap.add_argument("--steps", type=int, default=80, help="timed training steps per measurement")
    ap.add_argument("--eval-batches", type=int, default=20, help="batches per GPU in the CSI / plain eval passes")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions; the median is reported")
    ap.add_argument("--pool", type=int, default=8, help="distinct training batches held on each GPU (data reuse)")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 instead of bf16 autocast")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--no-sync-bn", dest="sync_bn", action="store_false", help="per-GPU BatchNorm statistics")
    ap.add_argument("--lr", type=float, default=0.001, help="small: random labels must not diverge")
    ap.add_argument("--json", help="also write the results to this JSON file (rank 0)")
    ap.add_argument("--cpu", action="store_true",
                    help="smoke-test this script on the CPU (use a small --model/--image-size; numbers are meaningless)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# data: uint8 ImageNet-shaped images on the GPU, fed through csn's BatchLoader in both loops
# ------------------------------------------------------------------------------------------------

def make_data(args, device: torch.device, world: int):
    """DataSplits with GPU-resident uint8 images (ImageNet mean/std with 3 channels, else 0.5/0.25); the same on
    every rank (seeded)."""
    from csn.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
    from csn.data.tensors import DataSplits, TensorSplit

    g = torch.Generator(device=device).manual_seed(0)
    s, c = args.image_size, args.channels
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ((0.5,) * c, (0.25,) * c)

    def split(n: int) -> TensorSplit:
        x = torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, device=device, generator=g)
        y = torch.randint(0, args.classes, (n,), device=device, generator=g)
        return TensorSplit(x, y, mean, std)

    train = split(args.pool * args.batch * world)  # `pool` global batches per epoch
    test = split(args.eval_batches * args.eval_batch * world)
    return DataSplits(f"synthetic-{c}x{s}x{s}", train, test, args.classes, c, s, [str(k) for k in range(args.classes)])


def csn_config(args, world: int, reg: bool):
    from csn.runs.config import TrainConfig

    spe = args.pool
    total = args.warmup + args.steps
    d = dict(name="bench", dataset="synthetic", model=args.model, width=1.0, batch_size=args.batch * world,
             epochs=total / spe, lr=args.lr, momentum=0.9, weight_decay=1e-4, lr_schedule="constant",
             checkpoints="step=end", eval_batch_size=args.eval_batch, log_every=10, amp=args.amp,
             channels_last=args.channels_last, sync_bn=args.sync_bn, device=str(_device()), augment="none",
             eval_samples=args.eval_batch * world, seed=0)
    if reg:
        d.update(reg_alpha=-1.0, reg_window="0:end")  # default layers: every stage but the last
    if (args.warmup % 10) or (total % 10):
        raise SystemExit("--warmup and --steps must be multiples of 10 (csn logs every 10 steps)")
    return TrainConfig.from_dict(d)


# ------------------------------------------------------------------------------------------------
# the three measurements
# ------------------------------------------------------------------------------------------------

def csn_rate(args, data, world: int, reg: bool) -> float:
    """Images/s of csn's loop over the timed steps (from its own training table, measured inside the loop)."""
    import csn.training.loop as loop
    from csn import dist as distributed

    cfg = csn_config(args, world, reg)
    real = loop.load_data
    loop.load_data = lambda _cfg: data  # the GPU-resident synthetic ImageNet
    try:
        with tempfile.TemporaryDirectory() as d:
            path = distributed.broadcast_object(d)  # rank 0's folder (rank 0 alone writes)
            run = loop.train(cfg, Path(path) / "run", progress=False)
            log = run.read("training") if distributed.is_main() else None
    finally:
        loop.load_data = real
    rate = None
    if log is not None:
        t = dict(zip(log["step"], log["time_s"]))
        total = args.warmup + args.steps
        rate = args.steps * cfg.batch_size / (t[total] - t[args.warmup])
    return distributed.broadcast_object(rate)


def hand_rate(args, data, world: int) -> float:
    """Images/s of the loop anyone would write: DDP(model), autocast, SGD; no logging, no checkpoints."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from csn import dist as distributed
    from csn.data import BatchLoader
    from csn.models import create_model

    device = _device()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_channels=args.channels,
                         image_size=args.image_size).to(device)
    if world > 1 and args.sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    loader = BatchLoader(data.train, args.batch * world, shuffle=True, seed=0, drop_last=True, rank=distributed.rank(),
                         world_size=world, device=device, channels_last=args.channels_last)
    model.train()
    step, total, t0 = 0, args.warmup + args.steps, 0.0
    epoch = 0
    while step < total:
        loader.set_epoch(epoch)
        epoch += 1
        for x, y in loader:
            if step == args.warmup:
                _sync()
                distributed.barrier()
                t0 = time.perf_counter()
            with _autocast(args):
                loss = F.cross_entropy(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step >= total:
                break
    _sync()
    distributed.barrier()
    return args.steps * args.batch * world / (time.perf_counter() - t0)


def eval_passes(args, data, world: int) -> tuple[float, float]:
    """(plain eval pass seconds, CSI pass seconds) over this rank's shard of the evaluation batches."""
    from csn import dist as distributed
    from csn.analysis.selectivity import collect_class_stats
    from csn.core.units import resolve_layers
    from csn.data import BatchLoader
    from csn.data.loaders import shard_split
    from csn.models import create_model

    device = _device()
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_channels=args.channels,
                         image_size=args.image_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    layers = resolve_layers(model, None)
    shard = shard_split(data.test, args.eval_batch)
    loader = BatchLoader(shard, args.eval_batch, device=device, channels_last=args.channels_last)

    def plain() -> None:
        with torch.no_grad():
            for x, _ in loader:
                model(x)

    def csi() -> None:
        collect_class_stats(model, loader, layers, args.classes, reduce=distributed.all_reduce_, progress=False)

    def timed(fn) -> float:
        _sync()
        distributed.barrier()
        t0 = time.perf_counter()
        with _autocast(args):
            fn()
        _sync()
        distributed.barrier()
        return time.perf_counter() - t0

    timed(plain), timed(csi)  # warm-up (cudnn autotuning for the eval shapes)
    p, c = [], []
    for _ in range(max(args.reps, 3)):
        p.append(timed(plain))
        c.append(timed(csi))
    return statistics.median(p), statistics.median(c)


def main(argv=None) -> int:
    args = parse_args(argv)
    cmd = command_line()
    _CPU[0] = args.cpu
    if not torch.cuda.is_available() and not args.cpu:
        if int(os.environ.get("RANK", "0")) == 0:
            print("bench_gpu: skipped - no CUDA device here (this benchmark measures GPU throughput).")
            print(f"  would run: {cmd}")
            print("  on a CUDA machine: python benchmarks/bench_gpu.py  |  "
                  "torchrun --standalone --nproc_per_node=8 benchmarks/bench_gpu.py")
        return 0
    from csn import dist as distributed

    distributed.init_from_env()
    world, main_rank = distributed.world_size(), distributed.is_main()
    device = _device()
    torch.backends.cudnn.benchmark = True
    os.environ.setdefault("CSN_NO_PROGRESS", "1")
    data = make_data(args, device, world)

    hand, ours, ours_reg = [], [], []
    for _ in range(args.reps):
        hand.append(hand_rate(args, data, world))
        ours.append(csn_rate(args, data, world, reg=False))
        ours_reg.append(csn_rate(args, data, world, reg=True))
    plain_s, csi_s = eval_passes(args, data, world)
    h, o, r = statistics.median(hand), statistics.median(ours), statistics.median(ours_reg)
    eval_images = args.eval_batches * args.eval_batch * world
    res = {
        "command": cmd, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)", "gpus": world, "torch": torch.__version__,
        "python": platform.python_version(), "model": args.model, "batch_per_gpu": args.batch,
        "global_batch": args.batch * world, "amp_bf16": args.amp, "channels_last": args.channels_last,
        "sync_bn": bool(args.sync_bn and world > 1 and device.type == "cuda"), "timed_steps": args.steps, "warmup_steps": args.warmup,
        "reps": args.reps, "hand_img_s": h, "csn_img_s": o, "csn_reg_img_s": r, "train_ratio": o / h,
        "reg_overhead": o / r, "eval_images": eval_images, "plain_eval_img_s": eval_images / plain_s,
        "csi_img_s": eval_images / csi_s, "csi_overhead": csi_s / plain_s,
        "imagenet_epoch_min": IMAGENET_TRAIN / o / 60,
        "all": {"hand": hand, "csn": ours, "csn_reg": ours_reg},
    }
    if main_rank:
        ok = {"train_ratio": res["train_ratio"] >= TARGETS["train_ratio"],
              "reg_overhead": res["reg_overhead"] <= TARGETS["reg_overhead"],
              "csi_overhead": res["csi_overhead"] <= TARGETS["csi_overhead"]}
        res["meets_targets"] = ok
        print(f"command: {cmd}")
        print(f"device: {world} x {res['device']}, torch {res['torch']}; {args.model}, {args.image_size}x{args.image_size}, "
              f"batch {args.batch}/GPU (global {args.batch * world}), bf16 autocast {args.amp}, channels_last "
              f"{args.channels_last}, SyncBatchNorm {res['sync_bn']}; {args.steps} timed steps after {args.warmup}, "
              f"median of {args.reps}")
        print(f"hand-written DDP loop : {h:9.0f} img/s")
        print(f"csn train             : {o:9.0f} img/s   ratio {o / h:.3f} (target >= {TARGETS['train_ratio']}) "
              f"{'ok' if ok['train_ratio'] else 'MISSED'}")
        print(f"csn train + regularizer: {r:8.0f} img/s   overhead {o / r:.3f} (target <= {TARGETS['reg_overhead']}) "
              f"{'ok' if ok['reg_overhead'] else 'MISSED'}")
        if args.image_size == 224:
            print(f"one ImageNet epoch ({IMAGENET_TRAIN:,} images) at csn's rate: {res['imagenet_epoch_min']:.1f} min "
                  f"(90 epochs: {90 * res['imagenet_epoch_min'] / 60:.1f} h; data loading from disk not included)")
        print(f"plain eval pass       : {res['plain_eval_img_s']:9.0f} img/s   CSI pass {res['csi_img_s']:.0f} img/s   "
              f"overhead {res['csi_overhead']:.3f} (target <= {TARGETS['csi_overhead']}) {'ok' if ok['csi_overhead'] else 'MISSED'}")
        print("\nFor benchmarks/RESULTS.md:\n")
        print(f"| {res['device']} x{world} | {args.model} b{args.batch}/GPU bf16={args.amp} cl={args.channels_last} | "
              f"hand {h:.0f} img/s | csn {o:.0f} img/s ({o / h:.3f}) | reg overhead {o / r:.3f} | CSI overhead "
              f"{res['csi_overhead']:.3f} |")
        print(f"\n    {cmd}")
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
