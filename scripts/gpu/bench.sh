#!/usr/bin/env bash
# The fast engine against transformers (and DeepSpeed kernel injection, when its wheel is carried) on one GPU, in one
# device call: the BLOOM-176B layer shape (8 layers) at bs 1, the BLOOM-7b1 shape at bs 1, 8, 32, 64, 128, random fp16
# weights shared by every backend, greedy tokens compared with transformers'; then static vs continuous batching on
# mixed output lengths. About 5 minutes on an H100 after the machine starts. Run from the repo root on the lent
# machine, with the project's wheels (.whl/: transformers 4.43.4, tokenizers, deepspeed...) carried:
#
#     bash scripts/gpu/bench.sh                 # logs, JSON and the tables go to $OUT (default /tmp/bench-gpu-out)
#     BENCH_QUICK=1 bash scripts/gpu/bench.sh   # the same plumbing on a tiny shape (a CPU dry run)
#
# Every step runs even if an earlier one failed; a step that would start past the budget is skipped, not cut.
set -u -o pipefail
OUT=${OUT:-/tmp/bench-gpu-out}
BUDGET_S=${BENCH_BUDGET_S:-330}   # wall seconds for everything after the installs
CYCLES=${BENCH_CYCLES:-3}
NEW=${BENCH_NEW_TOKENS:-100}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/bench.log") 2>&1

source scripts/gpu/_device_env.sh bench.sh
python3 - <<'PY'
import sys, torch, transformers
try:
    import deepspeed; ds = deepspeed.__version__
except Exception as e:  # noqa: BLE001
    ds = f"absent ({type(e).__name__})"
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__, "deepspeed", ds, flush=True)
PY
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ -n "${BENCH_QUICK:-}" ]; then
  SHAPE7=(--random-weights tiny); SHAPE176=(--random-weights tiny --layers 1); BS="1,2"
else
  SHAPE7=(--random-weights 7b1); SHAPE176=(--random-weights 176b --layers ${BENCH_176B_LAYERS:-8}); BS="1,8,32,64,128"
fi
HAVE_DS=$(python3 -c "import deepspeed" >/dev/null 2>&1 && echo 1 || echo "")
if [ -n "$HAVE_DS" ] && [ -z "${BENCH_QUICK:-}" ]; then
  BACKENDS7="hf,fast,ds_inference"   # hf first (the reference tokens); kernel injection rewrites the model, so last
else
  BACKENDS7="hf,fast"
fi

echo "== 1. 176B layer shape: hf,fast at bs 1, greedy tokens vs transformers"
if [ "$(left)" -gt 60 ]; then
  timeout 90 python3 scripts/bench/benchmark.py --backend hf,fast --check-tokens "${SHAPE176[@]}" \
    --batch-size 1 --new-tokens "$NEW" --cycles "$CYCLES" --json "$OUT/176b.json"
  echo "step 1 rc=$?"
else
  echo "step 1: SKIPPED ($(left) s left)"
fi

echo "== 2. 7b1 shape: $BACKENDS7 at bs $BS ($NEW new tokens, $CYCLES cycles), greedy tokens vs transformers"
timeout $(( $(left) - 20 )) python3 scripts/bench/benchmark.py --backend "$BACKENDS7" --check-tokens "${SHAPE7[@]}" \
  --batch-size "$BS" --new-tokens "$NEW" --cycles "$CYCLES" --deadline-s $(( $(left) - 60 )) --json "$OUT/7b1.json"
echo "step 2 rc=$?"

echo "== 3. 7b1 shape, mixed output lengths: static batches vs continuous batching over 32 slots (engine level)"
if [ "$(left)" -gt 45 ]; then
  timeout $(( $(left) - 5 )) python3 scripts/bench/benchmark.py "${SHAPE7[@]}" --mixed ${BENCH_MIXED_REQUESTS:-128} \
    --batch-size 32 --new-tokens ${BENCH_MIXED_MAX_NEW:-256} --json "$OUT/mixed.json"
  echo "step 3 rc=$?"
else
  echo "step 3: SKIPPED ($(left) s left)"
fi

nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null || true
echo "== done in $(( $(date +%s) - START ))s after the installs; files in $OUT"
