#!/usr/bin/env bash
# Every two-node loopback test of tests/test_multinode.py, the slow ones included (docs/BENCHMARKS.md
# records a measured run). Each test starts two launchers on 127.0.0.1 as node 0 and node 1, each in
# its own working directory: ZeRO-2 with two ranks per node (4 ranks), ZeRO-3 and DDP with one, the
# deepspeed --no_ssh and accelerate multi-machine forms, both nodes killed after a checkpoint and
# resumed, and an output folder the nodes do not share.
#
#   bash benchmarks/multinode_tests.sh [extra pytest arguments]
#
# One thread per rank (OMP_NUM_THREADS=1). The first DeepSpeed start builds its shm op (about a
# minute, cached under ~/.cache/torch_extensions).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
started=$(date +%s)
status=0
OMP_NUM_THREADS=1 PYTHONPATH=. $PY -m pytest -q -m "slow or not slow" -p no:cacheprovider tests/test_multinode.py "$@" || status=$?
echo "multinode_tests: $(date -u +%Y-%m-%dT%H:%MZ), $(( $(date +%s) - started )) s, $([ $status = 0 ] && echo pass || echo "FAIL (exit $status)")"
exit $status
