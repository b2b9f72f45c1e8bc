#!/usr/bin/env bash
# Issue 28's GPU session, prepared on the CPU machine: everything to run on a lent GPU, in one call or two (STEPS).
#
#   bash benchmarks/gpu_session_28.sh          # from the repository root, on a machine with a CUDA GPU + PyTorch
#
# Before the call, on the CPU machine (both folders are git-ignored and travel with `carry`):
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl \
#       pydantic pydantic-core annotated-types typing-inspection       # what the device image lacked last time
#   cp -r /usr/share/datasets/fashion-mnist .fmnist                    # 30 MB: the real map needs the real data
# and pass carry=[".whl", ".fmnist"]. Results, logs and JSON go to ${OUT:-gpu-out}/ (the run folders stay in /tmp).
#
# Steps (each with its own limit, so that a failing step leaves time for the others):
#   1. K=8 ResNet-8 runs on one GPU four ways: one after another, stacked (vmap), 8 processes, CUDA graphs
#   2. the fmnist map (`csn experiment windows --preset fmnist`) with 8 runs at a time on the GPU for MAP_S
#      seconds, then the rate and the whole map's training time projected from it
#   3. the regularizer's overhead on ResNet-50 224² bf16 and the operators it adds (torch.profiler)
#   4. the ablation sweep on ResNet-50 in fp32 and under bf16 autocast: time and correct counts moved
#   5. tests/test_gpu.py in full
# STEPS picks steps (default all, about 600 s; see gpu_env.sh); two calls on one warm machine fit the 15 device minutes:
#   STEPS="stacked map reg" bash benchmarks/gpu_session_28.sh     # about 390 s
#   STEPS="ablation tests" bash benchmarks/gpu_session_28.sh      # about 230 s
set -u
MAP_S=${MAP_S:-150}
source "$(dirname "$0")/gpu_env.sh"

step stacked 90 python3 benchmarks/bench_stacked.py --device cuda --runs 8 --steps 200 --reps 2 --threads 2 \
  --json "$OUT/stacked.json"
MAP=/tmp/map28
rm -rf "$MAP"
step map "$MAP_S" python3 -m csn experiment windows --preset fmnist --out "$MAP" --parallel 8 --quiet \
  device=cuda data_root="$PWD/.fmnist"
step map_rate 30 python3 benchmarks/map_progress.py "$MAP" "$MAP_S" --runs 56
step reg 100 python3 benchmarks/bench_reg_profile.py --steps 20 --reps 3 --profile-steps 5
step ablation 90 python3 benchmarks/bench_gpu_ablation.py --images 1000 --skip-naive --decode-images 0 --bf16 \
  --json "$OUT/ablation_bf16.json"
step tests 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA
echo "done $(date -Is)" | tee -a "$LOG"
