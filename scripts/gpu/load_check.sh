#!/usr/bin/env bash
# The load check a backend passes on a GPU before it is called working: real servers (ds_inference under the
# deepspeed launcher, hf, fast) on random-weight BLOOM shapes, each under scripts/bench/load_test.py with concurrency at
# least twice its max batch size, prompts across the whole input range, outputs up to the limit, for minutes; every
# request must be a 200, the server must still be up at the end, and a sample of greedy answers must equal the same
# prompts sent alone (load_test.py --check-greedy). Run from the repo root on the lent GPU machine, with .whl carried:
#
#     OUT=$OUT bash scripts/gpu/load_check.sh                        # every shape and limit set the budget allows
#     LOADCHECK_LIMITS=wide LOADCHECK_SHAPES=176b:2 OUT=$OUT bash scripts/gpu/load_check.sh
#     LOADCHECK_CASES="deep/176b:2/ds_inference wide/7b1/hf" OUT=$OUT bash scripts/gpu/load_check.sh   # these alone
#
# Limit sets: `overlay` = the bloom-176b-fp16 overlay's (batch 16, input 512, 100 new, queue 64; 32 clients), `wide`
# = the bloom-176b-fast overlay's (batch 32, input 1024, 512 new, queue 128; 64 clients), `deep` = longer prompts and
# answers than the overlay's at its batch (batch 16, input 768, 256 new, queue 128; 32 clients): the 176B layer shape's
# 112 heads on ONE GPU fail DeepSpeed's attention at `wide` (refused at start), where TP 8 holds 14 per GPU
# (docs/results/deepspeed-load-check.md). Shapes: 7b1, and 176b:N (the 176B layer shape, N layers). Servers of one group share the GPU (their throughputs are of that shared run); groups whose weights and
# caches would not fit together run one after another. $OUT gets run.log, the table (summary.md) and raw.tgz (each
# server's log, each load's log and JSON). Exit 0 when every check that ran passed.
set -u -o pipefail
OUT=${OUT:-/tmp/load-check-out}
RAW="$OUT/raw"
mkdir -p "$RAW"
exec > >(tee -a "$OUT/run.log") 2>&1
trap '[ -d "$RAW" ] && tar czf "$OUT/raw.tgz" -C "$OUT" raw' EXIT
# shellcheck source=scripts/gpu/_device_env.sh
source scripts/gpu/_device_env.sh load_check.sh
START=$(date +%s)
BUDGET_S=${LOADCHECK_BUDGET_S:-560}       # wall seconds for everything; a group that would not end inside is skipped
DURATION=${LOADCHECK_DURATION_S:-180}     # seconds of load per group
SHAPES=${LOADCHECK_SHAPES:-7b1 176b:2}
LIMITS=${LOADCHECK_LIMITS:-overlay wide}
BACKENDS=${LOADCHECK_BACKENDS:-ds_inference hf fast}
CASES=${LOADCHECK_CASES:-}   # limits/shape/backend triples: each runs alone on the GPU, nothing else does
if [ -n "$CASES" ]; then
  LIMITS=$(tr ' ' '\n' <<<"$CASES" | cut -d/ -f1 | awk '!seen[$0]++' | xargs)
  SHAPES=$(tr ' ' '\n' <<<"$CASES" | cut -d/ -f2 | awk '!seen[$0]++' | xargs)
  BACKENDS=$(tr ' ' '\n' <<<"$CASES" | cut -d/ -f3 | awk '!seen[$0]++' | xargs)
  LOADCHECK_SOLO=1
fi
GREEDY=${LOADCHECK_GREEDY:-16}
[ "$LIMITS" = none ] && LIMITS=""   # LOADCHECK_LIMITS=none LOADCHECK_SHAPES=none LOADCHECK_BENCH=1: the bench alone
for l in $LIMITS; do
  case $l in overlay|wide|deep) ;; *) echo "load_check.sh: unknown limit set '$l' (overlay, wide, deep)" >&2; exit 2 ;; esac
