#!/usr/bin/env bash
# Start tools/SCRIPT in NPROC processes with torchrun (used by dist_train.sh
# and dist_test.sh). Usage: tools/dist_run.sh SCRIPT NPROC [script args]
# Environment: NNODES, NODE_RANK, MASTER_ADDR, PORT, PYTHON.
set -euo pipefail
SCRIPT=$1
NPROC=$2
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python}
[ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && PY="$ROOT/.venv/bin/python"

PYTHONPATH="$ROOT:${PYTHONPATH:-}" \
exec "$PY" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" \
    --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --nproc_per_node="$NPROC" \
    --master_port="${PORT:-29500}" \
    "$ROOT/tools/$SCRIPT" \
    "${@:3}" \
    --launcher pytorch
