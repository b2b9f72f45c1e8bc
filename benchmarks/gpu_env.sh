# Sourced by the GPU session scripts (gpu_session.sh, gpu_session_28.sh): from the repository root on the lent
# machine, csn's missing Python dependencies from ./.whl (wheels carried along) into /tmp/site, csn from ./src,
# the machine's description into $LOG, and `step`, which runs one timed step of a session.
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/all.log"
STEPS=${STEPS:-all}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CSN_NO_PROGRESS=1
{
  date -Is; git rev-parse HEAD 2>/dev/null
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nproc
  python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'CUDA', torch.version.cuda, \
'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"

step() {  # step NAME LIMIT_S COMMAND...: when NAME (up to its first _) is in STEPS (or STEPS=all), run COMMAND with
          # a time limit, log everything, report rc and seconds
  local name=$1 lim=$2 s rc
  shift 2
  case " $STEPS " in *" all "*|*" ${name%%_*} "*) ;; *) return 0 ;; esac
  echo "== $name (limit ${lim}s) $(date +%T): $*" | tee -a "$LOG"
  s=$(date +%s)
  set -o pipefail
  timeout "$lim" "$@" 2>&1 | tee -a "$LOG"
  rc=$?
  set +o pipefail
  echo "== $name rc=$rc in $(( $(date +%s) - s )) s" | tee -a "$LOG"
}
