#!/usr/bin/env bash
# The read paths of BLOOM_LOADER against each other on the lent GPU machine, one device call (docs/results/cold-start.md
# "Field loaders"): installs the carried wheels (.whl/, then .whl16/: the field loaders and their pure dependencies),
# then scripts/bench/cold_start.py --loaders on the BLOOM-7b1 shape (14.1 GB of random fp16 weights written to
# $LOADERS_WORK on the machine's disk). After one unmeasured start that fills the kernel cache, each round times, each
# from a dropped page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`): `cat` of the weights (the disk's rate),
# `import torch; torch.zeros(1, device='cuda')`, each loader's bare read file -> GPU after torch and CUDA's start
# (timed apart), and `serve --backend fast` from process start to /ready 200 with BLOOM_LOADER set to each loader;
# rounds interleaved (order rotated) until LOADERS_ROUNDS or the budget; then one table.
# LOADERS_ARGS picks the checkpoints: cold_start.py flags (default --shape 7b1), several sets separated by ";", each
# one cold_start.py run after the other (its flags after the defaults here, so --rounds or --budget-s in a set win).
# A set's --layouts adds the pre-sharded layouts (preshard-int8-tp1: `bloom-server preshard --dtype int8`, served with
# --dtype int8); --shape 176b --layers N is the 176B layer shape (its bytes: cold_start.py's help; beside the 7b1
# checkpoints and their int8 preshard, 2 layers fit the lent machine's disk). Each layout is compared with the cat and
# bare reads of its own files.
#
#     OUT=$OUT bash scripts/gpu/loaders.sh                      # builtin, fastsafetensors, runai, instanttensor; 3 rounds
#     LOADERS=builtin,fastsafetensors LOADERS_ROUNDS=2 OUT=$OUT bash scripts/gpu/loaders.sh
#     LOADERS_VARIANTS="builtin-noprefetch:BLOOM_LOADER=builtin,BLOOM_LOAD_PREFETCH=0 builtin-pf2:BLOOM_LOADER=builtin,BLOOM_LOAD_PREFETCH_THREADS=2" \
#       LOADERS=builtin,fastsafetensors OUT=$OUT bash scripts/gpu/loaders.sh   # more server runs, each its environment
#     LOADERS_ARGS="--shape tiny" LOADERS_DROP=0 LOADERS=builtin,fastsafetensors,runai bash scripts/gpu/loaders.sh  # CPU
#     LOADERS_ARGS="--shape tiny --layouts plain,preshard-int8-tp1; --shape tiny --layers 1" LOADERS_DROP=0 \
#       LOADERS=builtin,fastsafetensors bash scripts/gpu/loaders.sh                                 # CPU, two sets
#
# The next GPU session, one call (its wall time estimated in docs/results/cold-start.md "int8 and the 176B layer
# shape"): 7b1 plain and int8 pre-sharded, then the 176B layer shape (2 layers) plain, builtin and fastsafetensors:
#     LOADERS=builtin,fastsafetensors LOADERS_ROUNDS=2 LOADERS_BUDGET_S=470 \
#       LOADERS_ARGS="--shape 7b1 --layouts plain,preshard-int8-tp1 --budget-s 300; --shape 176b --layers 2 --budget-s 170" \
#       OUT=$OUT bash scripts/gpu/loaders.sh
# (PYTHON: the interpreter, default python3; LOADERS_BUDGET_S: wall seconds of all the sets, default 300, shared
# evenly over the sets left unless a set names its own --budget-s.)
#
# $OUT: loaders.log (everything), summary.md (the table, every set's rows), loaders.json (the first set; the next
# ones loaders-2.json ...), servers.tgz (every server's log). Exit 0 when every server run of every set reached ready.
# kvikio-cu12 is not installed: its CUDA 12 libraries (cupy-cuda12x, libkvikio-cu12) would sit beside torch's CUDA 13
# in one process.
set -u -o pipefail
OUT=${OUT:-/tmp/loaders-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/loaders.log") 2>&1
# shellcheck source=scripts/gpu/_device_env.sh
source scripts/gpu/_device_env.sh loaders.sh
PY=${PYTHON:-python3}
BUDGET_S=${LOADERS_BUDGET_S:-300}   # wall seconds of the rounds; a round starts only if the last one would still fit
T_START=$SECONDS
WORK=${LOADERS_WORK:-$PWD/.cache/loaders}
mkdir -p "$WORK"
wheels=$(ls .whl16/*.whl 2>/dev/null | grep -v kvikio)
if [ -n "$wheels" ]; then  # once per machine, as _device_env.sh installs .whl/
  _stamp16=/tmp/site16/.installed-$(echo "$wheels" | md5sum | cut -c1-12)
  # shellcheck disable=SC2086
  [ -f "$_stamp16" ] || { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site16 $wheels && touch "$_stamp16"; } || echo "field loader wheels: install failed"
  export PYTHONPATH=/tmp/site16:$PYTHONPATH
fi
"$PY" - <<'PY'
import importlib
for m in ("torch", "fastsafetensors", "runai_model_streamer", "instanttensor"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - a report: the runs below say what it costs
        print(f"{m}: cannot import ({type(e).__name__}: {e})")
PY
df -h "$WORK" 2>/dev/null | tail -1
# The disks' I/O schedulers: only some honour I/O classes (BLOOM_LOAD_PREFETCH_IO=idle).
for f in /sys/block/*/queue/scheduler; do [ -e "$f" ] && echo "scheduler ${f#/sys/block/}: $(cat "$f")"; done
drop=--drop-caches
[ "${LOADERS_DROP:-1}" = 0 ] && drop=""
variants=()
for v in ${LOADERS_VARIANTS:-}; do variants+=(--variant "$v"); done
IFS=';' read -r -a sets <<< "${LOADERS_ARGS:---shape 7b1}"
rc=0
: > "$OUT/summary.md"
for i in "${!sets[@]}"; do
  set_args=${sets[$i]}
  left=$(( BUDGET_S - (SECONDS - T_START) ))
  budget=$(( left / (${#sets[@]} - i) ))
  if [[ $set_args =~ --budget-s[[:space:]=]+([0-9]+) ]]; then budget=${BASH_REMATCH[1]}; fi
  json=$OUT/loaders.json
  [ "$i" -gt 0 ] && json=$OUT/loaders-$(( i + 1 )).json
  echo "== set $(( i + 1 )) of ${#sets[@]}: ${set_args# } (budget $budget s)"
  rm -f "$WORK/summary.md"
  # shellcheck disable=SC2086
  timeout $(( budget + 120 )) "$PY" scripts/bench/cold_start.py --dir "$WORK" \
    --loaders "${LOADERS:-builtin,fastsafetensors,runai,instanttensor}" --rounds "${LOADERS_ROUNDS:-3}" $drop \
    ${variants[@]+"${variants[@]}"} --budget-s "$budget" --timeout 150 --json "$json" --summary "$WORK/summary.md" \
    $set_args
  r=$?
  echo "== set $(( i + 1 )): cold_start.py --loaders rc=$r"
  [ "$r" -ne 0 ] && rc=$r
  if [ -f "$WORK/summary.md" ]; then  # one table: the header once
    first=1
    [ -s "$OUT/summary.md" ] && first=3
    tail -n +"$first" "$WORK/summary.md" >> "$OUT/summary.md"
  fi
done
( cd "$WORK" && tar czf "$OUT/servers.tgz" server-*.log ) 2>/dev/null
[ "${#sets[@]}" -gt 1 ] && { echo "== summary of every set"; cat "$OUT/summary.md"; }
echo "== cold_start.py --loaders rc=$rc"
exit $rc
