#!/usr/bin/env bash
# Issue 13, the v3 batch-1 kernel on the GPU in one short device call, BUDGET seconds in all
# (default 165): build for sm_90 with -lineinfo; compute-sanitizer memcheck and racecheck on
# the small batch-1 cases (bitwise tests too) beside the real-shape batch-1 tests; the
# per-variant step times at batch 1 (decode_variants.py: v3, v2, op by op, generate()); one
# ncu profile of a 2.7B batch-1 v3 step with source-level stall sampling; then the rest of
# the CUDA tests of test_decode_step.py while time is left. Logs and excerpts land in $OUT.
#
#   BUDGET=165 bash benchmarks/device_decode_v3.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
mkdir -p "$OUT"
BUDGET=${BUDGET:-165}
export PYTHONPATH=python:benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -p no:cacheprovider"
left() { local s=$((BUDGET - SECONDS)); echo $((s > 1 ? s : 1)); }
cap() { local l; l=$(left); echo $(($1 < l ? $1 : l)); }  # a step's timeout: its own, or what is left
step() { echo "=== $* (t=${SECONDS}s)"; }

step build
cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v python3)" -DMMFREE_CUDA_ARCHS=90 \
  -DMMFREE_COPY_TO_SOURCE=ON -DCMAKE_CUDA_FLAGS=-lineinfo > /tmp/build.log 2>&1 &&
  timeout "$(cap 120)" cmake --build build/gpu -j 16 >> /tmp/build.log 2>&1
rc=$?
tail -2 /tmp/build.log
[ $rc -eq 0 ] || { echo "BUILD FAILED rc=$rc"; cp /tmp/build.log "$OUT/"; grep -E "error" -A3 /tmp/build.log | head -40; exit 1; }

step sanitize and quick bitwise tests, side by side
# memcheck and racecheck on the small fused cases at batch 1 (the v3 kernel; the graph test
# also at batch 4), each also a bitwise test; the real shapes at batch 1 beside them.
SMALL='fused and not real_shapes and ([1- or graph)'
SAN="tests/test_decode_step.py -m cuda -k"
timeout "$(cap 40)" compute-sanitizer --tool memcheck --error-exitcode 9 $PYT $SAN "$SMALL" > "$OUT/sanitize.log" 2>&1 &
m=$!
timeout "$(cap 40)" compute-sanitizer --tool racecheck --error-exitcode 9 $PYT $SAN "$SMALL" > /tmp/racecheck.log 2>&1 &
r=$!
timeout "$(cap 40)" $PYT $SAN "real_shapes and [1- and fused" > "$OUT/tests_quick.log" 2>&1
q=$?
wait $m; m=$?
wait $r; r=$?
cat /tmp/racecheck.log >> "$OUT/sanitize.log"
echo "memcheck rc=$m racecheck rc=$r real-shapes rc=$q $(tail -1 "$OUT/tests_quick.log")"
grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize.log" | tail -4

step variants
timeout "$(cap 40)" python3 benchmarks/decode_variants.py --batch 1 > "$OUT/variants.jsonl" 2> /tmp/variants.err
echo "variants rc=$?"; cat "$OUT/variants.jsonl"; tail -3 /tmp/variants.err

step ncu
timeout "$(cap 45)" ncu --clock-control none --set full --import-source yes -k regex:decode_step_kernel \
  --launch-count 1 -f -o /tmp/prof python3 benchmarks/decode_variants.py --mode once --configs 2.7B --batch 1 \
  > /tmp/ncu.log 2>&1
echo "ncu rc=$?"; tail -3 /tmp/ncu.log
if [ -f /tmp/prof.ncu-rep ]; then
  ncu -i /tmp/prof.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
  # (--print-source cuda came back without metric columns on 12-01: per-SASS-line instead)
  ncu -i /tmp/prof.ncu-rep --page source --csv --print-source sass > /tmp/src.csv 2> /tmp/ncu_src.err ||
    ncu -i /tmp/prof.ncu-rep --page source --csv > /tmp/src.csv 2>> /tmp/ncu_src.err
  python3 benchmarks/ncu_top_lines.py /tmp/src.csv 40 > "$OUT/ncu_source_top.txt" 2>&1
  gzip -c /tmp/src.csv > "$OUT/ncu_source.csv.gz"
  grep -E "decode_step_kernel|Duration|Warp Cycles Per Issued|Issue Slots Busy|Memory Throughput|DRAM Throughput|L2 Hit|Registers|Stall" \
    "$OUT/ncu_details.txt" | head -40
fi

step remaining tests
timeout "$(cap 200)" $PYT tests/test_decode_step.py -m cuda > "$OUT/tests.log" 2>&1
echo "tests rc=$? $(tail -1 "$OUT/tests.log")"
step end
