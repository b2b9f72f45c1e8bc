"""GPU benchmark of the ablation sweep (issue 17): the fast path against `--naive` on ResNet-50, and what the
numbers imply for the study's full protocol.

What it does, on one GPU (or the CPU with --cpu and a small model, to check the script):
  1. builds the model (random weights: the cost of a sweep does not depend on them) and --images synthetic
     uint8 images of the study's shape held on the GPU, read through csn's BatchLoader (normalized on the GPU);
  2. ranks the units as the Ablation analysis does (`collect_class_stats` over the same images: one pass);
  3. runs one sweep over every stage with the study's orders (selective + random, --draws random draws, the
     default grid) on the fast path and on the naive path (a full forward pass per distinct mask), timed with
     the GPU synchronized, after one untimed warm-up sweep on a few images (cuDNN autotuning);
  4. compares the two frames (correct counts; on GPUs cuDNN may pick batch-size-dependent kernels, so a
     prediction on a near-tie can flip: the number of differing counts is reported, not asserted);
  4b. with --bf16: the ranking pass and the fast sweep in fp32 and under bf16 autocast, timed, and the correct
     counts that move (bench_bf16_analyses.compare; with random weights logits are near ties, so this bounds the
     flips from above);
  5. measures how fast JPEGs decode through csn's ImageFolder path (torchvision; Resize 256 + CenterCrop 224,
     --workers DataLoader processes) on --decode-images generated JPEGs of ImageNet's typical size;
  6. extrapolates to the study's protocol: --checkpoints checkpoints x (ranking pass + sweep) over
     --val-images validation images, with the decoded validation set held in GPU memory (no decoding) and
     with JPEG decoding (each pass over the split decodes it once; workers decode while the GPU computes, so a
     pass takes the longer of the two).

    python benchmarks/bench_gpu_ablation.py                          # ResNet-50, 1000 images, 224x224
    python benchmarks/bench_gpu_ablation.py --cpu --model resnet8 --image-size 32 --classes 10 --images 64 \\
        --eval-batch 32 --decode-images 0                            # check the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_bf16_analyses import HEADER, compare, row
from bench_selectivity import sync

STUDY_CHECKPOINTS = 23  # the study's ResNet-50 checkpoints with ablation sweeps (issue 17)
IMAGENET_VAL = 50_000


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--images", type=int, default=1000, help="synthetic evaluation images in the timed sweeps")
    ap.add_argument("--eval-batch", type=int, default=250)
    ap.add_argument("--draws", type=int, default=3, help="random draws per (stage, n) (csn's default)")
    ap.add_argument("--orders", default="selective,random", help="the study's: selective + random")
    ap.add_argument("--checkpoints", type=int, default=STUDY_CHECKPOINTS)
    ap.add_argument("--val-images", type=int, default=IMAGENET_VAL)
    ap.add_argument("--decode-images", type=int, default=1600, help="JPEGs to generate and decode (0: skip)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers for decoding [default: CPU count]")
    ap.add_argument("--skip-naive", action="store_true", help="time the fast path only")
    ap.add_argument("--bf16", action="store_true", help="also time the ranking pass and the fast sweep under bf16 "
                    "autocast and count how many correct counts move from fp32's (issue 28 item 3)")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (a check of the script; numbers meaningless)")
    return ap.parse_args(argv)


def make_loader(args, dev: torch.device, n: int):
    from csn.data import BatchLoader
    from csn.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD
    from csn.data.tensors import TensorSplit

    g = torch.Generator(device=dev).manual_seed(0)
    s = args.image_size
    x = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, device=dev, generator=g)
    y = (torch.arange(n, device=dev) % args.classes)[torch.randperm(n, device=dev, generator=g)]  # every class
    return BatchLoader(TensorSplit(x, y, IMAGENET_MEAN, IMAGENET_STD), args.eval_batch, shuffle=False, device=dev)


def timed(fn, dev: torch.device):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def decode_rate(args, dev: torch.device) -> dict:
    """Images/s through csn's ImageFolder eval path (JPEG decode + Resize 256 + CenterCrop 224 + to the GPU)."""
    from PIL import Image

    from csn.data.imagefolder import imagefolder
    from csn.data.loaders import folder_loader

    workers = args.workers or os.cpu_count() or 1
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        classes = 10
        for split, per in (("train", 1), ("val", -(-args.decode_images // classes))):
            for c in range(classes):
                d = Path(root, split, f"n{c:08d}")
                d.mkdir(parents=True)
                for i in range(per):
                    # smooth content (upsampled noise) at ImageNet's typical 500x375, quality 90: noise JPEGs
                    # would be far larger and slower to decode than photographs
                    small = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
                    Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(d / f"{i}.JPEG", quality=90)
        data = imagefolder(root)
        loader = folder_loader(data.test, batch_size=args.eval_batch, train=False, device=dev, workers=workers)
        seen, t_first, t0 = 0, None, time.perf_counter()
        for x, _ in loader:
            sync(dev)
            if t_first is None:  # the first batch pays for starting the workers: count from there
                t_first = time.perf_counter()
            else:
                seen += int(x.shape[0])
        elapsed = time.perf_counter() - (t_first or t0)
        size = sum(p.stat().st_size for p in Path(root, "val").rglob("*.JPEG")) / len(data.test)
    return {"decode_img_s": seen / elapsed if seen else float("nan"), "decode_workers": workers,
            "decode_images": len(data.test), "jpeg_kib": size / 1024}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        print("bench_gpu_ablation: skipped - no CUDA device here (pass --cpu to check the script on a CPU).")
        return 0
    from csn.analysis.ablation import ablation_sweep
    from csn.analysis.ablation.analysis import means_and_csi, resolve_stages
    from csn.analysis.selectivity import collect_class_stats
    from csn.models import create_model

    dev = torch.device("cpu" if args.cpu else "cuda")
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=args.classes, in_channels=3, image_size=args.image_size).to(dev).eval()
    stage_layers = resolve_stages(model)
    layers = [layer for ls in stage_layers.values() for layer in ls]
    orders = tuple(o.strip() for o in args.orders.split(",") if o.strip())
    loader = make_loader(args, dev, args.images)

    def rank():
        return collect_class_stats(model, loader, layers, args.classes, progress=False)

    rank()  # cuDNN autotuning for the evaluation shapes
    stats, rank_s = timed(rank, dev)
    csi, _ = means_and_csi(stats)

    def sweep(naive: bool, data=loader):
        return ablation_sweep(model, data, stage_layers, csi, orders=orders, draws=args.draws, seed=0, naive=naive,
                              num_classes=args.classes, device=dev, progress=False)

    warm = make_loader(args, dev, args.eval_batch)
    sweep(False, warm)  # cuDNN autotuning for every chunk shape, allocator warm-up
    if not args.skip_naive:
        sweep(True, warm)
    fast, fast_s = timed(lambda: sweep(False), dev)
    distinct = dict(fast.attrs.get("distinct_masks", {}))
    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (script check)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model,
           "image_size": args.image_size, "classes": args.classes, "images": args.images, "eval_batch": args.eval_batch,
           "orders": list(orders), "draws": args.draws, "stages": {k: len(v) for k, v in stage_layers.items()},
           "points": len(fast), "distinct_masks": distinct, "masks_per_pass": fast.attrs.get("masks_per_pass"),
           "rank_s": rank_s, "fast_s": fast_s}
    if not args.skip_naive:
        naive, naive_s = timed(lambda: sweep(True), dev)
        key = ["stage", "order", "n", "draw"]
        a, b = fast.sort_values(key).reset_index(drop=True), naive.sort_values(key).reset_index(drop=True)
        res.update(naive_s=naive_s, speedup=naive_s / fast_s,
                   differing_counts=int((a["correct"] != b["correct"]).sum()),
                   max_count_diff=int((a["correct"] - b["correct"]).abs().max()),
                   max_loss_rel_diff=float(((a["loss"] - b["loss"]).abs() / b["loss"].abs()).max()))
    if args.bf16:
        res["bf16"] = compare(model, loader, stage_layers, args.classes, dev)
    if args.decode_images:
        try:
            res.update(decode_rate(args, dev))
        except Exception as e:  # noqa: BLE001 - report the sweep numbers even if decoding cannot be measured here
            print(f"JPEG decoding not measured: {type(e).__name__}: {e}", file=sys.stderr)
    res.update(extrapolate(args, res))
    report(args, res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


def extrapolate(args, r: dict) -> dict:
    """Hours for the protocol on one GPU: checkpoints x (ranking pass + sweep) x val_images / images."""
    scale = args.val_images / args.images
    out = {"gpu_resident_h": args.checkpoints * (r["rank_s"] + r["fast_s"]) * scale / 3600}
    if "naive_s" in r:
        out["naive_gpu_resident_h"] = args.checkpoints * (r["rank_s"] + r["naive_s"]) * scale / 3600
    if r.get("decode_img_s"):
        dec = args.val_images / r["decode_img_s"]  # seconds to decode the split once
        passes_fast = [r["rank_s"] * scale, r["fast_s"] * scale]  # ranking pass, one sweep pass
        out["decode_split_s"] = dec
        out["with_decoding_h"] = args.checkpoints * sum(max(p, dec) for p in passes_fast) / 3600
        if "naive_s" in r:
            masks = sum(r["distinct_masks"].values()) or 1
            per_mask = r["naive_s"] * scale / masks
            out["naive_with_decoding_h"] = args.checkpoints * (max(r["rank_s"] * scale, dec)
                                                               + masks * max(per_mask, dec)) / 3600
    return out


def report(args, r: dict) -> None:
    print(f"command: {r['command']}")
    print(f"device: {r['device']}, torch {r['torch']} (CUDA {r['cuda']}); {r['model']} {r['image_size']}x"
          f"{r['image_size']}, {r['classes']} classes, fp32 (as csn's analyses run), {r['images']} images in batches "
          f"of {r['eval_batch']}")
    print(f"sweep: stages {r['stages']}, orders {r['orders']}, {r['draws']} random draws, {r['points']} points, "
          f"distinct masks {r['distinct_masks']}, masks per pass {r['masks_per_pass']}")
    print(f"ranking pass (CSI of every block): {r['rank_s']:.2f} s")
    print(f"fast path: {r['fast_s']:.2f} s" + (f"   naive: {r['naive_s']:.2f} s   speed-up {r['speedup']:.2f}x; "
                                               f"{r['differing_counts']} of {r['points']} counts differ (largest by "
                                               f"{r['max_count_diff']}), losses within {r['max_loss_rel_diff']:.1e}"
                                               if "naive_s" in r else ""))
    if "decode_img_s" in r:
        print(f"JPEG decoding through csn's ImageFolder path: {r['decode_img_s']:.0f} img/s with {r['decode_workers']} "
              f"workers ({r['decode_images']} JPEGs of 500x375, {r['jpeg_kib']:.0f} KiB each): "
              f"{r['decode_split_s']:.0f} s per pass over {args.val_images:,} images")
    if "bf16" in r:
        print(f"ranking pass + fast sweep, fp32 against bf16 autocast (bench_bf16_analyses.compare):\n{HEADER}\n"
              f"{row('random weights', r['bf16'])}")
    print(f"the protocol ({args.checkpoints} checkpoints x ranking + sweep over {args.val_images:,} images) on one GPU:")
    print(f"  fast path, validation set in GPU memory: {r['gpu_resident_h']:.2f} h")
    if "with_decoding_h" in r:
        print(f"  fast path, decoding JPEGs every pass  : {r['with_decoding_h']:.2f} h")
    if "naive_gpu_resident_h" in r:
        print(f"  naive, validation set in GPU memory   : {r['naive_gpu_resident_h']:.2f} h")
    if "naive_with_decoding_h" in r:
        print(f"  naive, decoding JPEGs every pass      : {r['naive_with_decoding_h']:.2f} h")


if __name__ == "__main__":
    sys.exit(main())
