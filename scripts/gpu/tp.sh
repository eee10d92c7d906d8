#!/usr/bin/env bash
# Tensor parallelism in one device call: TP=2 (nvidia-h200-x2) or TP=8 (nvidia-h200-x8).
# At TP=8 it covers the bloom-176b-fast overlay's path (manifests/components/bloom-176b-fast): `bloom-server preshard
# --tp 8` of a 176B-layer-shape checkpoint, then `serve --backend fast` at 8 ranks from the pre-sharded directory (steps
# 1, 3 and 4), its bench at all 70 layers (step 2). The overlay's own settings are not forced here.
#   1. correctness: a random-weight BLOOM of the 176B layer shape with a few layers (scripts/bench/make_random_bloom.py,
#      drawn on GPU 0; 4 layers at TP=2, 2 at TP=8) served at TP=1 and at TP=$TP; POST /generate, greedy, the prompts
#      as one batch and one by one; the texts at TP=$TP must equal the TP=1 texts of the same backend:
#        fast:          TP=1 `python -m bloom_server serve`, TP=$TP under torchrun, and the `bloom-server preshard
#                       --tp $TP` layout under torchrun;
#        ds_inference:  (only if deepspeed imports) TP=1 and TP=$TP under the deepspeed launcher, and DeepSpeed's own
#                       pre-sharded TP=$TP layout (make_random_bloom.py --presharded-only --presharded-out under the
#                       launcher: write_presharded_checkpoint, the writer gpu_check used);
#   2. speed: scripts/bench/benchmark.py under the launcher (deepspeed when it imports, else torchrun) at TP=$TP, 176B layer
#      shape, 100 new tokens, greedy: TP=2: 10 layers, hf,fast,ds_inference at bs 1, 8, 64; TP=8: fast on all 70
#      layers at bs 1, 8, 32, 64, 128, then hf,fast,ds_inference on GPU_TP_CMP_LAYERS (14) layers (a whole copy of
#      the model per GPU is what bench.py's hf and ds_inference start from: 70 layers cannot). bench.py's hf is
#      transformers on one GPU per rank (no accelerate device_map), so hf's figure is one GPU's;
#   3. cold start: scripts/bench/cold_start.py --preshard $TP (176B layer shape, 10 layers at TP=2, 12 at TP=8: the
#      checkpoint and its pre-sharded copy must both fit the disk), start-to-ready vs `cat` of the same bytes;
#   4. the server: scripts/bench/load_test.py, streaming, prompts 16-256 and outputs 16-512 tokens (--force-length off),
#      at concurrency 1, 8, 64 (TP=2) or 1, 8, 64, 128 (TP=8) against `serve --backend fast` at TP=$TP (torchrun) on
#      step 3's pre-sharded checkpoint (step 1's when step 3 did not run).
# Random weights are drawn on the GPUs: bench.py's fast weights per rank (each rank draws one tensor at a time on its
# own GPU and keeps its shard), cold_start.py's writer tensor by tensor on GPU 0 to disk; nothing builds the 70-layer
# model on the host.
#     TP=2 OUT=$OUT bash scripts/gpu/tp.sh                        # nvidia-h200-x2 (carry .whl)
#     TP=8 OUT=$OUT bash scripts/gpu/tp.sh                        # nvidia-h200-x8
#     GPU_TP_STEPS="3 4" TP=8 OUT=$OUT bash scripts/gpu/tp.sh     # some steps only (a second call)
#     GPU_TP_QUICK=1 TP=2 PYTHON=.venv/bin/python OUT=/tmp/gtp bash scripts/gpu/tp.sh   # CPU dry run: tiny, 2 gloo ranks
# Logs, per-step JSON and gpu_tp.json (each step's rc and seconds, the comparisons) go to $OUT. A step (or a server of
# step 1) that would start past the budget (GPU_TP_BUDGET_S, default 560 s) is skipped, not cut.
set -u -o pipefail
TP=${TP:?set TP=2 or TP=8}
OUT=${OUT:-/tmp/gpu-tp$TP-out}
BUDGET_S=${GPU_TP_BUDGET_S:-560}
STEPS=${GPU_TP_STEPS:-1 2 3 4}
QUICK=${GPU_TP_QUICK:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_tp.log") 2>&1
source scripts/gpu/_device_env.sh tp.sh
PY=${PYTHON:-python3}
if [ -n "$QUICK" ]; then export PYTHONPATH=$PWD/src; fi  # the CPU dry run uses $PYTHON's own packages, not .whl's
export MAX_JOBS=${MAX_JOBS:-14}  # DeepSpeed's op build
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
tmo() { local l; l=$(left); [ "$l" -gt "$1" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo "$l"; }  # a timeout: <= $1, <= left
free_port() { $PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])"; }
STEPS_JSON=$OUT/steps.jsonl; : > "$STEPS_JSON"
record() {  # step name rc seconds [note]
  printf '{"step": "%s", "name": "%s", "rc": %s, "seconds": %s, "note": "%s"}\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$STEPS_JSON"
  echo "== step $1 ($2): rc=$3 in $4 s ${5:-}"
}
want() { [[ " $STEPS " == *" $1 "* ]]; }

# ds_inference runs when deepspeed imports (GPU_TP_DS=auto, not in the CPU dry run); GPU_TP_DS=0 leaves it out, 1 forces it.
HAVE_DS=0
case ${GPU_TP_DS:-auto} in
  1) HAVE_DS=1 ;;
  auto) if [ -z "$QUICK" ] && $PY -c "import deepspeed" >/dev/null 2>&1; then HAVE_DS=1; fi ;;
