#!/usr/bin/env bash
# TTDS beside its static twin TTSS over several seeds, session 27's protocol (1,023 steps, validation NDCG@10 every
# 114 steps on 2,000 users, one thread per run, fp32), two runs at a time on two cores, the longer TTDS run first.
# Resumable: re-run the same command; a finished run only re-reads its metrics.json. Afterwards:
#   .venv/bin/ttds compare runs/seeds/ttss-<data>-<seed> runs/seeds/ttds-<data>-<seed>     (paired, per seed)
#   .venv/bin/python benchmarks/collect_runs.py ablations benchmarks/results/seeds-<data> TTSS@43=runs/seeds/ttss-<data>-43 \
#       TTDS@43=runs/seeds/ttds-<data>-43 ...     (one table, mean ± std over seeds, paired differences)
# (`ttds bench ablations --only ttss,ttds --seeds ...` does the same one run at a time; this runs two at once.)
# Other models with the same protocol: MODELS="stds ttds_dm tt_slsh" benchmarks/seeds.sh DATA "42" — two workers, the
# first takes models 1, 3, 5 … and the second 2, 4, 6 … of each seed (put the longest, dynamic, runs first).
# TAG=alpha1 adds "-alpha1" to the run folders, for a variant with other --set values beside the default runs.
# Usage: benchmarks/seeds.sh DATA_DIR "SEEDS" [--set k=v ...]   (extra settings go to both runs, so the budget stays
# the same; `dynamic.*` settings act on TTDS only), e.g.
#   benchmarks/seeds.sh ../shared/data/Scientific "43 44" --set dynamic.refresh_text=true   (the paper's text refresh)
# On a dataset whose epoch is longer than 1,023 steps (Games: 2,171) add --set dynamic.reassign_steps=341 (Scientific's
# cadence), or TTDS never re-assigns its codes (the run warns).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: benchmarks/seeds.sh DATA_DIR "SEEDS" [--set k=v ...]}
SEEDS=${2:?usage: benchmarks/seeds.sh DATA_DIR "SEEDS" [--set k=v ...]}
shift 2
NAME=$(basename "$DATA" | tr -c "A-Za-z0-9._\n-" _)  # a safe folder name (builtin:users=60 -> builtin_users_60)
mkdir -p runs/seeds
run() {  # run MODEL SEED [--set ...]: one training + test, log beside its folder
    local model=$1 seed=$2; shift 2
    local out=runs/seeds/$model-$NAME-$seed${TAG:+-$TAG}
    .venv/bin/ttds train --model "$model" --data "$DATA" --out "$out" --set seed="$seed" --set threads=1 \
        --set train.max_steps=1023 --set train.eval_steps=114 --set eval.final_valid=false \
        --set eval.template_mean_users=500 "$@" >> "$out.log" 2>&1
}
read -r -a models <<< "${MODELS:-ttds ttss}"
worker() {  # worker FIRST SEED [--set ...]: models FIRST, FIRST+2, … of $MODELS, one after another
    local i=$1 seed=$2; shift 2
    for ((; i < ${#models[@]}; i += 2)); do run "${models[$i]}" "$seed" "$@"; done
}
for seed in $SEEDS; do
    worker 0 "$seed" "$@" &
    first_pid=$!
    worker 1 "$seed" "$@"
    wait "$first_pid"  # a failed run of the first worker stops the script too (bare `wait` would return 0)
done
