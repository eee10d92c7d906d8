#!/usr/bin/env bash
# Cold start on the lent GPU machine, one device call (docs/results/benchmarks.md "Cold start"): installs the carried wheels
# (.whl/), then scripts/bench/cold_start.py on the BLOOM-7b1 shape (14.1 GB of random fp16 weights written to
# .cache/cold_start on the machine's disk), printing everything; log and JSON to $OUT. About 2 minutes on an H100.
#     bash scripts/gpu/cold_start.sh                     # COLD_START_ARGS="--shape 7b1" by default
#     COLD_START_ARGS="--shape tiny" bash scripts/gpu/cold_start.sh   # the same plumbing on a CPU
set -u -o pipefail
OUT=${OUT:-/tmp/cold-start-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cold_start.log") 2>&1
source scripts/gpu/_device_env.sh cold_start.sh
df -h "$PWD" 2>/dev/null | tail -1
# shellcheck disable=SC2086
timeout "${COLD_START_TIMEOUT_S:-330}" python3 scripts/bench/cold_start.py ${COLD_START_ARGS:---shape 7b1} \
  --budget-s "${COLD_START_BUDGET_S:-240}" --json "$OUT/cold_start.json"
rc=$?
echo "== cold_start.py rc=$rc"
cp .cache/cold_start/server-*.log "$OUT/" 2>/dev/null || true
exit $rc
