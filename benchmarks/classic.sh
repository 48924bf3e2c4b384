#!/usr/bin/env bash
# The classical baselines on the paper's datasets: writes benchmarks/results/classic-<dataset>.{json,md}.
# Resumable: re-run the same command after an interruption. Budget per model via train.max_minutes.
# Usage: benchmarks/classic.sh [DATA_ROOT] [MAX_MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-../shared/data}
MINUTES=${2:-30}
for d in Instruments Games; do
  nice -n 10 .venv/bin/ttds bench classic --data "$ROOT/$d" --set train.max_minutes="$MINUTES"
done
