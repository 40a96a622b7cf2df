#!/usr/bin/env bash
# Issue 13, the v4 batch-1 kernel (thread-block clusters, MMFREE_DECODE_V4) on the GPU in one
# short device call, BUDGET seconds in all (default 150). Assumes the extension is already
# built in place for sm_90 (python/mmfree_ext/_C*.so; PYTHONPATH=python). Steps:
#   1. the v4 bitwise tests of test_decode_step.py (tiny fp32/bf16/fp16, odd h = 200, the 1.3B
#      and 2.7B layer shapes at batch 1, cluster sizes 1/2/4, force / fallback, graph capture),
#      and the small fused v3 / v1 ones;
#   2. compute-sanitizer memcheck and racecheck on the small batch-1 v4 cases, side by side;
#   3. decode_variants.py at batch 1: GPU us per step of v4 (clusters of 8 and 4), v3, v2 and
#      op by op (CUDA-graph replays), v4 == v3 bitwise on the full models, generate() tok/s;
#   4. the rest of the CUDA tests of test_decode_step.py while time is left (little, at 150).
# Logs land in $OUT.
#
#   BUDGET=150 bash benchmarks/device_decode_v4.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-150}
export PYTHONPATH=python:benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -p no:cacheprovider"
T=tests/test_decode_step.py
left() { local s=$((BUDGET - SECONDS)); echo $((s > 1 ? s : 1)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }  # a step's timeout: its own, or what is left
step() { echo "=== $* (t=${SECONDS}s)"; }

step "v4 bitwise tests, and the tiny fused v3 / v1 ones (the CTA row split changed for all)"
timeout "$(cap 50)" $PYT $T -m cuda -k "v4 or (fused and (matches_op_by_op or odd_hidden or graph))" \
  > "$OUT/tests_v4.log" 2>&1
echo "v4 tests rc=$? $(tail -1 "$OUT/tests_v4.log")"
grep -E "^(FAILED|ERROR)|Error" "$OUT/tests_v4.log" | head -10

step sanitize
timeout "$(cap 40)" compute-sanitizer --tool memcheck --error-exitcode 9 \
  $PYT $T -m cuda -k "(v4_matches and tiny) or (v4_cluster and 2)" > "$OUT/sanitize.log" 2>&1 &
m=$!
timeout "$(cap 40)" compute-sanitizer --tool racecheck --error-exitcode 9 \
  $PYT $T -m cuda -k "(v4_matches and tiny-bf16) or (v4_cluster and 2)" > /tmp/racecheck.log 2>&1
r=$?
wait $m; m=$?
cat /tmp/racecheck.log >> "$OUT/sanitize.log"
echo "memcheck rc=$m racecheck rc=$r"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize.log" | tail -4

step variants
timeout "$(cap 60)" python3 benchmarks/decode_variants.py --batch 1 > "$OUT/variants.jsonl" 2> /tmp/variants.err
echo "variants rc=$?"; cat "$OUT/variants.jsonl"; tail -3 /tmp/variants.err

step remaining decode CUDA tests
timeout "$(cap 200)" $PYT $T -m cuda -k "not v4 and not matches_op_by_op and not odd_hidden and not graph" \
  > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -1 "$OUT/tests.log")"
step end