done
[ "$SHAPES" = none ] && SHAPES=""
WORK=${LOADCHECK_WORK:-/tmp/load-check}
mkdir -p "$WORK"
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
DS_BIN=/tmp/site/bin/deepspeed

echo "== JIT build of DeepSpeed's transformer_inference op (background), random weights meanwhile"
( t=$(date +%s); MAX_JOBS=12 python3 -c "from deepspeed.ops.op_builder import InferenceBuilder; InferenceBuilder().load()" \
    > "$RAW/jit.log" 2>&1; echo "jit rc=$? in $(( $(date +%s) - t ))s" >> "$RAW/jit.log" ) &
JIT=$!
declare -A MODEL
for shape in $SHAPES; do
  name=${shape%%:*}; layers=""; [[ $shape == *:* ]] && layers="--layers ${shape#*:}"
  dir="$WORK/models/${shape/:/-}"
  MODEL[$shape]=$dir
  if [ ! -f "$dir/config.json" ]; then
    t=$(date +%s)
    python3 scripts/bench/make_random_bloom.py "$dir" --shape "$name" $layers --dtype fp16 --init-device "${LOADCHECK_INIT_DEVICE:-cuda}" \
      > "$RAW/make-${shape/:/-}.log" 2>&1 || { echo "make_random_bloom $shape failed"; tail -5 "$RAW/make-${shape/:/-}.log"; }
    echo "weights $shape: $(du -sh "$dir" | cut -f1) in $(( $(date +%s) - t ))s"
  fi
done
wait "$JIT"; tail -1 "$RAW/jit.log"

if [ "${LOADCHECK_PROBE:-1}" = 1 ] && [[ " $BACKENDS " == *" ds_inference "* ]]; then
  echo "== the cause: DeepSpeed sizes its workspace at the first forward's batch size"
  PROBE_DIR="$WORK/models/probe"
  [ -f "$PROBE_DIR/config.json" ] || python3 scripts/bench/make_random_bloom.py "$PROBE_DIR" --shape 560m --layers 2 \
    --dtype fp16 --init-device cuda > "$RAW/make-probe.log" 2>&1
  for order in small-first large-first; do
    timeout 120 python3 - "$PROBE_DIR" "$order" <<'PY' 2>&1 | grep -E "^probe|Error" | head -3
import sys, torch, deepspeed
from transformers import AutoModelForCausalLM
from bloom_server.backends.ds_inference import ensure_distributed
from bloom_server.types import RankContext
path, order = sys.argv[1], sys.argv[2]
ensure_distributed(deepspeed, RankContext(device_type="cuda"))
model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float16).eval()
engine = deepspeed.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True, max_tokens=612)
def gen(rows, prompt):
    ids = torch.full((rows, prompt), 100, device="cuda")
    with torch.inference_mode():
        engine.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8,
                        do_sample=False, pad_token_id=3)
    torch.cuda.synchronize()
shapes = [(1, 8), (16, 250)] if order == "small-first" else [(16, 250), (1, 8), (16, 250)]
for rows, prompt in shapes:
    try:
        gen(rows, prompt)
        print(f"probe {order}: generate {rows} x {prompt} tokens: ok", flush=True)
    except RuntimeError as e:
        print(f"probe {order}: generate {rows} x {prompt} tokens: {type(e).__name__}: {str(e)[:160]}", flush=True)
        break
PY
  done
fi

bench() {
  echo "== greedy tokens against batch size, each backend against itself and against transformers (7b1 shape)"
  timeout 300 python3 -m bloom_server bench --backend hf,fast,ds_inference --random-weights 7b1 \
    --batch-size 1,8,64,128 --input-tokens 64 --new-tokens 32 --cycles 2 --check-tokens --deadline-s 200 \
    --json "$RAW/bench.json" > "$RAW/bench.log" 2>&1
  grep -E "^\||vs hf|vs its own" "$RAW/bench.log" | tee "$OUT/bench.md"
}
# LOADCHECK_BENCH=1: the bench first, alone; =bg: beside the load groups (its timings then are of a shared GPU, its
# greedy comparisons hold all the same).
BENCH_PID=""
case ${LOADCHECK_BENCH:-0} in
  1) bench ;;
  bg) bench & BENCH_PID=$! ;;
