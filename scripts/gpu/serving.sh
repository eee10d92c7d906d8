#!/usr/bin/env bash
# The fast backend served, in one device call on one GPU (about 8 minutes):
#   1. cold start: scripts/bench/cold_start.py on the BLOOM-7b1 shape (14.1 GB of random fp16 weights written to
#      .cache/cold_start, page cache emptied, `cat` of the bytes vs start-to-ready of `serve --backend fast`);
#   2. continuous vs dynamic batching over HTTP: the same checkpoint served by `serve --backend fast` with
#      `--batching continuous`, then `--batching dynamic` (one batch run to completion before the next: the original
#      behaviour), each under scripts/bench/load_test.py at concurrency 64, streaming, prompts of 16-256 tokens and outputs
#      of 16-512 tokens (not forced with min_new_tokens: a per-request min_new_tokens is part of dynamic batching's
#      batch key and would split its batches; random weights practically never end early, and short answers are counted), after a warm-up pass that captures the CUDA graphs the load needs;
#   3. with the time left, the default decode fusion (SERVING_CHECK="7b1 wide 176b", any of them) vs transformers.
# Run from the repo root on the lent machine with the project's wheels carried (.whl/):
#     OUT=$OUT bash scripts/gpu/serving.sh
#     SERVING_QUICK=1 bash scripts/gpu/serving.sh     # the same plumbing on a tiny shape (a CPU dry run)
# Logs and JSON go to $OUT (default /tmp/gpu-serving-out). A step that would start past the budget is skipped.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-serving-out}
BUDGET_S=${SERVING_BUDGET_S:-560}
PORT=${SERVING_PORT:-8080}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/serving.log") 2>&1
source scripts/gpu/_device_env.sh serving.sh
PY=${PYTHON:-python3}
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ -n "${SERVING_QUICK:-}" ]; then
  SHAPE=tiny; DTYPE=fp32; CONC=4; NEW=8-32; PROMPT=8-32; DUR=8; DRAIN=10; WARM=3; MAXB=8
else
  SHAPE=7b1; DTYPE=fp16; CONC=64; NEW=16-512; PROMPT=16-256; DUR=${SERVING_DURATION:-60}; DRAIN=${SERVING_DRAIN:-15}
  WARM=${SERVING_WARM:-12}; MAXB=64
fi
MODEL=$PWD/.cache/cold_start/bloom-$SHAPE-$DTYPE

if [ -z "${SERVING_SKIP_COLD:-}" ]; then
  echo "== 1. cold start ($SHAPE)"
  timeout "${SERVING_COLD_TIMEOUT_S:-240}" $PY scripts/bench/cold_start.py --shape $SHAPE --dtype $DTYPE --no-no-prefetch-run \
    --budget-s 150 --json "$OUT/cold_start.json"
  echo "== cold_start.py rc=$?"
  cp .cache/cold_start/server-*.log "$OUT/" 2>/dev/null || true
else
  echo "== 1. cold start skipped (SERVING_SKIP_COLD): writing the checkpoint only"
  $PY -c "import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); import cold_start as c; \
c.write_checkpoint(Path('$MODEL'), '$SHAPE', '$DTYPE', None)"
fi
[ -f "$MODEL/config.json" ] || { echo "no checkpoint at $MODEL: stopping"; exit 1; }

serve_and_load() {  # $1 = batching mode
  local mode=$1 log="$OUT/server-$1.log" pid rc
  if [ "$(left)" -lt $((DUR + DRAIN + WARM + 60)) ]; then echo "== skipped $mode: $(left) s left"; return; fi
  echo "== 2. $mode batching: serve, warm up, load test at concurrency $CONC"
  $PY -m bloom_server serve --model "$MODEL" --backend fast --host 127.0.0.1 --port $PORT \
    --max-batch-size $MAXB --max-input-length 512 --max-new-tokens 512 --max-total-tokens 1024 \
    --max-queued-requests 1024 --batching "$mode" >"$log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.2
  done
  curl -fsS "http://127.0.0.1:$PORT/info" && echo
  # Warm-up: the batch and key buckets this load reaches get their CUDA graphs captured before the measurement.
  timeout $((WARM + DRAIN + 30)) $PY scripts/bench/load_test.py --url "http://127.0.0.1:$PORT" --stream --concurrency $CONC \
    --prompt-tokens $PROMPT --new-tokens $NEW --requests 100000 --duration $WARM --drain $DRAIN --seed 1 --force-length off \
    --label "$mode (warm-up)" --json "$OUT/warmup-$mode.json" | tail -4
  timeout $((DUR + DRAIN + 60)) $PY scripts/bench/load_test.py --url "http://127.0.0.1:$PORT" --stream --concurrency $CONC \
    --prompt-tokens $PROMPT --new-tokens $NEW --requests 100000 --duration $DUR --drain $DRAIN --seed 0 --force-length off \
    --label "$mode" --json "$OUT/load-$mode.json"
  rc=$?
  echo "== load_test $mode rc=$rc"
  curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null | grep -E '^bloom_server_(batch_size|running|queue|time_to_first)' | grep -v _bucket \
    | head -20 || true
  kill -TERM $pid 2>/dev/null
  for _ in $(seq 1 150); do kill -0 $pid 2>/dev/null || break; sleep 0.2; done
  kill -KILL $pid 2>/dev/null
  tail -3 "$log"
}

for mode in ${SERVING_MODES:-continuous dynamic}; do serve_and_load "$mode"; done

# SERVING_CHECK: one or more of 7b1 (bs 1 and 8 on the 7b1 shape), 176b (bs 1 on the 176B layer shape, 8 layers),
# wide (7b1 bs 1, 32, 64 at 300 prompt tokens: the fused attention past 256 keys), each while time is left.
for CHECK in ${SERVING_CHECK:-7b1}; do
  if [ -n "${SERVING_QUICK:-}" ] || [ "$(left)" -le 80 ]; then echo "== 3. skipped (check $CHECK): $(left) s left"; continue; fi
  case "$CHECK" in
    176b) CARGS=(--random-weights 176b --layers 8 --batch-size 1) ;;
    wide) CARGS=(--random-weights 7b1 --batch-size 1,32,64 --input-tokens 300) ;;
    *) CARGS=(--random-weights 7b1 --batch-size 1,8) ;;
  esac
  echo "== 3. the default decode fusion ($CHECK): hf,fast, greedy tokens vs transformers"
  timeout $(( $(left) - 5 )) $PY scripts/bench/benchmark.py --backend hf,fast --check-tokens "${CARGS[@]}" \
    --new-tokens 100 --cycles 2 --json "$OUT/check-$CHECK.json" | tail -12
  echo "step 3 ($CHECK) rc=$?"
done

echo "== 4. summary"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for mode in ("continuous", "dynamic"):
    p = out / f"load-{mode}.json"
    if p.is_file():
        rows[mode] = json.loads(p.read_text()).get("summary", {})
for mode, s in rows.items():
    keys = ("requests", "ok", "errors", "cut", "generated_tokens", "wall_s", "tokens_per_s", "requests_per_s", "latency_ms", "ttft_ms", "tpot_ms")
    print(mode, json.dumps({k: s.get(k) for k in keys if k in s}))
if len(rows) == 2:
    a, b = rows["continuous"].get("tokens_per_s"), rows["dynamic"].get("tokens_per_s")
    if a and b:
        print(f"continuous / dynamic generated tokens/s: {a / b:.2f}x")
PY
echo "== done in $(( $(date +%s) - START )) s"
