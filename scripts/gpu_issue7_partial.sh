#!/usr/bin/env bash
# Issue "Full size" (BLOOM-176B, 70 layers at TP=8) on what is lent when the 8-GPU machine is not: ONE H200 holds the
# 176B layer shape with as many layers as fit beside the KV cache of bs 128 (default 18 layers, ~96 GB of random fp16
# weights, the full 250880 x 14336 embedding). The fast engine against transformers at bs 1, 8, 32, 64, 128, 100 new
# tokens, greedy, min == max, tokens compared with transformers'; ms per step and per token and the fraction of the
# memory floor, from scripts/benchmark.py. DeepSpeed kernel injection is left out (its JIT build alone is ~100 s).
#     OUT=$OUT bash scripts/gpu_issue7_partial.sh          # on the lent nvidia-h200, wheels carried (.whl/)
#     ISSUE7_QUICK=1 bash scripts/gpu_issue7_partial.sh    # the same plumbing on a tiny shape (CPU dry run)
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-issue7-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_issue7_partial.log") 2>&1
source scripts/_device_env.sh gpu_issue7_partial.sh
PY=${PYTHON:-python3}
if [ -n "${ISSUE7_QUICK:-}" ]; then
  ARGS=(--random-weights tiny --batch-size 1,2 --new-tokens 8 --cycles 1)
else
  ARGS=(--random-weights 176b --layers "${ISSUE7_LAYERS:-18}" --batch-size "${ISSUE7_BS:-1,8,32,64,128}"
        --new-tokens 100 --cycles "${ISSUE7_CYCLES:-2}")
fi
timeout "${ISSUE7_TIMEOUT_S:-480}" $PY scripts/benchmark.py --backend hf,fast --check-tokens "${ARGS[@]}" \
  --deadline-s "${ISSUE7_DEADLINE_S:-420}" --json "$OUT/176b-partial.json"
echo "== benchmark rc=$?"