esac
TORCHRUN=($PY -m torch.distributed.run)
DSRUN=($PY -m deepspeed.launcher.runner)
launcher() {  # n -> the multi-rank launcher for scripts (deepspeed when it imports, torchrun otherwise)
  if [ "$HAVE_DS" = 1 ]; then echo "${DSRUN[*]} --num_gpus $1 --master_port $(free_port)"
  else echo "${TORCHRUN[*]} --nproc_per_node $1 --master_port $(free_port)"; fi
}

if [ -n "$QUICK" ]; then
  SHAPE=tiny; DTYPE=fp32; CORR_LAYERS=2; INIT_STD=0.05; NEW=12
  BENCH_LAYERS=2; BS=1,4; BENCH_NEW=8; CYCLES=1; COLD_LAYERS=2
  CONCS="1 4"; LT_PROMPT=8-32; LT_NEW=8-32; LT_DUR=4; LT_DRAIN=10; LT_WARM=2; MAXB=8
  SERVER_MIN=10; BENCH_MIN=20; COLD_MIN=30; LT_START=30  # a tiny CPU server starts in seconds
else
  SERVER_MIN=${GPU_TP_SERVER_MIN_S:-60}; BENCH_MIN=${GPU_TP_BENCH_MIN_S:-90}; COLD_MIN=${GPU_TP_COLD_MIN_S:-150}
  SHAPE=176b; DTYPE=fp16; INIT_STD=${GPU_TP_INIT_STD:-0.05}; NEW=${GPU_TP_NEW:-24}; BENCH_NEW=100
  CYCLES=${GPU_TP_CYCLES:-3}; LT_PROMPT=16-256; LT_NEW=16-512; LT_DUR=${GPU_TP_LT_DURATION:-20}
  LT_DRAIN=${GPU_TP_LT_DRAIN:-15}; LT_WARM=${GPU_TP_LT_WARM:-8}; MAXB=128; LT_START=90
  if [ "$TP" -ge 8 ]; then
    CORR_LAYERS=${GPU_TP_CORR_LAYERS:-2}; BENCH_LAYERS=70; BS=1,8,32,64,128; COLD_LAYERS=${GPU_TP_COLD_LAYERS:-12}
    CONCS="1 8 64 128"
  else
    CORR_LAYERS=${GPU_TP_CORR_LAYERS:-4}; BENCH_LAYERS=10; BS=1,8,64; COLD_LAYERS=${GPU_TP_COLD_LAYERS:-10}
    CONCS="1 8 64"
  fi
