#!/usr/bin/env bash
# Issue 13 on the GPU in one device call (fits timeout_s=300): build for sm_90 (-j16), the
# CUDA tests of the fused decode step, the in-graph generate(), the models and the norms,
# compute-sanitizer memcheck and racecheck on small decode_step cases, and the decode
# benchmark table printed last.
# Logs, the benchmark JSON and the plot land in $OUT.
#
#   bash benchmarks/device_decode.sh     (STEPS="build tests sanitize bench" by default; the
#   steps fit 300 s together only when the tests pass quickly: split with STEPS="build bench")
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build tests sanitize bench"}
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -x -p no:cacheprovider"
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

if [[ " $STEPS " == *" build "* ]]; then
  step build
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v python3)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON > "$OUT/build.log" 2>&1 && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1
  rc=$?
  tail -3 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
fi

if [[ " $STEPS " == *" tests "* ]]; then
  step tests
  timeout 120 $PYT tests/test_decode_step.py tests/test_generate_cuda_graph.py tests/test_models.py tests/test_norm.py -m cuda > "$OUT/tests.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  tail -25 "$OUT/tests.log"; echo "tests rc=$rc"
fi

if [[ " $STEPS " == *" sanitize "* ]]; then
  step sanitize
  for tool in memcheck racecheck; do
    timeout 30 compute-sanitizer --tool "$tool" --error-exitcode 9 \
      $PYT tests/test_decode_step.py -k "cuda_graph or (odd_hidden and cuda)" > "$OUT/sanitize.$tool.log" 2>&1
    rc=$?; [ $rc -eq 0 ] || status=1
    echo "$tool rc=$rc $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize.$tool.log" | tail -2 | tr '\n' ' ')"
  done
fi

if [[ " $STEPS " == *" bench "* ]]; then
  step bench
  timeout 100 python3 benchmarks/bench_decode.py --long 80 --json "$OUT/decode.json" > "$OUT/bench.log" 2>&1
  rc=$?; [ $rc -eq 0 ] || status=1
  python3 benchmarks/plot_decode.py "$OUT/decode.json" "$OUT/decode_tokens_per_s.png" > /dev/null 2>&1 || true
  tail -12 "$OUT/bench.log"; echo "bench rc=$rc"
fi
exit $status
