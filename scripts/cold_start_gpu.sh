#!/usr/bin/env bash
# Cold start on the lent GPU machine, one device call (docs/benchmarks.md "Cold start"): installs the carried wheels
# (.whl/), then scripts/cold_start.py on the BLOOM-7b1 shape (14.1 GB of random fp16 weights written to
# .cache/cold_start on the machine's disk), printing everything; log and JSON to $OUT. About 2 minutes on an H100.
#     bash scripts/cold_start_gpu.sh                     # COLD_START_ARGS="--shape 7b1" by default
#     COLD_START_ARGS="--shape tiny" bash scripts/cold_start_gpu.sh   # the same plumbing on a CPU
set -u -o pipefail
OUT=${OUT:-/tmp/cold-start-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/cold_start.log") 2>&1
echo "== $(date -u +%FT%TZ) on $(hostname): scripts/cold_start_gpu.sh (commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
df -h "$PWD" 2>/dev/null | tail -1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "wheel install failed: running with the image's packages"
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# shellcheck disable=SC2086
timeout "${COLD_START_TIMEOUT_S:-330}" python3 scripts/cold_start.py ${COLD_START_ARGS:---shape 7b1} \
  --budget-s "${COLD_START_BUDGET_S:-240}" --json "$OUT/cold_start.json"
rc=$?
echo "== cold_start.py rc=$rc"
cp .cache/cold_start/server-*.log "$OUT/" 2>/dev/null || true
exit $rc
