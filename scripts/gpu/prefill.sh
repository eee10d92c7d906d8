#!/usr/bin/env bash
# Chunked prefill and the prefix cache against today's behaviour, in one device call on one GPU (about 400 s): random
# BLOOM-7b1 weights served by `serve --backend fast` (continuous batching) twice, one server at a time, first with
# both off (`--prefill-step-tokens 0 --prefix-cache-mb 0`), then with PREFILL_ON's settings; each server gets, from
# scripts/bench/load_test.py:
#   bs1       one streamed request at a time (16 prompt tokens, 256 new): the time per output token at batch size 1
#   standard  concurrency 64, streamed, prompts 16-256 tokens, outputs 16-512: TTFT p50/p99, generated tokens/s
#   joiner    63 live rows decoding, then a 1,500-token prompt joins: the live rows' largest gap between two tokens
#             while it goes in, against their median gap
#   shared    64 clients, prompts of one shared 1,000-token prefix and a 32-token tail of their own: TTFT p50, tokens/s
# after the idle server's decode graph captures (polled in /metrics) and a short warm-up load.
# Then, with the time left, the engine's bs-1 decode ms/step and its fraction of the memory floor
# (scripts/bench/benchmark.py; the settings do not reach the static path it times: a check that nothing else moved).
# Run from the repo root on the lent machine with the project's wheels carried (.whl/):
#
#     OUT=$OUT bash scripts/gpu/prefill.sh
#     PREFILL_ON="--prefill-step-tokens 384 --prefix-cache-mb 4096" OUT=$OUT bash scripts/gpu/prefill.sh
#     PREFILL_QUICK=1 bash scripts/gpu/prefill.sh      # the same plumbing on the tiny shape (a CPU dry run)
#
# The table gives TTFT for the whole run and, apart, for the first wave (the `concurrency` requests sent at once at the
# start: a burst bounded by prefill throughput) and for the requests after it (steady state), and each load's steps to
# a first token (the server's time_to_first_token_steps histogram: steps waited for a slot, steps from admission).
# $OUT gets run.log, summary.md (the table printed at the end) and raw.tgz (server logs, every load's log and JSON).
# A step that would start past the budget is skipped, not cut. Exit 0 when every load that ran answered every request.
set -u -o pipefail
OUT=${OUT:-/tmp/prefill-out}
RAW="$OUT/raw"
mkdir -p "$RAW"
exec > >(tee -a "$OUT/run.log") 2>&1
trap '[ -d "$RAW" ] && tar czf "$OUT/raw.tgz" -C "$OUT" raw' EXIT
# shellcheck source=scripts/gpu/_device_env.sh
source scripts/gpu/_device_env.sh prefill.sh
PY=${PYTHON:-python3}
START=$(date +%s)
BUDGET_S=${PREFILL_BUDGET_S:-400}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
PORT=${PREFILL_PORT:-18300}
ON_FLAGS=${PREFILL_ON:---prefill-step-tokens 512 --prefix-cache-mb 4096}

if [ -n "${PREFILL_QUICK:-}" ]; then
  SHAPE=tiny; DTYPE=fp32; INIT=cpu; CONC=4; LIVE=3; JOIN=150; PREFIX=80; TAIL=6; NEW=8-24; PROMPT=4-24
  LIVE_PROMPT=4-8; LIVE_NEW=64; BS1_NEW=32; DUR=6; SHARED_DUR=6; WARM=2; DRAIN=10
  SERVE=(--max-batch-size 8 --max-input-length 192 --max-new-tokens 64 --max-total-tokens 256 --max-queued-requests 64)
  [ -n "${PREFILL_ON:-}" ] || ON_FLAGS="--prefill-step-tokens 24 --prefix-cache-mb 4"
else
  SHAPE=7b1; DTYPE=fp16; INIT=cuda; CONC=64; LIVE=63; JOIN=1500; PREFIX=1000; TAIL=32; NEW=16-512; PROMPT=16-256
  LIVE_PROMPT=16-64; LIVE_NEW=512; BS1_NEW=256; DUR=${PREFILL_DURATION_S:-40}; SHARED_DUR=${PREFILL_SHARED_S:-25}
  WARM=${PREFILL_WARM_S:-8}; DRAIN=${PREFILL_DRAIN_S:-12}
  # KV cache: 64 slots x 1,600 positions (50 GB of fp16 7b1 K/V) beside 14 GB of weights and the 4 GB prefix cache.
  SERVE=(--max-batch-size 64 --max-input-length 1536 --max-new-tokens 512 --max-total-tokens 1600
         --max-queued-requests 1024)