fi
CMP_LAYERS=${GPU_TP_CMP_LAYERS:-14}
CACHE=${GPU_TP_CACHE:-$PWD/.cache}   # checkpoints: $CACHE/gpu_tp (step 1), $CACHE/cold_start (steps 3, 4)
WORK=$CACHE/gpu_tp
MODEL=$WORK/bloom-$SHAPE-${CORR_LAYERS}l-$DTYPE
echo "== TP=$TP shape=$SHAPE dtype=$DTYPE deepspeed=$HAVE_DS steps: $STEPS; budget ${BUDGET_S} s; python $($PY -V 2>&1)"
mkdir -p "$WORK"

JIT=""
if [ "$HAVE_DS" = 1 ] && { want 1 || want 2; }; then  # DeepSpeed's fused-kernel op builds once, in the background
  ($PY -c "from deepspeed.ops.op_builder import InferenceBuilder; InferenceBuilder().load()" >"$OUT/ds-jit.log" 2>&1
   echo "jit rc=$?" >>"$OUT/ds-jit.log") &
  JIT=$!
fi
wait_jit() { [ -z "$JIT" ] && return; wait "$JIT"; JIT=""; echo "== DeepSpeed op build: $(tail -1 "$OUT/ds-jit.log")"; }

SRV_PID=""
start_server() {  # label port tp launcher(torchrun|ds|python) model backend [max batch] -> SRV_PID; 0 when ready
  local label=$1 port=$2 n=$3 how=$4 model=$5 backend=$6 maxb=${7:-$MAXB} log="$OUT/server-$1.log" t0=$(date +%s) cmd
  local serve=(serve --backend "$backend" --model "$model" --host 127.0.0.1 --port "$port" --max-batch-size "$maxb"
               --max-input-length 512 --max-new-tokens 512 --max-total-tokens 1024 --max-queued-requests 1024)
  [ "$DTYPE" = fp16 ] && serve+=(--dtype fp16)
  case $how in
    python) cmd=($PY -m bloom_server "${serve[@]}") ;;
    torchrun) cmd=("${TORCHRUN[@]}" --nproc_per_node "$n" --master_port "$(free_port)" -m bloom_server "${serve[@]}") ;;
    ds) cmd=("${DSRUN[@]}" --num_gpus "$n" --master_port "$(free_port)" --module bloom_server "${serve[@]}") ;;
  esac
  echo "== server $label: ${cmd[*]}"
  setsid "${cmd[@]}" >"$log" 2>&1 &
  SRV_PID=$!
  local limit=${GPU_TP_READY_S:-300}
  [ "$(left)" -lt "$limit" ] && limit=$(( $(left) > 10 ? $(left) : 10 ))
  while [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
    if curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; then
      echo "== server $label ready after $(( $(date +%s) - t0 )) s"; return 0
    fi
    kill -0 $SRV_PID 2>/dev/null || { echo "== server $label exited"; tail -20 "$log"; return 1; }
    sleep 0.5
  done
  echo "== server $label not ready after $limit s"; tail -20 "$log"; return 1
}
stop_server() {
  [ -n "$SRV_PID" ] || return 0
  kill -TERM -- -"$SRV_PID" 2>/dev/null
  for _ in $(seq 1 120); do kill -0 "$SRV_PID" 2>/dev/null || break; sleep 0.25; done
  kill -KILL -- -"$SRV_PID" 2>/dev/null
  SRV_PID=""
}
trap stop_server EXIT

ask() {  # port label: the prompts as one batch and one by one, greedy; answers to $OUT/answers-<label>.json
  $PY - "$1" "$OUT/answers-$2.json" "$NEW" <<'PY'
import json, sys, urllib.request
port, path, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
prompts = ["DeepSpeed is", "The capital of France is", "Hello", "A tensor-parallel BLOOM splits every layer over"]
def post(text):
    body = {"text": text, "max_new_tokens": new, "do_sample": False}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())
batch = post(prompts)
single = [post([p])["text"][0] for p in prompts]
out = {"prompts": prompts, "batch": batch["text"], "batch_tokens": batch.get("num_generated_tokens"), "single": single}
open(path, "w").write(json.dumps(out, indent=1))
print("answers:", json.dumps(out)[:400])
PY
}

