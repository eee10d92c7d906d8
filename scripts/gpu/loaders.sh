#!/usr/bin/env bash
# The read paths of BLOOM_LOADER against each other on the lent GPU machine, one device call (docs/results/cold-start.md
# "Field loaders"): installs the carried wheels (.whl/, then .whl16/: the field loaders and their pure dependencies),
# then scripts/bench/cold_start.py --loaders on the BLOOM-7b1 shape (14.1 GB of random fp16 weights written to
# $LOADERS_WORK on the machine's disk). After one unmeasured start that fills the kernel cache, each round times, each
# from a dropped page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`): `cat` of the weights (the disk's rate),
# `import torch; torch.zeros(1, device='cuda')`, each loader's bare read file -> GPU after torch and CUDA's start
# (timed apart), and `serve --backend fast` from process start to /ready 200 with BLOOM_LOADER set to each loader;
# rounds interleaved (order rotated) until LOADERS_ROUNDS or the budget; then one table.
#
#     OUT=$OUT bash scripts/gpu/loaders.sh                      # builtin, fastsafetensors, runai, instanttensor; 3 rounds
#     LOADERS=builtin,fastsafetensors LOADERS_ROUNDS=2 OUT=$OUT bash scripts/gpu/loaders.sh
#     LOADERS_VARIANTS="builtin-noprefetch:BLOOM_LOADER=builtin,BLOOM_LOAD_PREFETCH=0 builtin-pf2:BLOOM_LOADER=builtin,BLOOM_LOAD_PREFETCH_THREADS=2" \
#       LOADERS=builtin,fastsafetensors OUT=$OUT bash scripts/gpu/loaders.sh   # more server runs, each its environment
#     LOADERS_ARGS="--shape tiny" LOADERS_DROP=0 LOADERS=builtin,fastsafetensors,runai bash scripts/gpu/loaders.sh  # CPU
# (PYTHON: the interpreter, default python3; LOADERS_BUDGET_S: wall seconds, default 300.)
#
# $OUT: loaders.log (everything), summary.md (the table), loaders.json, servers.tgz (every server's log). Exit 0 when
# every server run reached ready. kvikio-cu12 is not installed: its CUDA 12 libraries (cupy-cuda12x, libkvikio-cu12)
# would sit beside torch's CUDA 13 in one process.
set -u -o pipefail
OUT=${OUT:-/tmp/loaders-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/loaders.log") 2>&1
# shellcheck source=scripts/gpu/_device_env.sh
source scripts/gpu/_device_env.sh loaders.sh
PY=${PYTHON:-python3}
BUDGET_S=${LOADERS_BUDGET_S:-300}   # wall seconds of the rounds; a round starts only if the last one would still fit
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
drop=--drop-caches
[ "${LOADERS_DROP:-1}" = 0 ] && drop=""
variants=()
for v in ${LOADERS_VARIANTS:-}; do variants+=(--variant "$v"); done
# shellcheck disable=SC2086
timeout $(( BUDGET_S + 120 )) "$PY" scripts/bench/cold_start.py ${LOADERS_ARGS:---shape 7b1} --dir "$WORK" \
  --loaders "${LOADERS:-builtin,fastsafetensors,runai,instanttensor}" --rounds "${LOADERS_ROUNDS:-3}" $drop \
  ${variants[@]+"${variants[@]}"} --budget-s "$BUDGET_S" --timeout 150 --json "$OUT/loaders.json" --summary "$OUT/summary.md"
rc=$?
( cd "$WORK" && tar czf "$OUT/servers.tgz" server-*.log ) 2>/dev/null
echo "== cold_start.py --loaders rc=$rc"
exit $rc
