#!/usr/bin/env bash
# MiniLM efficacy grid for docs/RESULTS.md: methods x attacks on SST-2, one seed.
# Resumable: a cell with metrics.json is skipped, an unfinished one resumes from its checkpoint.
#
#   bash benchmarks/efficacy_grid.sh [OUT_ROOT] [ATTACK ...]
#
# Settings shared by every cell (sized for a 2-core CPU): max length 64, 3,000 seeded training rows,
# 3 epochs, batch 32, one thread per process (run two invocations side by side on 2 cores).
# lr: 2e-5 for full fine-tuning (authors), 1e-3 for the adapter methods (see launch/configs/demo.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/results}; shift || true
ATTACKS=${*:-badnets addsent stylebkd synbkd}
METHODS=${METHODS:-vanilla lora musclelora}
SEED=${SEED:-42}
PY=${PY:-.venv/bin/python}
COMMON="data.max_length=64 data.max_train_samples=3000 train.epochs=${EPOCHS:-3} train.batch_size=32 train.num_threads=${THREADS:-1} seed=$SEED"
for attack in $ATTACKS; do
  for method in $METHODS; do
    dir="$OUT/${attack}_${method}_s${SEED}"
    if [ -f "$dir/metrics.json" ]; then echo "skip $dir (finished)"; continue; fi
    lr=1e-3; [ "$method" = vanilla ] || [ "$method" = ga ] && lr=2e-5
    resume=false; [ -d "$dir/checkpoints/last" ] && resume=true
    echo "run $dir (resume=$resume)"
    $PY launch/train.py --config launch/configs/demo.yaml method=$method data.attack=$attack \
      output_dir="$dir" resume=$resume overwrite=$([ $resume = true ] && echo false || echo true) \
      train.lr=$lr $COMMON train.checkpoint_every_steps=25 > "$dir.log" 2>&1 || { echo "FAILED $dir (see $dir.log)"; }
  done
done