serve_and_ask() {  # label tp how model backend
  local port rc=0 t0=$(date +%s)
  if [ "$(left)" -lt "$SERVER_MIN" ]; then record 1 "serve $1" 0 0 "skipped: $(left) s left"; return; fi
  port=$(free_port)
  if start_server "$1" "$port" "$2" "$3" "$4" "$5" 8; then ask "$port" "$1" || rc=$?; else rc=1; fi
  stop_server
  record 1 "serve $1" $rc $(( $(date +%s) - t0 ))
}

# ------------------------------------------------------------------------------------------------ 1. correctness
if want 1; then
  echo "== 1. correctness: $SHAPE, $CORR_LAYERS layers, $DTYPE, TP=1 vs TP=$TP over POST /generate"
  t0=$(date +%s)
  rm -rf "$MODEL" "$MODEL-tp$TP" "$MODEL-ds-tp$TP"
  dev=cpu; [ -z "$QUICK" ] && dev=cuda
  timeout "$(tmo 300)" $PY scripts/bench/make_random_bloom.py "$MODEL" --shape $SHAPE \
    --layers $CORR_LAYERS --dtype $DTYPE --init-std $INIT_STD --init-device $dev >"$OUT/make.log" 2>&1
  rc=$?; tail -1 "$OUT/make.log"
  timeout "$(tmo 300)" $PY -m bloom_server preshard --model "$MODEL" --tp "$TP" \
    --out "$MODEL-tp$TP" >"$OUT/preshard.log" 2>&1
  rc2=$?; tail -1 "$OUT/preshard.log"
  record 1 "checkpoints" $(( rc | rc2 )) $(( $(date +%s) - t0 ))
  # fast first: DeepSpeed's op keeps building in the background meanwhile.
  serve_and_ask fast-tp1 1 python "$MODEL" fast
  serve_and_ask fast-tp$TP "$TP" torchrun "$MODEL" fast
  serve_and_ask fast-tp$TP-preshard "$TP" torchrun "$MODEL-tp$TP" fast
  if [ "$HAVE_DS" = 1 ]; then
    wait_jit
    serve_and_ask ds-tp1 1 ds "$MODEL" ds_inference
    serve_and_ask ds-tp$TP "$TP" ds "$MODEL" ds_inference
    # DeepSpeed's own pre-sharded layout of the same checkpoint, every rank writing its share (gpu_check's writer).
    t0=$(date +%s)
    if [ "$(left)" -lt $(( SERVER_MIN * 2 )) ]; then
      record 1 "ds pre-sharded write" 0 0 "skipped: $(left) s left"
    else
      timeout $(( $(left) - SERVER_MIN )) $(launcher "$TP") scripts/bench/make_random_bloom.py "$MODEL" --presharded-only \
        --presharded-out "$MODEL-ds-tp$TP" --tp "$TP" --max-tokens 1024 >"$OUT/ds-preshard.log" 2>&1
      rc=$?; tail -2 "$OUT/ds-preshard.log"
      record 1 "ds pre-sharded write" $rc $(( $(date +%s) - t0 ))
      if [ -f "$MODEL-ds-tp$TP/ds_inference_config.json" ]; then
        serve_and_ask ds-tp$TP-preshard "$TP" ds "$MODEL-ds-tp$TP" ds_inference
      fi
    fi
  else
    echo "== ds_inference: skipped (deepspeed does not import here, or the CPU dry run)"
  fi
  $PY - "$OUT" "$TP" "$HAVE_DS" <<'PY'
import json, sys
from pathlib import Path
out, tp, have_ds = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
# (reference, served, must match): each TP=N answer against its own backend's TP=1 answer; the two engines against
# each other for information only (fp16 kernels of two engines may break a near tie differently).
pairs = [("fast-tp1", f"fast-tp{tp}", True), ("fast-tp1", f"fast-tp{tp}-preshard", True)]
if have_ds:
    pairs += [("ds-tp1", f"ds-tp{tp}", True), ("ds-tp1", f"ds-tp{tp}-preshard", True), ("fast-tp1", "ds-tp1", False)]
