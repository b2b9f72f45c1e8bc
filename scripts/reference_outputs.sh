#!/usr/bin/env bash
# Outputs of one version of csn for the "a refactor keeps results" check: `csn reproduce --preset smoke`, and
# selectivity, ablation, linearity and CKA of one fmnist run (a few checkpoints), each with fixed options.
# usage: scripts/reference_outputs.sh SRC_DIR OUT_DIR   (SRC_DIR: a checkout's src/; OUT_DIR: where to write)
# then:  python scripts/compare_outputs.py OLD_OUT NEW_OUT
set -euo pipefail
SRC=$1; OUT=$2
export PYTHONPATH=$SRC CSN_NO_PROGRESS=1
mkdir -p "$OUT"; cd "$OUT"
python3 -c "import csn,sys; print('csn from', csn.__file__, file=sys.stderr)"
T0=$(date +%s)
python3 -m csn reproduce --preset smoke --out "$OUT/smoke" --quiet > "$OUT/smoke.log" 2>&1
echo "smoke reproduce: $(( $(date +%s) - T0 )) s"
if [ ! -d "$OUT/fmnist" ]; then
  python3 -m csn train --preset fmnist --threads 1 --out "$OUT/fmnist" --quiet > "$OUT/train.log" 2>&1
fi
echo "train: $(( $(date +%s) - T0 )) s"
R="$OUT/fmnist"
python3 -m csn selectivity "$R" --checkpoints step=0,step=8,step=64,last --threads 1 --quiet > "$OUT/sel.log" 2>&1
python3 -m csn ablate "$R" --checkpoints step=8,last --draws 2 --grid f:0,0.25,0.5,1 --samples 1000 --threads 1 --quiet > "$OUT/abl.log" 2>&1
python3 -m csn linearity "$R" --checkpoints step=0,step=8,step=64,last --samples 500 --threads 1 --quiet > "$OUT/lin.log" 2>&1
python3 -m csn cka "$R" --checkpoints step=0,step=8,step=64,last --samples 500 --threads 1 --quiet > "$OUT/cka1.log" 2>&1
python3 -m csn cka "$R" --mode across --checkpoints step=0,step=8,step=64,last --samples 500 --threads 1 --quiet > "$OUT/cka2.log" 2>&1
echo "all: $(( $(date +%s) - T0 )) s"