fi
MODEL=${PREFILL_MODEL:-/tmp/prefill/bloom-$SHAPE-$DTYPE}
OFF_FLAGS="--prefill-step-tokens 0 --prefix-cache-mb 0"
echo "== settings: off = $OFF_FLAGS; on = $ON_FLAGS; budget ${BUDGET_S}s"

if [ ! -f "$MODEL/config.json" ]; then
  t=$(date +%s)
  $PY scripts/bench/make_random_bloom.py "$MODEL" --shape $SHAPE --dtype $DTYPE --init-device $INIT \
    > "$RAW/make.log" 2>&1 || { echo "make_random_bloom failed"; tail -5 "$RAW/make.log"; exit 1; }
  echo "== random $SHAPE weights: $(du -sh "$MODEL" | cut -f1) in $(( $(date +%s) - t ))s"
fi

steps() {  # the server's time-to-first-token histograms, in steps and in seconds (cumulative; a load's: after - before)
  curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null | grep -E '^bloom_server_time_to_first_token_(steps|seconds)' > "$1"
}

load() {  # name config timeout load_test-flags...
  local name=$1 cfg=$2 limit=$3; shift 3
  steps "$RAW/steps-$name-$cfg-before.txt"
  timeout "$limit" $PY scripts/bench/load_test.py --url "http://127.0.0.1:$PORT" --label "$cfg" \
    --json "$RAW/$name-$cfg.json" "$@" > "$RAW/$name-$cfg.log" 2>&1
  local rc=$?
  steps "$RAW/steps-$name-$cfg-after.txt"
  echo "   $name ($cfg): rc=$rc; $(grep -E '^load_test: ([0-9]+ requests|long joiner)' "$RAW/$name-$cfg.log" | cut -c1-230 | tr '\n' ' ')"
  [ $rc -eq 0 ] || FAILED=1
}

graphs_settle() {  # the idle server captures its decode graphs (fast/engine.py capture_next): wait until it is done
  local n=-1 m same=0 t=$(date +%s)
  while [ $(( $(date +%s) - t )) -lt 30 ] && [ $same -lt 3 ]; do
    m=$(curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null | awk '/^bloom_server_decode_graphs /{print int($2)}')
    if [ "${m:-0}" = "$n" ]; then same=$(( same + 1 )); else same=0; n=${m:-0}; fi
    sleep 0.5
  done
  echo "   decode graphs held: $n, $(( $(date +%s) - t ))s after ready"
}