res = {}
for a, b, must in pairs:
    pa, pb = out / f"answers-{a}.json", out / f"answers-{b}.json"
    key = f"{b} vs {a}"
    if not (pa.is_file() and pb.is_file()):
        res[key] = {"ran": False, "must_match": must}
        continue
    x, y = json.loads(pa.read_text()), json.loads(pb.read_text())
    res[key] = {"ran": True, "must_match": must, "batch_equal": x["batch"] == y["batch"],
                "single_equal": x["single"] == y["single"], "batch_equals_single": y["batch"] == y["single"],
                "rows_equal": sum(p == q for p, q in zip(x["batch"], y["batch"])), "rows": len(x["batch"])}
(out / "correctness.json").write_text(json.dumps(res, indent=1))
for k, v in res.items():
    print(f"CORRECTNESS {k}: {json.dumps(v)}")
PY
fi

# ------------------------------------------------------------------------------------------------------ 2. speed
bench() {  # label layers backends
  local t0=$(date +%s) budget rc
  budget=$(( $(left) - 20 ))
  if [ "$budget" -lt "$BENCH_MIN" ]; then record 2 "bench $1" 0 0 "skipped: $(left) s left"; return; fi
  echo "== 2. bench $1: $(launcher "$TP") scripts/bench/benchmark.py --backend $3 --layers $2 --batch-size $BS"
  timeout $(( budget + 15 )) $(launcher "$TP") scripts/bench/benchmark.py --backend "$3" --random-weights $SHAPE --layers "$2" \
    --batch-size $BS --new-tokens $BENCH_NEW --cycles $CYCLES --deadline-s $(( budget * 3 / 4 )) \
    --json "$OUT/bench-$1.json" >"$OUT/bench-$1.log" 2>&1
  rc=$?
  grep -E "^# bloom-server bench|^decode:|^# .*(FAILED|skipped)|^\| " "$OUT/bench-$1.log" | grep -v "^\*\*\*"
  local note=""; grep -q "FAILED" "$OUT/bench-$1.log" && note="a backend or batch FAILED: see bench-$1.log"
  record 2 "bench $1" $rc $(( $(date +%s) - t0 )) "$note"
}
if want 2; then
  BACKENDS=hf,fast; [ "$HAVE_DS" = 1 ] && BACKENDS=hf,fast,ds_inference
  wait_jit
  if [ "$TP" -ge 8 ] && [ -z "$QUICK" ]; then
    bench fast-${BENCH_LAYERS}l $BENCH_LAYERS fast
    bench cmp-${CMP_LAYERS}l $CMP_LAYERS $BACKENDS
  else
    bench ${BENCH_LAYERS}l $BENCH_LAYERS $BACKENDS
  fi
fi

# ------------------------------------------------------------------------------------------------- 3. cold start
COLD_DIR=$CACHE/cold_start
COLD_MODEL=$COLD_DIR/bloom-$SHAPE-${COLD_LAYERS}l-$DTYPE
if want 3; then
  t0=$(date +%s); budget=$(( $(left) - 30 ))
  if [ "$budget" -lt "$COLD_MIN" ]; then
    record 3 "cold start" 0 0 "skipped: $(left) s left"
  else
    echo "== 3. cold start: $SHAPE, $COLD_LAYERS layers, --preshard $TP"
    timeout $(( budget + 20 )) $PY scripts/bench/cold_start.py --dir "$COLD_DIR" --shape $SHAPE --layers $COLD_LAYERS --dtype $DTYPE \
      --preshard "$TP" --no-no-prefetch-run --budget-s $(( budget * 2 / 3 )) --timeout $(( budget / 3 )) \
      --json "$OUT/cold_start.json" >"$OUT/cold_start.log" 2>&1
    rc=$?
    grep -E "wrote|pre-sharded|plain read|parallel read|ratio|FAILED|summary|skipping" "$OUT/cold_start.log"
    cp "$COLD_DIR"/server-*.log "$OUT/" 2>/dev/null
    record 3 "cold start" $rc $(( $(date +%s) - t0 ))
  fi
fi

