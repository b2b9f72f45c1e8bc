"""Benchmark: one full ablation sweep of a ResNet-20, fast path vs the naive protocol (issue 4, "Performance").

What it does:
  1. trains a ResNet-20 (width 1, 1 input channel, 10 classes) for --steps SGD steps on Fashion-MNIST
     (batch 128, lr 0.1, momentum 0.9, wd 5e-4, seed 0), so units are not at random init;
  2. ranks units by CSI on the scoring subset (first --samples test images; 0 = whole test split);
  3. runs ONE full sweep (all 3 stages, orders selective/random/least, 3 random draws, default grid)
     with the fast path (csn's defaults), the fast path with several masks per forward pass
     (--batched-elements), and --naive, each in a fresh subprocess (same threads), and checks that
     all give the same correct counts (and losses within 1e-5 relative);
  4. prints the measured speed-up next to the floor-derived bound
        bound = sum_s D_s * F_full / sum_s (D_s * F_suffix(s) + F_prefix(s))
     where D_s is the number of distinct masks of stage s (both paths evaluate each once),
     F_suffix(s) the multiply-accumulates (MACs) of the network from stage s on and F_prefix(s) those
     before it (counted with hooks on every Conv2d/Linear of one forward pass; BN/ReLU/adds ignored);
     also the same bound weighted by each segment's measured CPU time on one batch (MACs are not
     equally fast: the 28x28 stage costs more per MAC than the later ones),
     the ratio measured/bound (target >= 0.85; timed in process CPU time, which shared cores
     disturb far less than wall time, and in wall time), and the peak memory of each sweep: the
     child's peak RSS (VmHWM, reset through /proc/self/clear_refs just before the sweep) minus its RSS
     at the start (falls back to ru_maxrss growth; tracemalloc cannot see torch's allocations).

    python benchmarks/bench_ablation.py                 # 2000 test images, 1 thread
    python benchmarks/bench_ablation.py --samples 0     # the whole test split (naive takes ~5x longer)
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

SEED = 0


def build_model() -> nn.Module:
    from csn.models import create_model

    return create_model("resnet20", num_classes=10, in_channels=1, width=1.0)


def train_briefly(steps: int, threads: int) -> dict:
    from csn.data import BatchLoader, load_dataset

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    data = load_dataset("fashion-mnist")
    model = build_model().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(data.train, 128, shuffle=True, seed=SEED, drop_last=True)
    done, t0 = 0, time.perf_counter()
    while done < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
        loader.set_epoch(loader.epoch + 1)
    print(f"trained {steps} steps in {time.perf_counter() - t0:.1f} s (last batch loss {loss.item():.3f})", flush=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def eval_batches(samples: int, batch_size: int = 500):
    from csn.data import BatchLoader, load_dataset

    test = load_dataset("fashion-mnist").test
    if samples and samples < len(test):
        from csn.data import TensorSplit

        test = TensorSplit(test.images[:samples], test.labels[:samples], test.mean, test.std)
    return list(BatchLoader(test, batch_size, shuffle=False))


def macs_per_segment(model, x1) -> dict[str, int]:
    """Conv/Linear multiply-accumulates of one example, per CsnModel segment (hooks on one forward)."""
    cur = [None]
    macs: dict[str, int] = {}

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            k = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            n = out[0].numel() * k
        else:
            n = m.in_features * m.out_features
        macs[cur[0]] = macs.get(cur[0], 0) + n

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            h = x1
            for name, fn in model.segments():
                cur[0] = name
                macs.setdefault(name, 0)
                h = fn(h)
    finally:
        for h_ in hs:
            h_.remove()
    return macs


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak() -> tuple[int, str]:
    """(resident KiB now, method): reset the kernel's peak-RSS mark (VmHWM) where Linux allows it, else use ru_maxrss."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS"), "VmHWM"
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"


