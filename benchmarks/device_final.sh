#!/usr/bin/env bash
# The integration run on one H200, in two device calls that follow each other while the
# machine is warm (the build is kept between them):
#   STEPS="build tests" bash benchmarks/device_final.sh          # about 5 minutes
#   STEPS="sanitize fuzz bench" bash benchmarks/device_final.sh  # about 6 minutes
# build: sm_90 (+ the sm_90a GEMM) and the C++ check binaries; tests: every CUDA-marked test;
# sanitize: compute-sanitizer's four tools on small cases of every kernel family and the new
# paths; fuzz: the hypothesis suite's CUDA cases at the larger 'gpu' budget; bench: the
# BitLinear training layer, the fused lm_head + loss, the model training step against a bf16
# Llama, the 2.7B prefill. Logs and JSON go to $OUT; a short summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
LOG=/tmp/mmfree-final; mkdir -p "$LOG" "$OUT"
STEPS=${STEPS:-"build tests"}
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PYT="python3 -m pytest -q -p no:cacheprovider"
summary=()
step() { echo; echo "=== $* ($(date +%T))"; }
note() { summary+=("$1"); }
has() { [[ " $STEPS " == *" $1 "* ]]; }

if has build; then
  step build
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v python3)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=${BENCH_BINS:-ON} > "$LOG/build.log" 2>&1 \
    && cmake --build build/gpu -j 16 >> "$LOG/build.log" 2>&1
  rc=$?; note "build rc=$rc"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; grep -E "error" -A3 "$LOG/build.log" | head -60; exit 1; }
  python3 -c "import mmfree_ext, json; print(json.dumps(mmfree_ext.build_info()))"
fi

if has tests; then
  step tests
  timeout "${TEST_TIMEOUT:-230}" $PYT -m cuda -ra ${TESTS:-tests} > "$LOG/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | head -30
  grep -A40 "fuzz cases run" "$LOG/tests.log" | grep -E "cuda" | head -30
  note "cuda tests rc=$rc: $(tail -1 "$LOG/tests.log")"
fi

san() {  # san <tool> <name> <pytest args...>
  local tool=$1 name=$2; shift 2
  timeout "${SAN_TIMEOUT:-60}" compute-sanitizer --tool "$tool" --error-exitcode 9 $PYT -x "$@" > "$LOG/san.$name.$tool.log" 2>&1
  local rc=$?
  note "$tool $name rc=$rc $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san.$name.$tool.log" | tail -1) $(tail -1 "$LOG/san.$name.$tool.log")"
}
if has sanitize; then
  step sanitize
  # One pytest run per tool over small cases of every kernel family and the new paths.
  san memcheck all tests/test_decode_step.py tests/test_act.py tests/test_loss.py tests/test_bitlinear.py \
    tests/test_numerics_policy.py -k "cuda and not real_shapes"
  san racecheck all tests/test_decode_step.py tests/test_mlgru.py -k "cuda_graph or (cuda and paths_agree)"
  san initcheck all tests/test_norm.py tests/test_ternary_cuda.py tests/test_mlgru.py tests/test_act.py \
    -k "cuda and (matches_reference and 2560 or cpu_and_cuda or paths_agree or silu)"
  san synccheck all tests/test_norm.py tests/test_ternary_cuda.py tests/test_mlgru.py tests/test_decode_step.py \
    -k "cuda and (matches_reference and 2560 or cpu_and_cuda or paths_agree or cuda_graph)"
fi

if has fuzz; then
  step fuzz
  MMFREE_FUZZ_PROFILE=gpu timeout "${FUZZ_TIMEOUT:-75}" $PYT -ra tests/test_fuzz_norm.py tests/test_fuzz_ternary.py \
    tests/test_fuzz_mlgru.py -k cuda > "$LOG/fuzz_gpu.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$LOG/fuzz_gpu.log" | head; grep -A40 "fuzz cases run" "$LOG/fuzz_gpu.log" | grep cuda
  note "fuzz gpu rc=$rc: $(tail -1 "$LOG/fuzz_gpu.log")"
fi

bench() {  # bench <seconds> <name> <command...>
  local secs=$1 name=$2; shift 2
  echo "--- $name"
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?; note "$name rc=$rc"
  grep -v -i -E "warn" "$LOG/$name.log" | tail -${TAIL:-14}
}
if has bench; then
  step bench
  bench 70 bench_train_cuda python3 benchmarks/bench_train_cuda.py --json "$LOG/bench_train_cuda.json"
  bench 70 bench_trainstep python3 benchmarks/bench_trainstep.py --device cuda --json "$LOG/bench_trainstep.json"
  bench 90 bench_train_model python3 benchmarks/bench_train_model.py --device cuda --modes eager \
    --json "$LOG/bench_train_model.json"
  TAIL=6 bench 60 bench_prefill python3 benchmarks/bench_model.py --configs 2.7B --batch 1 --prefill 2048 \
    --json "$LOG/bench_prefill.json"
fi

step summary
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
tar czf "$OUT/final_$(echo "$STEPS" | tr ' ' '_').tgz" -C "$LOG" .
cp "$LOG/summary.txt" "$OUT/" 2>/dev/null || true
