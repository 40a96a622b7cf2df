#!/usr/bin/env bash
# One GPU session in one call (device machine: H100, torch preinstalled, no network):
# build with CUDA for sm_90, run the CUDA tests, run compute-sanitizer on small cases,
# run the benchmarks, and print a short table last. Logs and JSON go to $OUT.
#
#   STEPS="build tests sanitize bench" bash benchmarks/device_run.sh
#   TESTS="tests/test_norm.py"  BENCH="benchmarks/bench_norm.py"  (optional narrowing)
#   BENCH_BINS="build/gpu/benchmarks/cpp/bench_norm cuda"  (C++ benchmark binaries to run)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
FINAL_OUT=$OUT
OUT=/tmp/mmfree-logs  # the device tool brings back at most 8 files: everything is tarred at the end
rm -rf "$OUT"; mkdir -p "$OUT" "$FINAL_OUT"
STEPS=${STEPS:-"build tests sanitize bench"}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
summary=()
step() { echo; echo "=== $* ($(date +%T))"; }
record() { summary+=("$1: $2"); }

# Carried pure-Python wheels (fla-core for the scan baselines).
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}

if [[ " $STEPS " == *" build "* ]]; then
  step build
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  lscpu | grep -E "Model name|Flags" | sed 's/Flags:.*\(avx512[a-z_]*\).*/avx512: yes/' | head -3
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v $PY)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=ON > "$OUT/build.log" 2>&1 \
    && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1
  rc=$?; record build "rc=$rc"; tail -5 "$OUT/build.log"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1; }
  $PY -c "import mmfree_ext, json; print(json.dumps(mmfree_ext.build_info())); print(json.dumps(mmfree_ext.cpu_features()))"
fi

if [[ " $STEPS " == *" tests "* ]]; then
  step tests
  $PY -m pytest -q -ra -p no:cacheprovider ${TESTS:-tests} > "$OUT/tests.log" 2>&1
  rc=$?; record tests "rc=$rc $(tail -1 "$OUT/tests.log")"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
  tail -3 "$OUT/tests.log"
fi

if [[ " $STEPS " == *" sanitize "* ]]; then
  step sanitize
  BIN=build/gpu/benchmarks/cpp bash benchmarks/device_sanitize.sh "$OUT/sanitize" | tee "$OUT/sanitize.txt"
  record sanitize "rc=${PIPESTATUS[0]}"
fi

if [[ " $STEPS " == *" bench "* ]]; then
  step bench
  for b in ${BENCH:-benchmarks/bench_*.py}; do
    name=$(basename "$b" .py)
    $PY "$b" --device cuda --json "$OUT/$name.json" > "$OUT/$name.log" 2>&1
    rc=$?; record "$name" "rc=$rc"
    cat "$OUT/$name.log" | grep -v "^JSON" | tail -40
  done
  for b in ${BENCH_BINS:-}; do
    $b > "$OUT/$(basename ${b%% *}).log" 2>&1
    rc=$?; record "$b" "rc=$rc"
    grep -v "^JSON" "$OUT/$(basename ${b%% *}).log" | tail -30
  done
fi

step summary
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
tar czf "$FINAL_OUT/results.tgz" -C "$OUT" .
cp "$OUT/summary.txt" "$FINAL_OUT/" 2>/dev/null || true
