#!/usr/bin/env bash
# Issue 17's GPU session: everything that ran on the lent GPU, in one call (results in benchmarks/RESULTS.md).
#
#   bash benchmarks/gpu_session.sh            # from the repository root, on a machine with a CUDA GPU + PyTorch
#
# csn's Python dependencies missing there (pydantic and its three) are installed from ./.whl (wheels carried
# along) into /tmp/site. Each step has its own time limit; logs and JSON go to ${OUT:-gpu-out}/.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CSN_NO_PROGRESS=1
LOG="$OUT/all.log"
{
  date -Is; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log everything, report rc and seconds
  local name=$1 lim=$2 s rc
  shift 2
  echo "== $name (limit ${lim}s) $(date +%T): $*" | tee -a "$LOG"
  s=$(date +%s)
  set -o pipefail
  timeout "$lim" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  set +o pipefail
  echo "== $name rc=$rc in $(( $(date +%s) - s )) s" | tee -a "$LOG"
}

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
