#!/usr/bin/env bash
# The same short musclelora run on SmolLM2-135M (launch/configs/smollm2_sst2.yaml) six ways: fp32
# and nf4 base in one process, and on 2 CPU ranks under DeepSpeed ZeRO-2 / ZeRO-3 (fp32 and nf4
# base); identical data and steps (64 training rows, batch 16 = 4 optimiser steps, 32 evaluation
# rows, 32 tokens, canary off). Two sets: the recipe as configured (head dropout 0.1: masks are drawn
# per process, so 1 process and 2 ranks differ by their dropout masks) and "_nodrop"
# (model.llm_head_dropout=0, where fp32 ZeRO must match one process). Then the table
# (benchmarks/smollm2_precision_zero.py) and the loss-curve plot of the _nodrop set.
#
#   bash benchmarks/smollm2_precision_zero.sh [RUNS_DIR] [PLOT_PNG]   # default runs/precision_zero
#
# A run whose folder already holds metrics.json is kept (delete the folder to redo it). Two cores in
# all: the single process uses 2 threads, each of the 2 ranks 1 thread. PYTHON (default python) and
# DATA_ROOT (default: the config's data.root) may be set in the environment; SETS=nodrop runs only
# the dropout-free set (default SETS="dropout nodrop"); PIN_MALLOC=1 pins glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_=65536, as
# benchmarks/bench_memory.py does) so that the peak RSS follows live tensors more closely.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/precision_zero}
PLOT=${2:-$RUNS/loss_curves.png}
PY=${PYTHON:-python}
mkdir -p "$RUNS"
[[ ${PIN_MALLOC:-0} == 1 ]] && export MALLOC_MMAP_THRESHOLD_=65536
COMMON=(--config launch/configs/smollm2_sst2.yaml
        data.max_train_samples=64 data.max_eval_samples=32 data.max_length=32
        train.batch_size=16 train.epochs=1 train.log_every_steps=1 canary.enabled=false
        ${DATA_ROOT:+data.root=$DATA_ROOT})

run() {  # name, then the launcher words before launch/train.py's own arguments
    local name=$1; shift
    if [[ -f "$RUNS/$name/metrics.json" ]]; then echo "keep $RUNS/$name"; return; fi
    rm -rf "${RUNS:?}/$name"
    echo "$(date -u +%T) start $name"
    "$@" "${EXTRA[@]}" output_dir="$RUNS/$name" > "$RUNS/$name.log" 2>&1
    echo "$(date -u +%T) end $name rc=$?"
}

TR=($PY -m torch.distributed.run --nproc_per_node 2 --master_port 29571 launch/train.py)
for set in ${SETS:-dropout nodrop}; do
    suffix=""; [[ $set == nodrop ]] && suffix=_nodrop
    SET=("${COMMON[@]}")
    [[ -n $suffix ]] && SET+=(model.llm_head_dropout=0)
    EXTRA=("${SET[@]}" train.num_threads=2)
    OMP_NUM_THREADS=2 run "fp32$suffix" $PY launch/train.py
    EXTRA=("${SET[@]}" train.num_threads=2 model.quantization=nf4)
    OMP_NUM_THREADS=2 run "nf4$suffix" $PY launch/train.py
    EXTRA=("${SET[@]}" train.num_threads=1)
    OMP_NUM_THREADS=1 run "zero2_fp32$suffix" "${TR[@]}" --deepspeed ds_configs/zero2.json
    OMP_NUM_THREADS=1 run "zero3_fp32$suffix" "${TR[@]}" --deepspeed ds_configs/zero3.json
    EXTRA=("${SET[@]}" train.num_threads=1 model.quantization=nf4)
    OMP_NUM_THREADS=1 run "zero2_nf4$suffix" "${TR[@]}" --deepspeed ds_configs/zero2.json
    OMP_NUM_THREADS=1 run "zero3_nf4$suffix" "${TR[@]}" --deepspeed ds_configs/zero3.json
done

$PY benchmarks/smollm2_precision_zero.py "$RUNS" --plot "$PLOT"
