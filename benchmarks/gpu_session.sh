#!/usr/bin/env bash
# Issue 17's GPU session: everything that ran on the lent GPU, in one call (results in benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on a machine with a CUDA GPU + PyTorch
#
# csn's Python dependencies missing there (pydantic and its three) are installed from ./.whl (wheels carried
# along) into /tmp/site. Each step has its own time limit; logs and JSON go to ${OUT:-gpu-out}/.
set -u
source "$(dirname "$0")/gpu_env.sh"

# 1. training loop vs a hand-written loop, regularizer overhead, CSI pass overhead: ResNet-50 224x224, bf16,
#    channels_last; then ResNet-8 on Fashion-MNIST-shaped data (the fmnist preset's model and batch)
step bench_r50 120 python3 benchmarks/bench_gpu.py --steps 60 --warmup 20 --reps 2 --json "$OUT/bench_r50.json"
# 2. the ablation sweep, fast path vs --naive, ResNet-50 on synthetic 224x224; JPEG decoding; the protocol in hours
step ablation 120 python3 benchmarks/bench_gpu_ablation.py --images 1000 --json "$OUT/ablation.json"
step bench_r8 45 python3 benchmarks/bench_gpu.py --model resnet8 --image-size 28 --channels 1 --classes 10 \
  --batch 128 --eval-batch 1000 --steps 300 --warmup 50 --reps 3 --json "$OUT/bench_r8.json"
# 3. the tests that need CUDA: SyncBatchNorm under DDP (one GPU: a smoke test), bf16 runs and resumes, reproduce
step tests 130 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA
echo "done $(date -Is)" | tee -a "$LOG"
