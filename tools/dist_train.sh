#!/usr/bin/env bash
# Distributed training with torchrun: tools/dist_train.sh CONFIG NGPUS [args]
# On GPUs the processes use NCCL; on a machine without CUDA they use gloo.
# Several machines: NNODES, NODE_RANK, MASTER_ADDR, PORT as for torchrun.
set -euo pipefail
CONFIG=$1
GPUS=$2
exec "$(dirname "$0")/dist_run.sh" train.py "$GPUS" "$CONFIG" "${@:3}"
