#!/usr/bin/env bash
# The classical baselines on the paper's datasets: writes benchmarks/results/classic-<dataset>.{json,md}.
# One training process at a time, one thread (the CPU is shared), niced. Resumable: re-run the same
# command after an interruption (finished models are not retrained; delete runs/bench/classic-<dataset>/<model>
# to retrain one). Budget per model via train.max_minutes (wall clock; a `(budget)` stop in the table means
# the model did not reach early stopping).
# Usage: benchmarks/classic.sh [DATA_ROOT] [MAX_MINUTES_INSTRUMENTS] [MAX_MINUTES_GAMES]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/data}
nice -n 10 .venv/bin/ttds bench classic --data "$ROOT/Instruments" --set threads=1 --set train.max_minutes="${2:-12}"
nice -n 10 .venv/bin/ttds bench classic --data "$ROOT/Games" --set threads=1 --set train.max_minutes="${3:-30}"