esac

limit_flags() {  # serve flags and load flags of a limit set
  case $1 in
    overlay) echo "--max-batch-size 16 --max-input-length 512 --max-new-tokens 100 --max-queued-requests 64|--concurrency 32 --prompt-tokens 1-512 --new-tokens 1-100" ;;
    wide) echo "--max-batch-size 32 --max-input-length 1024 --max-new-tokens 512 --max-queued-requests 128|--concurrency 64 --prompt-tokens 1-1024 --new-tokens 1-512" ;;
    deep) echo "--max-batch-size 16 --max-input-length 768 --max-new-tokens 256 --max-queued-requests 128|--concurrency 32 --prompt-tokens 1-768 --new-tokens 1-256" ;;
  esac
}

start_server() {  # backend model port log serve-flags...
  local backend=$1 model=$2 port=$3 log=$4; shift 4
  if [ "$backend" = ds_inference ]; then
    setsid "$DS_BIN" --num_gpus 1 --master_port $(( port + 1000 )) --module bloom_server serve --backend ds_inference \
      --dtype fp16 --model "$model" --host 127.0.0.1 --port "$port" "$@" > "$log" 2>&1 &
  else
    setsid python3 -m bloom_server serve --backend "$backend" --dtype fp16 --model "$model" --host 127.0.0.1 \
      --port "$port" "$@" > "$log" 2>&1 &
  fi
  echo $!
}