def _peak(how: str) -> int:
    return _status_kib("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def seconds_per_segment(model, x, reps: int = 5) -> dict[str, float]:
    """CPU seconds of each CsnModel segment on one batch (fastest of reps), for the time-weighted bound."""
    best: dict[str, float] = {}
    with torch.no_grad():
        for _ in range(reps):
            h = x
            for name, fn in model.segments():
                t = time.process_time()
                h = fn(h)
                best[name] = min(best.get(name, float("inf")), time.process_time() - t)
    return best


def child(args) -> None:
    """One sweep in a fresh process: time it and measure its peak-RSS growth."""
    from csn.analysis.ablation import ablation_sweep

    torch.set_num_threads(args.threads)
    with open(args.child, "rb") as f:
        job = pickle.load(f)
    model = build_model()
    model.load_state_dict(job["state"])
    model.eval()
    batches = eval_batches(job["samples"])
    with torch.no_grad():
        model(batches[0][0][:8])  # warm-up
    rss0, how = _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    df = ablation_sweep(model, batches, job["stage_layers"], job["csi"], num_classes=10, draws=3, seed=SEED,
                        naive=job["naive"], step=job["step"], progress=False, max_elements=job["max_elements"])
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss1 = _peak(how)
    with open(args.child + ".out", "wb") as f:
        pickle.dump({"seconds": dt, "cpu_seconds": cpu, "rss0_kib": rss0, "rss1_kib": rss1, "rss_how": how, "df": df,
                     "masks_per_pass": df.attrs.get("masks_per_pass")}, f)


def run_child(job: dict, threads: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".pkl", delete=False) as f:
        pickle.dump(job, f)
        path = f.name
    try:
        subprocess.run([sys.executable, __file__, "--child", path, "--threads", str(threads)], check=True,
                       env={**os.environ, "CSN_NO_PROGRESS": "1"})
        with open(path + ".out", "rb") as f:
            return pickle.load(f)
    finally:
        for p in (path, path + ".out"):
            if os.path.exists(p):
                os.remove(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000, help="first N test images to score on (0 = all 10,000)")
    ap.add_argument("--steps", type=int, default=100, help="training steps before the sweep (0 = random init)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for both paths)")
    ap.add_argument("--max-elements", type=int, default=None,
                    help="element budget of one batched forward (default: csn's per-device default)")
    ap.add_argument("--batched-elements", type=int, default=1 << 25,
                    help="element budget of the third run, which batches several masks per forward pass (0 = skip it)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from csn.analysis.ablation import check_orders, parse_grid
    from csn.analysis.ablation.sweep import SweepRequest, probe, stage_plans
    from csn.analysis.selectivity import collect_class_stats, selectivity_frame

    torch.set_num_threads(args.threads)
    state = train_briefly(args.steps, args.threads) if args.steps else build_model().state_dict()
    model = build_model()
    model.load_state_dict(state)
    model.eval()
    batches = eval_batches(args.samples)
    n_images = sum(len(y) for _, y in batches)
    stage_layers = {k: list(v) for k, v in model.csn_stages.items()}
    layers = [la for ls in stage_layers.values() for la in ls]
    stats = collect_class_stats(model, batches, layers, 10, progress=False)
    frame = selectivity_frame(stats)
    csi = {la: torch.tensor(g.sort_values("unit")["csi"].to_numpy()) for la, g in frame.groupby("layer")}
    with torch.no_grad():
        acc = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches) / n_images
    print(f"ResNet-20 on {n_images} Fashion-MNIST test images: unablated top-1 {acc:.4f}; "
          f"mean CSI per stage " + ", ".join(f"{s} {frame[frame.layer.isin(ls)].csi.mean():.3f}" for s, ls in stage_layers.items()))

    # the floor: MACs per segment and distinct masks per stage
    x1 = batches[0][0][:1]
    macs = macs_per_segment(model, x1)
    segs = list(macs)
    full = sum(macs.values())
    pr = probe(model, x1, layers)
    plans = stage_plans(model, pr, stage_layers, csi,
                        SweepRequest(parse_grid(None), check_orders("selective,random,least", 3), 3, SEED, 0, False))
    naive_cost = fast_cost = 0
    secs = seconds_per_segment(model, batches[0][0])
    t_full = sum(secs.values())
    naive_t = fast_t = 0.0
    print(f"MACs per image: {full / 1e6:.2f} M; per segment: " + ", ".join(f"{s} {m / 1e6:.2f} M" for s, m in macs.items()))
    for p in plans:
        i = segs.index(p.segment)
        prefix, suffix = sum(macs[s] for s in segs[:i]), sum(macs[s] for s in segs[i:])
        naive_cost += len(p.masks) * full
        fast_cost += len(p.masks) * suffix + prefix
        naive_t += len(p.masks) * t_full
        fast_t += len(p.masks) * sum(secs[s] for s in segs[i:]) + sum(secs[s] for s in segs[:i])
        print(f"  stage {p.stage}: {len(p.points)} points, {len(p.masks)} distinct masks, suffix {suffix / full:.1%} of the MACs")
    bound = naive_cost / fast_cost
    time_bound = naive_t / fast_t
    print("CPU time per segment on one batch: " + ", ".join(f"{k} {v / t_full:.1%}" for k, v in secs.items())
          + f" -> time-weighted bound {time_bound:.2f}x (MAC bound {bound:.2f}x)")

    job = {"state": state, "samples": args.samples, "stage_layers": stage_layers, "csi": csi, "step": 0,
           "max_elements": args.max_elements}
    fast = run_child({**job, "naive": False}, args.threads)
    print(f"fast path: {fast['cpu_seconds']:.1f} s CPU, {fast['seconds']:.1f} s wall; masks per forward pass "
          f"{fast['masks_per_pass']}", flush=True)
    batched = None
    if args.batched_elements:
        batched = run_child({**job, "naive": False, "max_elements": args.batched_elements}, args.threads)
        print(f"fast path, masks batched (budget {args.batched_elements} elements): {batched['cpu_seconds']:.1f} s CPU, "
              f"{batched['seconds']:.1f} s wall; masks per forward pass {batched['masks_per_pass']}", flush=True)
    naive = run_child({**job, "naive": True}, args.threads)
    print(f"naive:     {naive['cpu_seconds']:.1f} s CPU, {naive['seconds']:.1f} s wall", flush=True)
    a, b = fast["df"], naive["df"]
    m = a.merge(b, on=["stage", "order", "n", "draw"], suffixes=("_f", "_n"))
    same = bool((m["correct_f"] == m["correct_n"]).all()) and len(m) == len(a) == len(b)
    if batched is not None:
        mb = batched["df"].merge(b, on=["stage", "order", "n", "draw"], suffixes=("_f", "_n"))
        same = same and bool((mb["correct_f"] == mb["correct_n"]).all()) and len(mb) == len(b)
    rel = float(((m["loss_f"] - m["loss_n"]).abs() / m["loss_n"].abs()).max())
    speedup = naive["cpu_seconds"] / fast["cpu_seconds"]
    speedup_wall = naive["seconds"] / fast["seconds"]
    peak = (fast["rss1_kib"] - fast["rss0_kib"]) / 1024
    peak_b = (batched["rss1_kib"] - batched["rss0_kib"]) / 1024 if batched else float("nan")
    result = {
        "images": n_images, "threads": args.threads, "train_steps": args.steps, "rows": len(a),
        "fast_cpu_s": round(fast["cpu_seconds"], 2), "naive_cpu_s": round(naive["cpu_seconds"], 2),
        "fast_wall_s": round(fast["seconds"], 2), "naive_wall_s": round(naive["seconds"], 2),
        "speedup_cpu": round(speedup, 3), "speedup_wall": round(speedup_wall, 3), "bound": round(bound, 3),
        "ratio_cpu": round(speedup / bound, 3), "ratio_wall": round(speedup_wall / bound, 3),
        "masks_per_pass": fast["masks_per_pass"], "correct_counts_equal": same, "max_loss_rel_diff": rel,
        "fast_peak_rss_growth_mib": round(peak, 1), "fast_peak_rss_mib": round(fast["rss1_kib"] / 1024, 1),
        "naive_peak_rss_growth_mib": round((naive["rss1_kib"] - naive["rss0_kib"]) / 1024, 1),
        "time_bound": round(time_bound, 3), "ratio_cpu_time_bound": round(speedup / time_bound, 3),
        "memory_measure": fast["rss_how"],
    }
    if batched:
        result.update(batched_cpu_s=round(batched["cpu_seconds"], 2), batched_wall_s=round(batched["seconds"], 2),
                      batched_masks_per_pass=batched["masks_per_pass"], batched_peak_rss_growth_mib=round(peak_b, 1))
    print(f"speed-up {speedup:.2f}x in CPU time ({speedup_wall:.2f}x wall); floor-derived (MAC) bound {bound:.2f}x; "
          f"measured/bound {speedup / bound:.2f} CPU, {speedup_wall / bound:.2f} wall (target >= 0.85); "
          f"against the time-weighted bound {time_bound:.2f}x: {speedup / time_bound:.2f}")
    print(f"same correct counts: {same}; max relative loss difference {rel:.1e}")
    what = ("peak RSS (VmHWM, reset via /proc/self/clear_refs before the sweep) minus RSS at its start"
            if fast["rss_how"] == "VmHWM" else "ru_maxrss growth during the sweep")
    print(f"peak memory of the sweep ({what}): fast path +{peak:.0f} MiB; naive "
          f"+{(naive['rss1_kib'] - naive['rss0_kib']) / 1024:.0f} MiB"
          + (f"; with masks batched {batched['masks_per_pass']} +{peak_b:.0f} MiB" if batched else ""))
    if batched:
        print(f"with masks batched: {naive['cpu_seconds'] / batched['cpu_seconds']:.2f}x vs naive in CPU time "
              "(on CPU, batching masks into passes larger than the caches costs more than it saves; csn's CPU default "
              "keeps them small)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
