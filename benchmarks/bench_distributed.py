"""The analyses under torchrun: wall time with N processes against 1 process, same run, same settings.

A short fmnist-preset run (ResNet-8, checkpoints at steps 0, 8, 16, 33) is analysed by
selectivity (with and without BatchNorm re-estimation, which every process repeats), ablation (first
and last checkpoint, both ways to distribute), CKA and linearity, first by one process, then by
N processes under torchrun (gloo on CPU, nccl on GPUs), each process with one CPU thread
(OMP_NUM_THREADS=1) on CPU. Every analysis is timed inside the workers, between barriers, on a fresh
copy of the run (interpreter start-up and imports excluded), and its table is checked equal to the
single-process one. Prints seconds and the speed-up (1-process time / N-process time) per analysis.

    python benchmarks/bench_distributed.py [--nproc 2] [--samples 2000]

On the 2-core CPU machine the ceiling of the speed-up is 2; on a GPU node pass --nproc 8.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def analyses(samples: int) -> dict:
    """name -> (analysis name, its options, run options, table it writes)."""
    ablation = dict(orders="selective,random", draws=3, grid="f:0,0.0625,0.125,0.25,0.5,1", samples=samples)
    return {
        "selectivity": ("selectivity", dict(samples=samples), {}, "selectivity"),
        "selectivity, no BN re-est.": ("selectivity", dict(samples=samples), dict(bn_recalibrate=0), "selectivity"),
        "ablation (split)": ("ablate", ablation, dict(checkpoints="first,last", distribute="split"), "ablation"),
        "ablation (checkpoints)": ("ablate", ablation, dict(checkpoints="first,last", distribute="checkpoints"),
                                   "ablation"),
        "cka (across)": ("cka", dict(mode="across", samples=samples), {}, "cka"),
        "linearity": ("linearity", dict(samples=samples, measures=("linearized", "relu")), {}, "linearity"),
    }


def worker(run_dir: str, out_json: str, samples: int) -> None:
    """Under torchrun (or alone): time each analysis on a fresh copy of the run; rank 0 writes the results."""
    import torch

    from csn import Ablation, Cka, Linearity, Selectivity, run_analysis
    from csn import dist as distributed
    from csn.runs import Run

    distributed.init_from_env()
    classes = {"selectivity": Selectivity, "ablate": Ablation, "cka": Cka, "linearity": Linearity}
    device = torch.device("cuda", distributed.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    results, world = {}, distributed.world_size()
    for i, (name, (fn, kw, run_kw, table)) in enumerate(analyses(samples).items()):
        copy = Path(out_json).with_name(f"w{world}-{i}") / Path(run_dir).name
        if distributed.is_main():
            shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("tables"))
        distributed.barrier()
        t0 = time.perf_counter()
        run_analysis(Run(copy), classes[fn](**kw), progress=False, device=str(device), **run_kw)
        distributed.barrier()
        results[name] = {"seconds": time.perf_counter() - t0, "table": str(copy / "tables" / f"{table}.parquet")}
    if distributed.is_main():
        Path(out_json).write_text(json.dumps({"world": world, "results": results}))


def launch(nproc: int, run_dir: Path, out_json: Path, samples: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CSN_NO_PROGRESS="1")
    cmd = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                              if nproc > 1 else []) + [str(HERE), "--worker", str(run_dir), str(out_json), str(samples)]
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out_json.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2, help="processes under torchrun")
    ap.add_argument("--samples", type=int, default=2000, help="evaluation images (of the 10,000 fmnist test images)")
    args = ap.parse_args()

    import pandas as pd
    import torch

    from csn.runs.config import preset
    from csn.training.loop import train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        cfg = preset("fmnist").override(["epochs=0.07", "checkpoints=step=8,step=16", "eval_samples=1000"])
        run = Path(d) / "fmnist"
        train(cfg, run, progress=False)
        one = launch(1, run, Path(d) / "one.json", args.samples)
        many = launch(args.nproc, run, Path(d) / "many.json", args.samples)
        print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
              f"{'CUDA' if torch.cuda.is_available() else 'CPU (gloo)'}; 1 thread per process; "
              f"fmnist ResNet-8, 4 checkpoints, {args.samples} evaluation images")
        print(f"{'analysis':<28} {'1 process':>10} {f'{args.nproc} processes':>12} {'speed-up':>9}  tables equal")
        for name, r1 in one["results"].items():
            rn = many["results"][name]
            a, b = pd.read_parquet(r1["table"]), pd.read_parquet(rn["table"])
            num = a.select_dtypes("number").columns
            equal = a.drop(columns=num).equals(b.drop(columns=num)) and bool(
                ((a[num] - b[num]).abs().fillna(0) <= 1e-6 + 1e-6 * b[num].abs().fillna(0)).all().all())
            print(f"{name:<28} {r1['seconds']:>9.1f}s {rn['seconds']:>11.1f}s {r1['seconds'] / rn['seconds']:>8.2f}x"
                  f"  {'yes' if equal else 'NO'}")


if __name__ == "__main__":
    main()
