#!/usr/bin/env bash
# Distributed testing with torchrun: tools/dist_test.sh CONFIG CKPT NGPUS [args]
# On GPUs the processes use NCCL; on a machine without CUDA they use gloo.
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
exec "$(dirname "$0")/dist_run.sh" test.py "$GPUS" "$CONFIG" "$CHECKPOINT" "${@:4}"
