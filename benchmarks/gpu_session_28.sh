#!/usr/bin/env bash
# Issue 28's GPU session, prepared on the CPU machine: everything to run on a lent GPU, in one call of <= 560 s.
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
# STEPS picks steps (default all, about 600 s); two calls on one warm machine fit the 15 device minutes:
#   STEPS="stacked map reg" bash benchmarks/gpu_session_28.sh     # about 390 s
#   STEPS="ablation tests" bash benchmarks/gpu_session_28.sh      # about 230 s
set -u
OUT=${OUT:-gpu-out}
MAP_S=${MAP_S:-150}
STEPS=${STEPS:-stacked map reg ablation tests}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CSN_NO_PROGRESS=1
LOG="$OUT/all.log"
{
  date -Is; git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit (when NAME is in STEPS), log, report rc and seconds
  local name=$1 lim=$2 s rc
  shift 2
  case " $STEPS " in *" ${name%%_*} "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${lim}s) $(date +%T): $*" | tee -a "$LOG"
  s=$(date +%s)
  set -o pipefail
  timeout "$lim" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  set +o pipefail
  echo "== $name rc=$rc in $(( $(date +%s) - s )) s" | tee -a "$LOG"
}

step stacked 90 python3 benchmarks/bench_stacked.py --device cuda --runs 8 --steps 200 --warmup 20 --threads 2 \
  --json "$OUT/stacked.json"
MAP=/tmp/map28
rm -rf "$MAP"
step map "$MAP_S" python3 -m csn experiment windows --preset fmnist --out "$MAP" --parallel 8 --quiet \
  device=cuda data_root="$PWD/.fmnist"
step map_rate 30 python3 benchmarks/map_progress.py "$MAP" "$MAP_S" --runs 56
step reg 100 python3 benchmarks/bench_reg_profile.py --steps 20 --warmup 10 --reps 3 --profile-steps 5
step ablation 90 python3 benchmarks/bench_gpu_ablation.py --images 1000 --skip-naive --decode-images 0 --bf16 \
  --json "$OUT/ablation_bf16.json"
step tests 170 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -rA
echo "done $(date -Is)" | tee -a "$LOG"
