#!/usr/bin/env bash
# One device run for the remaining GPU questions of issue 2: the int8 probe, and the server under the deepspeed
# launcher with ds_inference on an HF checkpoint answering the same greedy text as the hf backend over HTTP.
#   bash scripts/gpu_issue2.sh     (carry .whl; logs to $OUT)
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-issue2}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
  PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false MAX_JOBS=14
(python3 -c "from deepspeed.ops.op_builder import InferenceBuilder; InferenceBuilder().load()" > "$OUT/jit.log" 2>&1; echo "jit rc=$?" >> "$OUT/jit.log") &
JIT=$!
python3 scripts/make_random_bloom.py /tmp/m560 --shape 560m --layers 8 --dtype fp16 --init-device cuda > "$OUT/make.log" 2>&1
echo "model rc=$? after $(( $(date +%s) - START ))s"
wait $JIT; tail -1 "$OUT/jit.log"
echo "== int8 probe"
timeout 200 python3 scripts/gpu_int8_probe.py /tmp/m560 2>&1 | grep -E "INT8_PROBE|Error" | tail -3
echo "== servers: hf (python -m) on 18081, ds_inference under the deepspeed launcher on 18082, same weights"
python3 -m bloom_server serve --backend hf --dtype fp16 --model /tmp/m560 --host 127.0.0.1 --port 18081 > "$OUT/hf.log" 2>&1 &
HF=$!
T0=$(date +%s)
/tmp/site/bin/deepspeed --num_gpus 1 --master_port 29544 --module bloom_server serve --backend ds_inference \
  --dtype fp16 --model /tmp/m560 --host 127.0.0.1 --port 18082 > "$OUT/ds.log" 2>&1 &
DS=$!
python3 - <<'PY'
import json, time, urllib.request
def call(port, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.status, json.loads(r.read())
t0 = time.time()
for port in (18081, 18082):
    while time.time() - t0 < 180:
        try:
            if call(port, "/ready")[0] == 200:
                print(f"port {port}: ready after {time.time() - t0:.0f}s"); break
        except Exception:
            time.sleep(1)
prompts = ["DeepSpeed is", "The capital of France", "Hello"]
body = {"text": prompts, "max_new_tokens": 40, "min_length": 1000}
a, b = call(18081, "/generate/", body)[1], call(18082, "/generate/", body)[1]
print("hf  :", json.dumps(a)[:300]); print("ds  :", json.dumps(b)[:300])
print("SERVER_SAME_TEXT", a["text"] == b["text"], a["num_generated_tokens"], b["num_generated_tokens"])
cw = call(18082, "/generate/", {"text": ["Deepspeed is"], "repetition_penalty": 10.0, "top_k": 10, "do_sample": True})
print("coreweave body on ds_inference:", cw[0], cw[1]["num_generated_tokens"])
PY
kill $HF $DS 2>/dev/null; pkill -f "bloom_server serve" 2>/dev/null; sleep 2
# (no bare `wait`: it would also wait for the tee of the log, which never ends)
tail -3 "$OUT/ds.log"
echo "== done in $(( $(date +%s) - START ))s"
