#!/usr/bin/env bash
# Device check for a lent GPU (see benchmarks/RESULTS.md): the kernel tests on CUDA, then the
# attention benchmark at B=2048, T=200, D=64. Everything lands under "$OUT" (7 files at most, within what a
# device run returns): junit xml, benchmark json, logs, nvidia-smi. Every step runs under a timeout and the
# script carries on after a failure; the exit status counts the failed steps. Budget: at most 10.5 minutes of step timeouts.
#   OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh            (PYTHON=python3 by default)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DIN_KERNELS_BACKEND=auto
unset TRITON_INTERPRET
failed=0

step() {  # step NAME SECONDS COMMAND...: log to $OUT/NAME.log, record the status
    local name=$1 seconds=$2
    shift 2
    echo "== $name: $*" | tee -a "$OUT/summary.log"
    timeout --kill-after=10 "$seconds" "$@" >"$OUT/$name.log" 2>&1
    local status=$?
    echo "== $name: exit $status" | tee -a "$OUT/summary.log"
    tail -n 5 "$OUT/$name.log" | tee -a "$OUT/summary.log"
    [ "$status" -eq 0 ] || failed=$((failed + 1))
}

step env 30 bash -c "nvidia-smi; \"$PYTHON\" -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
# tests/conftest.py sets TRITON_INTERPRET=1 only when unset: an empty value keeps the real GPU kernels
# (the interpreter flag reads "1" exactly), and DIN_KERNELS_BACKEND=auto runs them on CUDA tensors.
# DIN_TEST_DEVICE=cuda makes CUDA the tests' default device (tests/conftest.py), so the kernel tests feed
# the real kernels. Not yet run on a GPU: no device has been lent to this project so far.
step tests 180 env TRITON_INTERPRET=0 DIN_TEST_DEVICE=cuda "$PYTHON" -m pytest -q -p no:cacheprovider \
    tests/test_attention.py tests/test_attention_triton.py tests/test_attention_torch.py \
    tests/test_dice.py tests/test_mba.py --junitxml="$OUT/tests.xml"
step bench 180 env DIN_BENCH_CASES=2048x200x64,2048x200x64:full "$PYTHON" -m pytest -q -p no:cacheprovider \
    benchmarks/bench_attention.py --benchmark-json="$OUT/bench_attention.json" \
    --benchmark-columns=min,median,mean,rounds -s
step table 90 env DIN_BENCH_CASES=2048x200x64 "$PYTHON" benchmarks/bench_attention.py --table --repeats 20
step dice 60 "$PYTHON" benchmarks/bench_dice.py --table --repeats 15
step mba 90 "$PYTHON" benchmarks/bench_mba.py --repeats 5
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv >>"$OUT/env.log" 2>&1
echo "failed steps: $failed" | tee -a "$OUT/summary.log"
exit "$failed"
