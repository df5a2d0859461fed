#!/usr/bin/env bash
# Device check for a lent GPU (see benchmarks/RESULTS.md): the kernel tests on CUDA, then the attention,
# Dice and MBA benchmarks. Everything lands under "$OUT", 7 files (a device run returns at most 8):
#   summary.log  the steps, their exit codes and last lines      env.log    nvidia-smi, versions
#   tests.log    the kernel tests on CUDA                          bench.log  pytest-benchmark output
#   bench_attention.json  pytest-benchmark's JSON
#   timing.log   the attention forward and backward apart (do_bench), eager / torch.compile / din_kernels in
#                fp32, TF32 and bf16, each next to its roofline floor (benchmarks/gpu_timing.py)
#   ops.log      the Dice and MBA tables
# Every step runs under its own timeout (470 s in all, within an 8-minute budget for one command) and the
# script carries on after a failure; the exit status counts the failed steps. Without CUDA it stops at once
# with exit status 2. GPU_CHECK_PLAN=1 prints the steps, their timeouts and the files, and runs nothing
# (tests/test_gpu_check.py checks the budget and the file count that way).
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh            (PYTHON=python3 by default)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PYTHON=${PYTHON:-python3}
PLAN=${GPU_CHECK_PLAN:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DIN_KERNELS_BACKEND=auto
unset TRITON_INTERPRET
failed=0
total=0

step() {  # step NAME SECONDS FILES COMMAND...: log to $OUT/NAME.log, record the status
    local name=$1 seconds=$2 files=$3
    shift 3
    total=$((total + seconds))
    if [ "$PLAN" = 1 ]; then
        echo "step $name ${seconds}s files: $files"
        return
    fi
    echo "== $name: $*" | tee -a "$OUT/summary.log"
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status" | tee -a "$OUT/summary.log"
    tail -n 5 "$OUT/$name.log" | tee -a "$OUT/summary.log"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

if [ "$PLAN" != 1 ]; then
    if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "gpu_check: no CUDA device visible to $PYTHON (torch.cuda.is_available() is False): nothing to check" >&2
        exit 2
    fi
    mkdir -p "$OUT"
fi

step env 20 "summary.log env.log" bash -c "nvidia-smi; \"$PYTHON\" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
# tests/conftest.py sets TRITON_INTERPRET=1 only when unset: TRITON_INTERPRET=0 keeps the real GPU kernels,
# and DIN_KERNELS_BACKEND=auto runs them on CUDA tensors. DIN_TEST_DEVICE=cuda makes CUDA the tests' default
# device (tests/conftest.py), so the kernel tests feed the real kernels. 260 s: the kernel specialisations
# alone took 172 s to compile on the 2-core CPU machine. Not yet run on a GPU.
step tests 260 "tests.log" env TRITON_INTERPRET=0 DIN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_attention.py tests/test_attention_triton.py tests/test_attention_torch.py \
    tests/test_dice.py tests/test_mba.py tests/test_candidates.py
step bench 50 "bench.log bench_attention.json" env DIN_BENCH_CASES=2048x200x64,2048x200x64:full "$PYTHON" -m pytest -q \
    -p no:cacheprovider benchmarks/bench_attention.py --benchmark-json="$OUT/bench_attention.json" \
    --benchmark-columns=min,median,mean,rounds -s
step timing 90 "timing.log" "$PYTHON" benchmarks/gpu_timing.py --case 2048x200x64:full
step ops 50 "ops.log" bash -c "\"$PYTHON\" benchmarks/bench_dice.py --table --repeats 15 && \"$PYTHON\" benchmarks/bench_mba.py --repeats 5"
if [ "$PLAN" = 1 ]; then
    echo "total ${total}s"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv >>"$OUT/env.log" 2>&1
echo "failed steps: $failed" | tee -a "$OUT/summary.log"
exit "$failed"
