#!/usr/bin/env bash
# The paper's experiments on the real data in ../shared/data (docs/results.md holds what this printed).
# Each `din compare` trains BaseModel, DIN (PReLU), DIN+Dice, DIN+MBA, DIN+MBA+Dice and DIN with dense
# full-table L2 (the paper's Tables 3 to 5 rows, plus its Table 4 question), three seeds each, on one
# train/test split, and writes runs/paper/<set>/{compare.json,compare.md} and docs/img/<set>.png.
# Part 2 repeats the paper's Table 4 question (no regulariser, dense full-table L2, MBA) with row-wise
# Adagrad, the optimiser under which MBA runs fused inside backward (with Adam it uses SparseAdam).
# Part 3 is the control for both: the MBA tables and their optimiser (SparseAdam, or fused row-wise
# Adagrad) with a negligible penalty (lam = 1e-9), so that the penalty's effect is told apart from the
# table optimiser's.
# Two compares run at a time, one torch thread each (a 2-core machine): about 45 minutes in all.
#   bash docs/experiments.sh              (from the repository root, after `make setup`; PART=1, 2 or 3 for one part)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
COMMON=(--seeds 1-3 --quiet)
mkdir -p runs/paper docs/img

run() {  # run NAME EPOCHS SPEC [more compare options]
    local name=$1 epochs=$2 spec=$3
    shift 3
    OMP_NUM_THREADS=1 "$PY" -m din compare --data "$spec" --epochs "$epochs" "${COMMON[@]}" "$@" \
        --out "runs/paper/$name" --plot "docs/img/$name.png" > "runs/paper/$name.log" 2>&1
    echo "== $name"; tail -n 9 "runs/paper/$name.log"
}

TAOBAO="taobao:$DATA/taobao-userbehavior/UserBehavior_head814users.csv"
BEAUTY="amazon-csv:$DATA/amazon-tlsan-remap/Beauty"
PAPER=(--variants paper,din-l2)
ADAGRAD=(--variants regularizers --optimizer adagrad --lr 0.05)

if [ "${PART:-all}" = all ] || [ "${PART}" = 1 ]; then  # part 1: Adam, the paper's rows
    run taobao 4 "$TAOBAO" "${PAPER[@]}" &
    { run movielens 3 movielens "${PAPER[@]}"; run amazon-beauty 6 "$BEAUTY" "${PAPER[@]}"; } &
    wait
fi
if [ "${PART:-all}" = all ] || [ "${PART}" = 2 ]; then  # part 2: regularisers under row-wise Adagrad
    run taobao-adagrad 4 "$TAOBAO" "${ADAGRAD[@]}" &
    { run movielens-adagrad 3 movielens "${ADAGRAD[@]}"; run amazon-beauty-adagrad 6 "$BEAUTY" "${ADAGRAD[@]}"; } &
    wait
fi
if [ "${PART:-all}" = all ] || [ "${PART}" = 3 ]; then  # part 3: table optimisers without the penalty
    CONTROL=(--variants din-mba --mba-lambda 1e-9)
    { run taobao-control 4 "$TAOBAO" "${CONTROL[@]}"
      run taobao-adagrad-control 4 "$TAOBAO" "${CONTROL[@]}" "${ADAGRAD[@]:2}"; } &
    { run amazon-beauty-control 6 "$BEAUTY" "${CONTROL[@]}"
      run amazon-beauty-adagrad-control 6 "$BEAUTY" "${CONTROL[@]}" "${ADAGRAD[@]:2}"
      run movielens-control 3 movielens "${CONTROL[@]}"
      run movielens-adagrad-control 3 movielens "${CONTROL[@]}" "${ADAGRAD[@]:2}"; } &
    wait
fi
