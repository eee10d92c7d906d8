#!/usr/bin/env bash
# Several GPU jobs in one device call, in order, each within the call's budget: a lent machine's start costs minutes,
# so the runs of one session go together. Each job writes into its own folder; what comes back is each job's summary
# ($OUT/JOB.md) and one archive of everything (all.tgz), inside the device's limit of 8 files.
#
#     GPU_JOBS="structured int8 prefill" OUT=$OUT bash scripts/gpu/batch.sh
#
# Jobs: structured (scripts/bench/structured_bench.py, 7b1, bs 32; the tokenizer in .tok/tokenizer.json when carried;
# STRUCTURED_ARGS replaces "--shape 7b1", e.g. "--shape tiny --new-tokens 4 --repeats 1" with STRUCTURED_TOKENIZER=none
# on a CPU; STRUCTURED_SCHEMAS, default "order bounded"; STRUCTURED_FILLS, default "pool": "pool serial" repeats each
# schema with each rows' mask filled in turn on the engine thread, "pool:1" with every row's matcher a copy of one),
# int8 (int8.sh), prefill (prefill.sh), noisefloor (load_check.sh's greedy-vs-batch-size bench alone), loaders
# (loaders.sh, .whl16 carried), loadcheck (load_check.sh with the LOADCHECK_* variables as given, e.g.
# LOADCHECK_CASES), ttft (scripts/bench/ttft_breakdown.py on random
# 7b1 weights, prefill.sh's when it ran first: the first wave and the steady state's first tokens, stage by stage;
# TTFT_ARGS adds flags, e.g. "--idle 10"; TTFT_ALSO="FLAGS" runs it again with those instead; TTFT_BASE=DIR runs the same load again from an older tree's src and scripts
# unpacked there, `git archive SHA src scripts | tar -x -C DIR; echo SHA > DIR/COMMIT`, carried: the baseline).
# prefillprof (scripts/bench/prefill_profile.py: the engine's prefill alone per case, with its top kernels, and the
# wave through one scheduler step; PREFILLPROF_ARGS replaces "--shape 7b1 --profile").
# The structured job ends each schema's run with one traced constrained run (`--timeline`).
# GPU_BUDGET_S (default 585): wall seconds for all of them; a job starts only with its minimum left. PREFILL_MAX_S
# (default 480) caps the prefill job, to leave time for jobs after it.
set -u -o pipefail
OUT=${OUT:-/tmp/gpu-batch-out}
WORK=/tmp/gpu-batch
mkdir -p "$OUT" "$WORK"
START=$(date +%s)
BUDGET_S=${GPU_BUDGET_S:-585}
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }
# shellcheck source=scripts/gpu/_device_env.sh
source scripts/gpu/_device_env.sh batch.sh > >(tee "$OUT/batch.md")
declare -A NEED=([structured]=200 [int8]=240 [prefill]=300 [loadcheck]=330 [noisefloor]=150 [loaders]=200 [ttft]=120 [prefillprof]=90)
for job in ${GPU_JOBS:-structured int8}; do
  o="$WORK/$job"; mkdir -p "$o"
  if [ "$(left)" -lt "${NEED[$job]:-120}" ]; then echo "== $job: skipped ($(left) s left)" | tee -a "$OUT/batch.md"; continue; fi
  t=$(date +%s)
  case $job in
    structured)  # the order schema (free-text strings), then `bounded` (maxLength / pattern / format strings)
      tok=(); [ -f .tok/tokenizer.json ] && [ "${STRUCTURED_TOKENIZER:-}" != none ] && tok=(--tokenizer .tok/tokenizer.json)
      rc=0; : > "$o/summary.md"
      for variant in ${STRUCTURED_FILLS:-pool}; do  # FILL or FILL:TEMPLATES (structured_bench.py --templates)
        fill=${variant%%:*}; tflag=(); tname=; [[ $variant == *:* ]] && tflag=(--templates "${variant#*:}") && tname=-t${variant#*:}
        for schema in ${STRUCTURED_SCHEMAS:-order bounded}; do
          sflag=(); [ "$schema" != order ] && sflag=(--schema "$schema")
          name=$schema-$fill$tname
          timeout $(( $(left) - 10 )) python3 scripts/bench/structured_bench.py ${STRUCTURED_ARGS:---shape 7b1} "${tok[@]}" \
            "${sflag[@]}" --fill "$fill" "${tflag[@]}" --timeline --time-limit $(( ($(left) - 60) / 2 )) --json "$o/structured-$name.json" \
            > "$o/run-$name.log" 2>&1 || rc=$?
          { echo "## schema: $schema, fill: $variant"; tail -20 "$o/run-$name.log"; } >> "$o/summary.md"
        done
      done ;;
    int8) INT8_BUDGET_S=$(( $(left) - 20 < 420 ? $(left) - 20 : 420 )) OUT=$o timeout $(( $(left) - 5 )) bash scripts/gpu/int8.sh > /dev/null 2>&1; rc=$? ;;
    prefill) PREFILL_BUDGET_S=$(( $(left) - 20 < ${PREFILL_MAX_S:-480} ? $(left) - 20 : ${PREFILL_MAX_S:-480} )) OUT=$o timeout $(( $(left) - 5 )) bash scripts/gpu/prefill.sh > /dev/null 2>&1; rc=$? ;;
    noisefloor)  # greedy tokens against batch size, every backend against itself and transformers (load_check.sh's bench)
      LOADCHECK_LIMITS=none LOADCHECK_SHAPES=none LOADCHECK_PROBE=0 LOADCHECK_BENCH=1 LOADCHECK_BUDGET_S=$(( $(left) - 10 )) \
        OUT=$o timeout $(( $(left) - 5 )) bash scripts/gpu/load_check.sh > /dev/null 2>&1; rc=$? ;;
    loaders)  # the field loaders against cat and their bare reads (loaders.sh; carry .whl16 as well)
      LOADERS_BUDGET_S=$(( $(left) - 60 < 300 ? $(left) - 60 : 300 )) OUT=$o timeout $(( $(left) - 5 )) \
        bash scripts/gpu/loaders.sh > /dev/null 2>&1; rc=$? ;;
    ttft)  # where a first token's time goes on the GPU: the first wave, then the steady state
      m=/tmp/prefill/bloom-7b1-fp16
      [ -f $m/config.json ] || python3 scripts/bench/make_random_bloom.py $m --shape 7b1 --dtype fp16 --init-device cuda \
        > "$o/make.log" 2>&1
      timeout $(( $(left) - 5 )) python3 scripts/bench/ttft_breakdown.py --step-ms 0 --model $m --dtype fp16 \
        --warmup 8 --duration 20 ${TTFT_ARGS:-} > "$o/summary.md" 2>&1; rc=$?
      if [ -n "${TTFT_ALSO:-}" ] && [ "$(left)" -gt 100 ]; then  # the current tree again with other flags
        { echo; echo "## again with: $TTFT_ALSO"
          timeout $(( $(left) - 5 )) python3 scripts/bench/ttft_breakdown.py --step-ms 0 --model $m --dtype fp16 \
            --warmup 8 --duration 20 $TTFT_ALSO 2>&1; } >> "$o/summary.md"
      fi
      if [ -n "${TTFT_BASE:-}" ] && [ "$(left)" -gt 100 ]; then  # the same load on an older tree: the same-run baseline
        { echo; echo "## baseline: the tree in $TTFT_BASE ($(cat "$TTFT_BASE/COMMIT" 2>/dev/null))"
          timeout $(( $(left) - 5 )) python3 "$TTFT_BASE/scripts/bench/ttft_breakdown.py" --step-ms 0 --model $m \
            --dtype fp16 --warmup 8 --duration 20 2>&1; } >> "$o/summary.md"
      fi ;;
    prefillprof) timeout $(( $(left) - 5 )) python3 scripts/bench/prefill_profile.py ${PREFILLPROF_ARGS:---shape 7b1 --profile} \
        > "$o/summary.md" 2>&1; rc=$? ;;
    loadcheck) LOADCHECK_BUDGET_S=$(( $(left) - 10 )) OUT=$o timeout $(( $(left) - 5 )) bash scripts/gpu/load_check.sh > /dev/null 2>&1; rc=$? ;;
    *) echo "unknown job $job"; rc=2 ;;
  esac
  echo "== $job: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$OUT/batch.md"
  { echo "# $job (rc=$rc, $(( $(date +%s) - t ))s)"; cat "$o/summary.md" 2>/dev/null; [ -f "$o/bench.md" ] && cat "$o/bench.md"; } > "$OUT/$job.md"
  tail -5 "$OUT/$job.md"
done
tar czf "$OUT/all.tgz" -C "$WORK" . 2>/dev/null
echo "== done in $(( $(date +%s) - START ))s"
