#!/usr/bin/env bash
# Canary tracking measurement for docs/CANARY.md: how the planted canary's ASR follows the real attack's
# dev-poison ASR, per epoch, per method and attack, on SST-2 with MiniLM at a small budget.
# Resumable: a cell with metrics.json is skipped, an unfinished one resumes from its checkpoint.
#
#   METHODS="vanilla" bash benchmarks/canary_tracking.sh [OUT_ROOT] [ATTACK ...]
#   python benchmarks/canary_tracking.py OUT_ROOT            # the table
#
# Settings: the demo config (launch/configs/demo.yaml) with 2,000 seeded training rows, 3 epochs, max length
# 64, at most 500 rows per evaluation split, one thread; lr per method family (train.lr auto: vanilla 2e-5,
# adapters 1e-3); the canary at its defaults. The real attack's dev-poison ASR is read from log.jsonl for
# this measurement only; selection never reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/canary_tracking}; shift || true
ATTACKS=${*:-badnets addsent stylebkd synbkd}
METHODS=${METHODS:-vanilla musclelora}
SEED=${SEED:-42}
PY=${PY:-.venv/bin/python}
COMMON="data.max_length=64 data.max_train_samples=2000 data.max_eval_samples=500 train.epochs=3 train.batch_size=32 train.num_threads=1 seed=$SEED ${EXTRA:-}"
mkdir -p "$OUT"
for attack in $ATTACKS; do
  for method in $METHODS; do
    dir="$OUT/${attack}_${method}_s${SEED}"
    if [ -f "$dir/metrics.json" ]; then echo "skip $dir (finished)"; continue; fi
    resume=false; [ -f "$dir/checkpoints/last/COMPLETE" ] && resume=true
    echo "run $dir (resume=$resume) $(date -u +%H:%M:%S)"
    $PY launch/train.py --config launch/configs/demo.yaml method=$method data.attack=$attack \
      output_dir="$dir" resume=$resume overwrite=$([ $resume = true ] && echo false || echo true) \
      $COMMON train.checkpoint_every_steps=25 > "$dir.log" 2>&1 || { echo "FAILED $dir (see $dir.log)"; }
  done
done