# --------------------------------------------------------------------------------------------------- 4. the server
if want 4; then
  LT_MODEL=$COLD_MODEL-tp$TP
  [ -f "$LT_MODEL/preshard.json" ] || LT_MODEL=$MODEL-tp$TP
  t0=$(date +%s); rc=0
  if [ ! -f "$LT_MODEL/preshard.json" ]; then
    record 4 "load test" 1 0 "no pre-sharded checkpoint (run step 1 or 3 first)"
  elif [ "$(left)" -lt $(( LT_WARM + LT_DUR + LT_DRAIN + LT_START )) ]; then
    record 4 "load test" 0 0 "skipped: $(left) s left"
  else
    port=$(free_port)
    echo "== 4. load test: fast at TP=$TP on $LT_MODEL, concurrency $CONCS"
    if start_server load-tp$TP "$port" "$TP" torchrun "$LT_MODEL" fast; then
      curl -fsS "http://127.0.0.1:$port/info"; echo
      big=${CONCS##* }
      timeout $(( LT_WARM + LT_DRAIN + 60 )) $PY scripts/bench/load_test.py --url "http://127.0.0.1:$port" --stream \
        --concurrency "$big" --prompt-tokens $LT_PROMPT --new-tokens $LT_NEW --requests 100000 --duration $LT_WARM \
        --drain $LT_DRAIN --seed 1 --force-length off --label "warm-up" --json "$OUT/load-warmup.json" | tail -3
      for c in $CONCS; do
        if [ "$(left)" -lt $(( LT_DUR + LT_DRAIN + 20 )) ]; then echo "== concurrency $c: skipped, $(left) s left"; continue; fi
        timeout $(( LT_DUR + LT_DRAIN + 60 )) $PY scripts/bench/load_test.py --url "http://127.0.0.1:$port" --stream \
          --concurrency "$c" --prompt-tokens $LT_PROMPT --new-tokens $LT_NEW --requests 100000 --duration $LT_DUR \
          --drain $LT_DRAIN --seed 0 --force-length off --label "tp$TP c$c" --json "$OUT/load-c$c.json" | tail -8
        r=$?; echo "== load_test concurrency $c rc=$r"; rc=$(( rc | r ))
      done
    else
      rc=1
    fi
    stop_server
    record 4 "load test" $rc $(( $(date +%s) - t0 ))
  fi
fi

# ----------------------------------------------------------------------------------------------------- summary
$PY - "$OUT" "$TP" "$(( $(date +%s) - START ))" <<'PY'
import json, sys
from pathlib import Path
out, tp, wall = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
steps = [json.loads(l) for l in (out / "steps.jsonl").read_text().splitlines() if l.strip()]
corr = json.loads((out / "correctness.json").read_text()) if (out / "correctness.json").is_file() else {}
bench = {p.stem: json.loads(p.read_text()).get("rows", []) for p in sorted(out.glob("bench-*.json"))}
cold = json.loads((out / "cold_start.json").read_text()) if (out / "cold_start.json").is_file() else {}
load = {p.stem: json.loads(p.read_text()).get("summary", {}) for p in sorted(out.glob("load-c*.json"))}
summary = {"tp": tp, "wall_s": wall, "steps": steps, "correctness": corr, "bench": bench,
           "cold_start": [{k: r.get(k) for k in ("label", "ready_s", "plain_read_s", "ratio", "bytes", "error")}
                          for r in cold.get("runs", [])],
           "load": {k: {x: v.get(x) for x in ("requests", "ok", "errors", "tokens_per_s", "ttft_ms", "tpot_ms")}
                    for k, v in load.items()}}
(out / "gpu_tp.json").write_text(json.dumps(summary, indent=1, default=str))
for name, rows in bench.items():
    for r in rows:
        print(f"BENCH {name} {r['backend']} bs={r['batch_size']}: {r['ms_step']:.2f} ms/step, {r['ms_token']:.3f} "
              f"ms/token, {100 * r['floor_fraction']:.0f}% of floor {r.get('tokens_equal_hf') or ''}")
for r in summary["cold_start"]:
    print("COLD", json.dumps(r))
for k, v in summary["load"].items():
    print("LOAD", k, json.dumps(v))
bad = [s for s in steps if s["rc"] != 0]
print(f"STEPS: {len(steps)} reported, {len(bad)} with rc != 0: {[s['name'] for s in bad]}")
PY
echo "== done in $(( $(date +%s) - START )) s"
