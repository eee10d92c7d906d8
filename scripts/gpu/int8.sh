#!/usr/bin/env bash
# The fast engine's weight-only int8 against its fp16 on one GPU, in one device call: decode ms/step of the 7b1 shape
# at bs 1, 8, 32, 64, 128 for fp16 and int8 (random weights, the same run), the share of the int8 memory floor at bs 1,
# the resident weight bytes of each, then the quantization error (relative logit error, forced-decoding argmax
# agreement, int8 head and fp16 head) on the 7b1 shape and on the 176B layer shape (2 layers). About 5 minutes on an
# H100 after the machine starts. Run from the repo root on the lent machine:
#
#     OUT=$OUT bash scripts/gpu/int8.sh            # logs, JSON and the summary go to $OUT (default /tmp/int8-gpu-out)
#     INT8_QUICK=1 bash scripts/gpu/int8.sh        # the same plumbing on a tiny shape (a CPU dry run)
#
# Every step runs even if an earlier one failed; a step that would start past the budget is skipped, not cut.
# Files in $OUT (at most 6): int8.log, fp16.json, int8.json, check-7b1.json, check-176b.json, summary.md.
set -u -o pipefail
OUT=${OUT:-/tmp/int8-gpu-out}
BUDGET_S=${INT8_BUDGET_S:-300}   # wall seconds for everything after the installs
CYCLES=${INT8_CYCLES:-3}
NEW=${INT8_NEW_TOKENS:-64}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/int8.log") 2>&1

source scripts/gpu/_device_env.sh int8.sh
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, flush=True)"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ -n "${INT8_QUICK:-}" ]; then
  SHAPE7=(--random-weights tiny); BS="1,2"; CHECK7=(--shape tiny); CHECK176=(--shape tiny --layers 1)
else
  SHAPE7=(--random-weights 7b1); BS="1,8,32,64,128"; CHECK7=(--shape 7b1); CHECK176=(--shape 176b --layers 2)
fi

for dt in fp16 int8; do
  echo "== 1.$dt 7b1 shape, fast --dtype $dt at bs $BS ($NEW new tokens, $CYCLES cycles)"
  if [ "$(left)" -gt 100 ]; then
    timeout $(( $(left) / 2 )) python3 scripts/bench/benchmark.py --backend fast --dtype "$dt" "${SHAPE7[@]}" \
      --batch-size "$BS" --new-tokens "$NEW" --cycles "$CYCLES" --deadline-s $(( $(left) / 2 - 30 )) \
      --json "$OUT/$dt.json"
    echo "step 1.$dt rc=$?"
  else
    echo "step 1.$dt: SKIPPED ($(left) s left)"
  fi
done

echo "== 2. quantization error, 7b1 shape (int8 vs fp16 engine, forced decoding)"
if [ "$(left)" -gt 40 ]; then
  timeout $(( $(left) - 30 )) python3 scripts/bench/int8_check.py "${CHECK7[@]}" --json "$OUT/check-7b1.json"
  echo "step 2 rc=$?"
else
  echo "step 2: SKIPPED ($(left) s left)"
fi
echo "== 3. quantization error, 176B layer shape (2 layers)"
if [ "$(left)" -gt 25 ]; then
  timeout $(( $(left) - 5 )) python3 scripts/bench/int8_check.py "${CHECK176[@]}" --json "$OUT/check-176b.json"
  echo "step 3 rc=$?"
else
  echo "step 3: SKIPPED ($(left) s left)"
fi

python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
rows = {dt: {r["batch_size"]: r for r in (load(f"{dt}.json") or {}).get("rows", [])} for dt in ("fp16", "int8")}
print("| bs | fp16 ms/step | int8 ms/step | int8/fp16 | int8 % of its floor |")
print("|---|---|---|---|---|")
cells = []
for bs in sorted(set(rows["fp16"]) | set(rows["int8"])):
    a, b = rows["fp16"].get(bs), rows["int8"].get(bs)
    ratio = f"{b['ms_step'] / a['ms_step']:.3f}" if a and b else "-"
    print(f"| {bs} | {a['ms_step'] if a else float('nan'):.2f} | {b['ms_step'] if b else float('nan'):.2f} | {ratio} | "
          f"{100 * b['floor_fraction'] if b else float('nan'):.0f}% |")
    cells.append(f"bs{bs} {ratio}x")
wb = {dt: next(iter(rows[dt].values()), {}).get("weight_bytes") for dt in rows}
bytes_ratio = f"{wb['int8'] / wb['fp16']:.3f}" if wb["fp16"] and wb["int8"] else "-"
print(f"\nresident weights: fp16 {wb['fp16']} B, int8 {wb['int8']} B ({bytes_ratio}x)")
errs = []
for name in ("check-7b1.json", "check-176b.json"):
    c = load(name)
    if c:
        for v in ("int8", "int8_fp16_head"):
            r = c[v]
            print(f"{c['shape']} ({c['layers']} layers) {v}: argmax agreement {100 * r['argmax_agreement']:.1f}%, "
                  f"relative logit error mean {r['rel_logit_error_mean']:.4f} max {r['rel_logit_error_max']:.4f}, "
                  f"{r['bytes_vs_ref']:.3f}x the fp16 bytes")
        errs.append(f"{c['shape']} agree {100 * c['int8']['argmax_agreement']:.1f}% err {c['int8']['rel_logit_error_mean']:.4f}")
floor1 = rows["int8"].get(1, {}).get("floor_fraction")
print("\nSUMMARY int8 vs fp16 ms/step: " + ", ".join(cells) + f"; int8 bs1 {100 * floor1:.0f}% of its floor"
      if floor1 else "\nSUMMARY int8 vs fp16 ms/step: " + ", ".join(cells), end="")
print(f"; weights {bytes_ratio}x; " + "; ".join(errs))
PY
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null || true
echo "== done in $(( $(date +%s) - START ))s after the installs; files in $OUT"
