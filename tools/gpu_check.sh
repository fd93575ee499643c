#!/usr/bin/env bash
# The CUDA checks of mmcbn as one prepared run, sized for a short GPU loan
# (about 8 minutes of a 15-minute budget, so that a failed first try can
# still be rerun).
#
#   bash tools/gpu_check.sh prepare   # here, with a package index: the
#                                     # pure-Python wheels a bare GPU
#                                     # machine lacks, into .whl/
#   bash tools/gpu_check.sh run       # there, in the repository root:
#                                     # results under $OUT (default
#                                     # work_dirs/gpu_check)
#
# .whl/ is git-ignored: a device call carries it (carry: [".whl"]). The
# results are 7 files (3 logs, the machine, 2 JSON, a PNG).
#
# `run` needs a Python with a CUDA build of PyTorch, pytest and hypothesis
# (GPU images have them; PYTHON picks the interpreter, default python3).
# It installs .whl/ (mmengine and what it needs) into a private folder,
# never into that Python, then runs, each step with its own time limit and
# log, going on after a failed step:
#   1. tests/test_devices.py on CUDA (the float64 reference trajectories,
#      fp16/bf16/autocast, channels-last, no host syncs), -k cuda;
#   2. benchmarks/host_overhead.py --device cuda --no-sync: ops, host time
#      and kernels per layer-step (torch.profiler);
#   3. benchmarks/train_speed.py --device cuda: ResNet-50 train steps of BN
#      and CBN w4/w8 (CUDA events). Without mmdet (no mmcv build for that
#      CUDA) the backbone is benchmarks/plain_resnet.py and the detector
#      is skipped.
# The exit status is the number of failed steps.
set -uo pipefail

cd "$(dirname "$0")/.."
MODE=${1:-}
PYTHON=${PYTHON:-python3}
WHEELS=.whl
# pinned as in requirements/constraints.txt
PACKAGES=(mmengine==0.10.7 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0
          platformdirs==4.14.7)

prepare() {
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: \
        --python-version "${GPU_PYTHON_VERSION:-3.12}" \
        -d "$WHEELS" "${PACKAGES[@]}"
    ls -l "$WHEELS"
}

# step NAME SECONDS COMMAND...: run one step with a limit, log it
FAILED=0
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - start))s"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

run() {
    OUT=${OUT:-work_dirs/gpu_check}
    mkdir -p "$OUT"
    local site=${TMPDIR:-/tmp}/mmcbn_gpu_check_site
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
            --upgrade --target "$site" "$WHEELS"/*.whl || exit 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    {
        date -u
        git log -1 --format='%H %s' 2>/dev/null || true
        nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: not found'
        "$PYTHON" -c 'import torch, mmengine; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "mmengine", mmengine.__version__, "from", mmengine.__file__)'
    } 2>&1 | tee "$OUT/machine.txt"
    if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && ! "$PYTHON" -c \
            'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo 'gpu_check: CUDA is not available to this Python' >&2
        exit 2
    fi
    local device=${GPU_CHECK_DEVICE:-cuda}
    # (GPU_CHECK_DEVICE=cpu GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_QUICK=1: a dry
    # run of the script itself on a machine without CUDA)
    local quick=()
    [ "${GPU_CHECK_QUICK:-0}" = 1 ] && quick=(--quick)
    step tests 240 "$PYTHON" -m pytest tests/test_devices.py -q -rs \
        -p no:cacheprovider -k "$device"
    step host_overhead 150 "$PYTHON" benchmarks/host_overhead.py \
        --device "$device" --no-sync --reps 100 --out "$OUT" "${quick[@]}"
    step train_speed 210 "$PYTHON" benchmarks/train_speed.py \
        --device "$device" --variants 'CBN w4' 'CBN w8' --reps 10 \
        --no-detector --no-memory --out "$OUT" "${quick[@]}"
    echo "gpu_check: $FAILED step(s) failed; logs and JSON in $OUT"
    exit "$FAILED"
}

case "$MODE" in
    prepare) prepare ;;
    run) run ;;
    *)
        echo "usage: bash tools/gpu_check.sh prepare|run" >&2
        exit 2
        ;;
esac