FAILED=0
serve_and_measure() {  # config serve-flags...
  local cfg=$1 log="$RAW/server-$1.log" pid need; shift
  need=$(( WARM + DUR + SHARED_DUR + 4 * DRAIN + 60 ))  # + start-up, graph settling and the joiner
  if [ "$(left)" -lt "$need" ]; then echo "== $cfg: SKIPPED ($(left) s left, $need needed)"; FAILED=1; return; fi
  echo "== $cfg: serve $*"
  local t=$(date +%s)
  setsid $PY -m bloom_server serve --model "$MODEL" --backend fast --batching continuous --dtype $DTYPE \
    --host 127.0.0.1 --port $PORT "${SERVE[@]}" "$@" > "$log" 2>&1 &
  pid=$!
  until curl -fsS "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1; do
    if ! kill -0 $pid 2>/dev/null || [ $(( $(date +%s) - t )) -gt 240 ]; then
      echo "   not ready (exited or 240 s); its log ends:"; tail -5 "$log"; FAILED=1; kill -KILL -- -$pid 2>/dev/null; return
    fi
    sleep 0.5
  done
  echo "   ready after $(( $(date +%s) - t ))s"
  graphs_settle
  load warmup "$cfg" $(( WARM + DRAIN + 60 )) --workload standard --concurrency $CONC --prompt-tokens $PROMPT \
    --new-tokens $NEW --requests 100000 --duration $WARM --drain $DRAIN --seed 1
  load bs1 "$cfg" 120 --stream --concurrency 1 --prompt-tokens 16 --new-tokens $BS1_NEW --requests 3 --seed 2
  load standard "$cfg" $(( DUR + DRAIN + 60 )) --workload standard --concurrency $CONC --prompt-tokens $PROMPT \
    --new-tokens $NEW --requests 100000 --duration $DUR --drain $DRAIN --seed 0
  load joiner "$cfg" $(( 2 * DRAIN + 90 )) --workload long-joiner --live-rows $LIVE --joiner-tokens $JOIN \
    --prompt-tokens $LIVE_PROMPT --new-tokens $LIVE_NEW --duration 60 --drain $DRAIN --seed 3
  load shared "$cfg" $(( SHARED_DUR + DRAIN + 60 )) --workload shared-prefix --stream --concurrency $CONC \
    --prefix-tokens $PREFIX --tail-tokens $TAIL --new-tokens $NEW --requests 100000 --duration $SHARED_DUR \
    --drain $DRAIN --seed 4
  curl -fsS "http://127.0.0.1:$PORT/metrics" 2>/dev/null | grep -E '^bloom_server_(prefix_cache|decode_)' > "$RAW/metrics-$cfg.txt"
  sed 's/^/   /' "$RAW/metrics-$cfg.txt"
  kill -TERM -- -$pid 2>/dev/null
  for _ in $(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- -$pid 2>/dev/null
  echo "   $cfg done after $(( $(date +%s) - t ))s"
}

# shellcheck disable=SC2086
serve_and_measure off $OFF_FLAGS
# shellcheck disable=SC2086
serve_and_measure on $ON_FLAGS

if [ -z "${PREFILL_QUICK:-}" ] && [ "$(left)" -gt 70 ]; then
  echo "== engine bs 1: decode ms/step and the memory floor (static path)"
  timeout $(( $(left) - 10 )) $PY scripts/bench/benchmark.py --backend fast --random-weights 7b1 --batch-size 1 \
    --new-tokens 100 --cycles 2 --json "$RAW/bench-bs1.json" > "$RAW/bench-bs1.log" 2>&1
  echo "   rc=$?; $(grep -E 'floor' "$RAW/bench-bs1.log" | tail -1)"
else
  echo "== engine bs 1: skipped ($(left) s left)"
fi

echo "== summary ($(( $(date +%s) - START ))s)"
$PY - "$RAW" "$ON_FLAGS" > "$OUT/summary.md" <<'PY'
import json, sys
from pathlib import Path
raw, on_flags = Path(sys.argv[1]), sys.argv[2]

def summary(name, cfg):
    try:
        return json.loads((raw / f"{name}-{cfg}.json").read_text())["summary"]
    except (OSError, ValueError, KeyError):
        return None

def get(s, *path):
    for k in path:
        s = s.get(k) if isinstance(s, dict) else None
    return s

def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

def wave(name, cfg, part, q):
    """TTFT (ms) of the first wave (the `concurrency` requests sent first, at once) or of the requests after it."""
    try:
        d = json.loads((raw / f"{name}-{cfg}.json").read_text())
    except (OSError, ValueError):
        return None
    conc = int(d["argv"][d["argv"].index("--concurrency") + 1])
    reqs = sorted((r for r in d.get("requests", []) if r.get("status") == 200 and r.get("ttft") is not None),
                  key=lambda r: r["sent"])
    part = reqs[:conc] if part == "first" else reqs[conc:]
    return pct([1e3 * r["ttft"] for r in part], q)

def delta(name, cfg, keep):
    """The server's histogram series (lines for which keep(line)) after the load minus before it; None: no snapshot."""
    snap = {}
    for when in ("before", "after"):
        try:
            lines = (raw / f"steps-{name}-{cfg}-{when}.txt").read_text().splitlines()
        except OSError:
            return None
        snap[when] = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if keep(ln)}
    return {k: v - snap["before"].get(k, 0.0) for k, v in snap["after"].items()}

def steps(name, cfg, phase, q):
    """Steps to a first token of the load's requests: the mean (q None) or the bucket bound at quantile q."""
    d = delta(name, cfg, lambda ln: f'phase="{phase}"' in ln)
    count = next((v for k, v in d.items() if "_count" in k), 0) if d else 0
    if not count:
        return None
    if q is None:
        return next(v for k, v in d.items() if "_sum" in k) / count
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in d.items() if "_bucket" in k)
    return next(le for le, v in buckets if v >= q * count)

def server_ttft(name, cfg):
    """Mean TTFT (ms) the server saw for the load's requests: against the client's, the time between the engine's
    first token and the client's first event."""
    d = delta(name, cfg, lambda ln: ln.startswith("bloom_server_time_to_first_token_seconds_"))
    count = next((v for k, v in d.items() if k.endswith("_count")), 0) if d else 0
    return 1e3 * next(v for k, v in d.items() if k.endswith("_sum")) / count if count else None

