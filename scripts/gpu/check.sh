#!/usr/bin/env bash
# The DeepSpeed backends on one GPU, against the hf backend on the same random weights. Run from the repo root on
# the lent GPU machine, with the wheels of .whl/ carried (see docs/gpu-checks.md):
#     bash scripts/gpu/check.sh            # logs and the table go to $OUT (default /tmp/gpu-check-out)
# Every step runs even if an earlier one failed; the table at the end says what passed.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-check-out}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}   # wall seconds for everything; later checks are skipped, not cut, past it
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1

echo "== $(date -u +%FT%TZ) on $(hostname)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/src TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvcc --version | tail -1

# The fused-kernel op builds on the CPUs (80 s on 16 cores) while the checks that do not need it use the GPU.
echo "== JIT build of DeepSpeed's transformer_inference op, in the background"
( t=$(date +%s); MAX_JOBS=12 python3 -c "from deepspeed.ops.op_builder import InferenceBuilder; InferenceBuilder().load()" \
    > "$OUT/jit.log" 2>&1; echo "jit rc=$? in $(( $(date +%s) - t ))s" >> "$OUT/jit.log" ) &
JIT=$!

echo "== checks without the op: hf (reference), ds_autotp, ds_zero"
LAYERS=${GPU_CHECK_LAYERS:-8}
GPU_CHECK_DEADLINE=$(( START + ${GPU_CHECK_PHASE1_S:-125} )) python3 scripts/gpu/check.py all --work /tmp/gpu-check \
  --out "$OUT" --layers "$LAYERS" --cases hf,ds_autotp,ds_zero
wait "$JIT"; tail -2 "$OUT/jit.log"

echo "== checks with the op: pre-sharded fp16 written and read back, then int8"
GPU_CHECK_DEADLINE=$(( START + BUDGET_S - 5 )) python3 scripts/gpu/check.py all --work /tmp/gpu-check \
  --out "$OUT" --layers "$LAYERS" --cases ${GPU_CHECK_CASES2:-ds_write_fp16,ds_presharded_fp16,ds_write_int8,ds_presharded_int8}
python3 scripts/gpu/check.py table --work /tmp/gpu-check --out "$OUT"

echo "== the server under the deepspeed launcher, ds_inference on the pre-sharded checkpoint"
MODEL=/tmp/gpu-check/models/pre16
if [ -f "$MODEL/ds_inference_config.json" ] && [ $(( $(date +%s) - START )) -lt $(( BUDGET_S - 60 )) ]; then
  timeout 150 /tmp/site/bin/deepspeed --num_gpus 1 --master_port 29533 --module bloom_server serve \
    --backend ds_inference --model "$MODEL" --host 127.0.0.1 --port 18080 > "$OUT/server.log" 2>&1 &
  SERVER=$!
  python3 - <<'PY'
import json, time, urllib.request, urllib.error
base = "http://127.0.0.1:18080"
t0 = time.time()
while time.time() - t0 < 120:
    try:
        with urllib.request.urlopen(base + "/ready", timeout=2) as r:
            if r.status == 200:
                break
    except (urllib.error.URLError, OSError):
        pass
    time.sleep(1)
else:
    print("server: not ready after 120 s (see server.log)")
    raise SystemExit(0)
print(f"server: ready after {time.time() - t0:.0f}s")
body = json.dumps({"text": ["DeepSpeed is", "Hello"], "max_new_tokens": 20, "min_length": 0}).encode()
req = urllib.request.Request(base + "/generate/", data=body, headers={"Content-Type": "application/json"})
try:
    with urllib.request.urlopen(req, timeout=60) as r:
        print("server: POST /generate/ ->", r.status, r.read().decode()[:600])
except urllib.error.HTTPError as e:
    print("server: POST /generate/ ->", e.code, e.read().decode()[:600])
PY
  kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
  tail -5 "$OUT/server.log"
else
  echo "server: SKIPPED (no pre-sharded checkpoint, or out of time)"
fi
echo "== GPU-marked tests"
if [ $(( $(date +%s) - START )) -lt $(( BUDGET_S - 45 )) ]; then
  timeout $(( BUDGET_S - ($(date +%s) - START) )) python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_ds_backends.py > "$OUT/pytest.log" 2>&1
  echo "pytest -m gpu rc=$?"; tail -4 "$OUT/pytest.log"
else
  echo "pytest -m gpu: SKIPPED (out of time)"
fi
echo "== done in $(( $(date +%s) - START ))s"
