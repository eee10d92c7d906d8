#!/usr/bin/env bash
# The fast engine's weight-only int8 against its fp16 on one GPU, in one device call: decode ms/step of the 7b1 shape
# for fp16 and for int8 with each int8 kernel forced (`bench --int8-kernel gemv`, then `gemm`: the row count where
# the GEMM takes over, fast/triton_kernels.py GEMM_MIN_ROWS, is set from these), the same run; the kernels alone per
# row count (scripts/bench/int8_gemm.py: both int8 kernels against cuBLAS, their errors, where the GEMM leads); then,
# with the time left, the quantization error (relative logit error, forced-decoding argmax agreement, int8 head and
# fp16 head) on the 7b1 shape and on the 176B layer shape (2 layers). About 7 minutes on an H100 after the machine
# starts. Run from the repo root on the lent machine:
#
#     OUT=$OUT bash scripts/gpu/int8.sh            # logs, JSON and the summary go to $OUT (default /tmp/int8-gpu-out)
#     INT8_QUICK=1 bash scripts/gpu/int8.sh        # the same plumbing on a tiny shape (a CPU dry run)
#
# Every step runs even if an earlier one failed; a step that would start past the budget is skipped, not cut.
# Files in $OUT (at most 8): int8.log, fp16.json, int8-gemv.json, int8-gemm.json, kernels.json, check-7b1.json,
# check-176b.json, summary.md.
set -u -o pipefail
OUT=${OUT:-/tmp/int8-gpu-out}
BUDGET_S=${INT8_BUDGET_S:-420}   # wall seconds for everything after the installs
CYCLES=${INT8_CYCLES:-3}
NEW=${INT8_NEW_TOKENS:-48}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/int8.log") 2>&1

source scripts/gpu/_device_env.sh int8.sh
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, flush=True)"
START=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

if [ -n "${INT8_QUICK:-}" ]; then
  SHAPE7=(--random-weights tiny); BS="1,2"; BS_GEMM="2"; KSHAPE=tiny; KROWS="1,17"
  KENV=(TRITON_INTERPRET=1)  # the kernels step on the CPU: Triton's interpreter
  CHECK7=(--shape tiny); CHECK176=(--shape tiny --layers 1)
else
  SHAPE7=(--random-weights 7b1); BS="1,8,16,32,64,128"; BS_GEMM="8,16,32,64,128"; KSHAPE=7b1; KROWS="1,8,16,24,32,48,64,128,256"
  CHECK7=(--shape 7b1); CHECK176=(--shape 176b --layers 2); KENV=()
fi

# name, then its bench flags; each run gets a share of what is left (the later ones skip their largest batches at
# the deadline rather than the whole run)
run_bench() {
  local name=$1 share=$2; shift 2
  echo "== 1.$name 7b1 shape, fast $* ($NEW new tokens, $CYCLES cycles)"
  if [ "$(left)" -gt 90 ]; then
    timeout $(( $(left) / share )) python3 scripts/bench/benchmark.py --backend fast "${SHAPE7[@]}" "$@" \
      --new-tokens "$NEW" --cycles "$CYCLES" --deadline-s $(( $(left) / share - 25 )) --json "$OUT/$name.json"
    echo "step 1.$name rc=$?"
  else
    echo "step 1.$name: SKIPPED ($(left) s left)"
  fi
}
run_bench fp16 5 --dtype fp16 --batch-size "$BS"
run_bench int8-gemv 4 --dtype int8 --int8-kernel gemv --batch-size "$BS"
run_bench int8-gemm 3 --dtype int8 --int8-kernel gemm --batch-size "$BS_GEMM"

step() {  # N, seconds that must be left, its timeout, the command: run it, or say it was skipped
  local n=$1 need=$2 limit=$3; shift 3
  if [ "$(left)" -gt "$need" ]; then timeout "$limit" "$@"; echo "step $n rc=$?"; else echo "step $n: SKIPPED ($(left) s left)"; fi
}
echo "== 2. the int8 kernels alone per row count ($KSHAPE), against cuBLAS fp16"
step 2 60 $(( $(left) * 2 / 3 )) env "${KENV[@]}" python3 scripts/bench/int8_gemm.py --shape "$KSHAPE" --rows "$KROWS" \
  --deadline-s $(( $(left) / 2 )) --json "$OUT/kernels.json"
echo "== 3. quantization error, 7b1 shape (int8 vs fp16 engine, forced decoding)"
step 3 40 $(( $(left) - 30 )) python3 scripts/bench/int8_check.py "${CHECK7[@]}" --json "$OUT/check-7b1.json"
echo "== 4. quantization error, 176B layer shape (2 layers)"
step 4 25 $(( $(left) - 5 )) python3 scripts/bench/int8_check.py "${CHECK176[@]}" --json "$OUT/check-176b.json"

python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
RUNS = ("fp16", "int8-gemv", "int8-gemm")
rows = {n: {r["batch_size"]: r for r in (load(f"{n}.json") or {}).get("rows", [])} for n in RUNS}
def ms(n, bs):
    r = rows[n].get(bs)
    return r["ms_step"] if r else None
def f(v, spec):
    return "-" if v is None else format(v, spec)
print("| bs | fp16 ms/step | int8 gemv ms/step | int8 gemm ms/step | gemv/fp16 | gemm/fp16 | best int8/fp16 | best int8 % of its floor |")
print("|---|---|---|---|---|---|---|---|")
cells = []
for bs in sorted(set().union(*rows.values())):
    a, v, g = ms("fp16", bs), ms("int8-gemv", bs), ms("int8-gemm", bs)
    rv = v / a if a and v else None
    rg = g / a if a and g else None
    best = min((x for x in (rv, rg) if x is not None), default=None)
    kind = "gemm" if rg is not None and (rv is None or rg < rv) else "gemv"
    br = rows[f"int8-{kind}"].get(bs)
    print(f"| {bs} | {f(a, '.2f')} | {f(v, '.2f')} | {f(g, '.2f')} | {f(rv, '.3f')} | {f(rg, '.3f')} | "
          f"{f(best, '.3f')} ({kind}) | {f(100 * br['floor_fraction'] if br else None, '.0f')}% |")
    cells.append(f"bs{bs} {f(best, '.3f')}x ({kind})")
rows["int8"] = rows["int8-gemv"] or rows["int8-gemm"]
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
k = load("kernels.json")
if k:
    print(f"\nkernels alone ({k['shape']}, one step's worth, ms): " + ", ".join(
        f"M={r['rows']} fp16 {r['ms']['fp16']:.2f} gemv {r['ms']['gemv']:.2f} gemm {r['ms']['gemm']:.2f}"
        for r in k["rows"]) + f"; the GEMM leads from {k['gemm_ahead_from']} rows on")
floor1 = rows["int8"].get(1, {}).get("floor_fraction")
lead = f"; GEMM leads from M={k['gemm_ahead_from']}" if k else ""
print("\nSUMMARY best int8 vs fp16 ms/step: " + ", ".join(cells) + f"; int8 bs1 {100 * floor1:.0f}% of its floor{lead}"
      if floor1 else "\nSUMMARY best int8 vs fp16 ms/step: " + ", ".join(cells) + lead, end="")
print(f"; weights {bytes_ratio}x; " + "; ".join(errs))
PY
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader 2>/dev/null || true
echo "== done in $(( $(date +%s) - START ))s after the installs; files in $OUT"