ready() {  # port: 0 once /ready answers 200
  python3 - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/ready", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

gpu_gb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
gpu_gb=$(( ${gpu_gb:-81000} / 1024 ))
echo "| limits | shape | backend | requests (ok / errors) | tokens/s (shared GPU) | latency p50 / p99 ms | greedy equal / near ties / faults | server up after | result |" > "$OUT/summary.md"
echo "|---|---|---|---|---|---|---|---|---|" >> "$OUT/summary.md"
FAILED=0
port=18100
for limits in $LIMITS; do
  IFS='|' read -r serve_flags load_flags <<<"$(limit_flags "$limits")"
  # Groups: every shape at once where the GPU holds them all (>= 120 GB), else one shape at a time; with
  # LOADCHECK_SOLO=1 one backend at a time too (a throughput of the GPU alone); =auto: solo where the GPU is under
  # 120 GB (the wide limits' servers need ~40-60 GB each).
  if [ "$gpu_gb" -ge 120 ] && [ "$limits" = overlay ] && [ -z "$CASES" ]; then groups=("$SHAPES"); else groups=($SHAPES); fi
  solo_mode=${LOADCHECK_SOLO:-0}; [ "$solo_mode" = auto ] && { [ "$gpu_gb" -ge 120 ] && solo_mode=0 || solo_mode=1; }
  if [ "$solo_mode" = 1 ]; then
    solo=(); for g in "${groups[@]}"; do for b in $BACKENDS; do solo+=("$g@$b"); done; done; groups=("${solo[@]}")
  fi
  for group_entry in "${groups[@]}"; do
    group=${group_entry%@*}; group_backends=$BACKENDS; [[ $group_entry == *@* ]] && group_backends=${group_entry##*@}
    [ -n "$CASES" ] && [[ " $CASES " != *" $limits/$group/$group_backends "* ]] && continue
    if [ "$(left)" -lt $(( DURATION + 150 )) ]; then
      echo "== $limits / $group: SKIPPED ($(left) s left of the budget, $(( DURATION + 150 )) needed)"
      FAILED=1; continue
    fi
    echo "== $limits limits ($serve_flags), shapes: $group; backends: $group_backends; load: $load_flags, ${DURATION}s"
    declare -A PIDS=() PORTS=()
    for shape in $group; do
      for backend in $group_backends; do
        key="$shape/$backend"; port=$(( port + 1 ))
        PORTS[$key]=$port
        PIDS[$key]=$(start_server "$backend" "${MODEL[$shape]}" "$port" "$RAW/server-$limits-${shape/:/-}-$backend.log" $serve_flags)
      done
    done
    t=$(date +%s)
    for key in "${!PORTS[@]}"; do
      until ready "${PORTS[$key]}"; do
        if ! kill -0 "${PIDS[$key]}" 2>/dev/null || [ $(( $(date +%s) - t )) -gt 240 ]; then
          echo "$key: not ready (exited or 240 s); its log ends:"; tail -5 "$RAW/server-$limits-${key//[:\/]/-}.log" 2>/dev/null
          break
        fi
        sleep 2
      done
    done
    echo "servers up after $(( $(date +%s) - t ))s"
    LT=()
    for key in "${!PORTS[@]}"; do
      json="$RAW/load-$limits-${key//[:\/]/-}.json"
      python3 scripts/bench/load_test.py --url "http://127.0.0.1:${PORTS[$key]}" $load_flags --requests 100000 \
        --duration "$DURATION" --drain 60 --timeout 180 --check-greedy "$GREEDY" --seed 1 --json "$json" \
        > "$RAW/load-$limits-${key//[:\/]/-}.log" 2>&1 &
      LT+=("$!:$key")
    done
    for entry in "${LT[@]}"; do
      pid=${entry%%:*}; key=${entry#*:}; wait "$pid"; rc=$?
      up=no; kill -0 "${PIDS[$key]}" 2>/dev/null && ready "${PORTS[$key]}" && up=yes
      json="$RAW/load-$limits-${key//[:\/]/-}.json"
      row=$(python3 - "$json" "$limits" "$key" "$up" "$rc" "$RAW/server-$limits-${key//[:\/]/-}.log" <<'PY'
import json, re, sys
path, limits, key, up, rc, log = sys.argv[1:]
shape, backend = key.split("/")
try:
    r = json.load(open(path))
except Exception as e:
    # A server that refused its limits at start (the designed answer to limits it cannot hold) is told apart from a crash.
    try:
        m = re.search(r"ConfigError: ([^\n]*?)(?: Lower them| or add GPUs|$)", open(log, errors="replace").read(), re.M)
    except OSError:
        m = None
    why = f"refused at start: {m.group(1)[:300]}" if m else f"no report ({type(e).__name__})"
    print(f"| {limits} | {shape} | {backend} | {why} | | | | {up} | {'refused' if m else 'FAILED'} |"); sys.exit()
s, g = r["summary"], r.get("greedy_check") or {}
lat = s["latency_ms"]
ok = rc == "0" and up == "yes"
print(f"| {limits} | {shape} | {backend} | {s['requests']} ({s['ok']} / {s['errors']}) | {s['tokens_per_s']:.0f} | "
      f"{lat['p50'] or 0:.0f} / {lat['p99'] or 0:.0f} | {g.get('equal')} / {g.get('near_ties')} / {g.get('faults')} of "
      f"{g.get('checked')} | {up} | {'passed' if ok else 'FAILED'} |")
PY
)
      echo "$row" | tee -a "$OUT/summary.md"
      [[ $row == *passed* ]] || FAILED=1
      tail -4 "$RAW/load-$limits-${key//[:\/]/-}.log"
    done
    for key in "${!PIDS[@]}"; do kill -TERM -- "-${PIDS[$key]}" 2>/dev/null; done
    sleep 8
    for key in "${!PIDS[@]}"; do kill -KILL -- "-${PIDS[$key]}" 2>/dev/null; done
    unset PIDS PORTS
  done
done
[ -n "$BENCH_PID" ] && wait "$BENCH_PID"
echo "== summary ($(( $(date +%s) - START ))s)"
cat "$OUT/summary.md"
tar czf "$OUT/raw.tgz" -C "$OUT" raw && rm -rf "$RAW"
trap - EXIT
exit $FAILED