def value(name, cfg, path):
    if path[0] == "server_ttft":
        return server_ttft(name, cfg)
    if path[0] == "wave":
        return wave(name, cfg, *path[1:])
    if path[0] == "steps":
        return steps(name, cfg, *path[1:])
    return get(summary(name, cfg), *path)

rows = [  # workload, metric, key path, target (on vs off)
    ("bs1", "time per output token, ms (p50)", ("tpot_ms", "p50"), "on/off ~1.00"),
    ("standard", "TTFT p50, ms", ("ttft_ms", "p50"), ""),
    ("standard", "TTFT p99, ms", ("ttft_ms", "p99"), "on <= 200 ms"),
    ("standard", "TTFT p99 after the first wave, ms", ("wave", "after", 0.99), ""),
    ("standard", "TTFT of the first wave's last, ms", ("wave", "first", 1.0), ""),
    ("standard", "TTFT mean at the client, ms", ("ttft_ms", "mean"), ""),
    ("standard", "TTFT mean at the server, ms", ("server_ttft",), ""),
    ("standard", "time between tokens p50, ms", ("itl_ms", "p50"), ""),
    ("standard", "time between tokens p90, ms", ("itl_ms", "p90"), ""),
    ("standard", "steps waited for a slot, mean", ("steps", "wait", None), ""),
    ("standard", "steps admission to first token, p99", ("steps", "prefill", 0.99), ""),
    ("standard", "generated tokens/s", ("tokens_per_s",), "on/off >= 0.95"),
    ("joiner", "live rows' largest gap during the join, ms", ("long_joiner", "largest_gap_in_window_ms"), ""),
    ("joiner", "live rows' median gap, ms", ("long_joiner", "median_gap_ms"), ""),
    ("joiner", "largest / median", ("long_joiner", "ratio"), "on <= 2"),
    ("joiner", "joiner TTFT, ms", ("long_joiner", "joiner_ttft_ms"), ""),
    ("shared", "TTFT p50, ms", ("ttft_ms", "p50"), "on/off <= 0.30"),
    ("shared", "TTFT p50 after the first wave, ms", ("wave", "after", 0.5), ""),
    ("shared", "TTFT of the first wave's last, ms", ("wave", "first", 1.0), ""),
    ("shared", "steps admission to first token, p50", ("steps", "prefill", 0.5), "on: 1"),
    ("shared", "TTFT mean at the client, ms", ("ttft_ms", "mean"), ""),
    ("shared", "TTFT mean at the server, ms", ("server_ttft",), ""),
    ("shared", "generated tokens/s", ("tokens_per_s",), "on/off >= 1.00"),
]
print(f"on = `{on_flags}`; off = no chunking, no prefix cache\n")
print("| workload | metric | off | on | on/off | target |")
print("|---|---|---|---|---|---|")
for name, label, path, target in rows:
    a, b = value(name, "off", path), value(name, "on", path)
    both = isinstance(a, (int, float)) and isinstance(b, (int, float))
    ratio = (f"{b / a:.2f}" if a else "-") if both else "n/a"
    fmt = lambda v: f"{v:,.1f}" if isinstance(v, (int, float)) else "n/a"  # noqa: E731
    print(f"| {name} | {label} | {fmt(a)} | {fmt(b)} | {ratio} | {target} |")
for cfg in ("off", "on"):
    s = [summary(n, cfg) for n in ("bs1", "standard", "joiner", "shared")]
    print(f"\n{cfg}: requests ok / errors: " + ", ".join(
        f"{n} {x['ok']} / {x['errors']}" if x else f"{n} none" for n, x in zip(("bs1", "standard", "joiner", "shared"), s)))
try:
    bench = json.loads((raw / "bench-bs1.json").read_text())
    for r in bench.get("rows", []):
        print(f"engine bs {r.get('batch_size')}: {r.get('ms_step', 0):.2f} ms/step, {100 * r.get('floor_fraction', 0):.0f}% "
              f"of the {r.get('floor_kind')} floor")
except (OSError, ValueError):
    pass
PY
cat "$OUT/summary.md"
tar czf "$OUT/raw.tgz" -C "$OUT" raw && rm -rf "$RAW"
trap - EXIT
exit $FAILED
