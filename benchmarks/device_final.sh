#!/usr/bin/env bash
# The release run on one H200: the product as a user installs it (a wheel built on the CPU
# machine against another torch, issue 15's proof) or as built here, then every CUDA test,
# the sanitizers on the kernels that changed, and the benchmarks the issues' tables come from.
#
#   WHEEL_DIR=.devscratch/wheel STEPS="wheel tests sanitize" bash benchmarks/device_final.sh
#   WHEEL_DIR=.devscratch/wheel STEPS="wheel bench" bash benchmarks/device_final.sh
#   STEPS="build tests" bash benchmarks/device_final.sh      # from source instead of a wheel
#
# wheel: install WHEEL_DIR's mmfree_ext-*-cp312 wheel into /tmp/site and run everything below
#   against it, from a copy of tests/ and benchmarks/ outside the source tree (so the
#   installed package is what is imported); build: sm_90 in place (PYTHONPATH=python);
# tests: every CUDA-marked test (pytest-xdist, XDIST workers on the one GPU);
# sanitize: initcheck with host backtraces on the GLU case, memcheck/racecheck on small cases of
#   the kernel families that changed; bench: GEMM sweep (split-K), decode variants, MLGRU,
#   BitLinear stages, the model training step against a bf16 Llama (eager and compiled).
# STEPS may also hold `initcheck` (the GLU case alone, host backtraces).
# Logs and JSON go to $OUT (one .tgz plus the summary); a short summary prints last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
LOG=/tmp/mmfree-final; mkdir -p "$LOG" "$OUT"
STEPS=${STEPS:-"build tests"}
export PYTHONUNBUFFERED=1
summary=()
step() { echo; echo "=== $* ($(date +%T))"; }
note() { summary+=("$1"); }
has() { [[ " $STEPS " == *" $1 "* ]]; }
if ls .whl/*.whl >/dev/null 2>&1; then  # carried pure-Python wheels (fla-core for the scan baseline)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/extra .whl/*.whl
fi
EXTRA=/tmp/extra

if has wheel; then
  step "wheel ${WHEEL_DIR:?WHEEL_DIR must name the folder holding the cp312 wheel}"
  wheel=$(ls "$WHEEL_DIR"/mmfree_ext-*.whl | head -1)
  rm -rf /tmp/site /tmp/work && mkdir -p /tmp/work
  python3 -m pip install -q --no-deps --no-index --target /tmp/site "$wheel" || { echo "WHEEL INSTALL FAILED"; exit 1; }
  cp -r tests benchmarks pyproject.toml /tmp/work/
  [ -d docs ] && cp -r docs /tmp/work/
  cd /tmp/work
  export PYTHONPATH=/tmp/site:$EXTRA
  note "wheel $(basename "$wheel") ($(du -h "$wheel" | cut -f1))"
elif has build; then
  step build
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v python3)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=${BENCH_BINS:-OFF} > "$LOG/build.log" 2>&1 \
    && cmake --build build/gpu -j 16 >> "$LOG/build.log" 2>&1
  rc=$?; note "build rc=$rc"
  [ $rc -eq 0 ] || { echo "BUILD FAILED"; grep -E "error" -A3 "$LOG/build.log" | head -60; exit 1; }
  export PYTHONPATH=python:$EXTRA
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PYEOF' | tee "$LOG/info.txt"
import torch, mmfree_ext
info = mmfree_ext.build_info()
print("torch", torch.__version__, "| mmfree_ext", mmfree_ext.__file__)
print({k: info.get(k) for k in ("torch_version", "torch_target_version", "cuda_archs", "cuda_loaded")})
assert mmfree_ext.cuda_available(), "the CUDA kernels did not load"
PYEOF
[ ${PIPESTATUS[0]} -eq 0 ] || { note "CUDA kernels not loaded"; printf '%s\n' "${summary[@]}"; exit 1; }
PYT="python3 -m pytest -q -p no:cacheprovider"

if has tests; then
  step tests
  timeout -s INT -k 20 "${TEST_TIMEOUT:-200}" $PYT -m cuda -ra -n "${XDIST:-6}" ${TESTS:-tests} \
    > "$LOG/tests.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | head -40
  note "cuda tests rc=$rc: $(tail -1 "$LOG/tests.log")"
fi

san() {  # san <tool> <name> <extra sanitizer flags...> -- <pytest args...>
  local tool=$1 name=$2; shift 2
  local flags=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do flags+=("$1"); shift; done
  shift
  timeout -s INT -k 15 "${SAN_TIMEOUT:-60}" compute-sanitizer --tool "$tool" "${flags[@]}" $PYT "$@" \
    > "$LOG/san.$name.$tool.log" 2>&1
  local rc=$?
  note "$tool $name rc=$rc $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$LOG/san.$name.$tool.log" | tail -1) $(tail -1 "$LOG/san.$name.$tool.log")"
}
if has initcheck || has sanitize; then
  step initcheck
  # The GLU case initcheck flagged last session: host backtraces say which call read what.
  san initcheck glu --check-bulk-copy yes --print-limit 20 --show-backtrace host -- tests/test_act.py -k "silu_mul_ternary_linear_equals and cuda"
fi
if has sanitize; then
  step sanitize
  # memcheck over the small CUDA cases of every test file (xdist workers: the sanitizer follows
  # child processes), racecheck over the kernels with shared-memory exchanges.
  small='cuda and not real_shapes and not past_2g and not 6913 and not 8192 and not 8200 and not 13824 and not fuzz'
  SAN_TIMEOUT=${MEMCHECK_TIMEOUT:-100} san memcheck suite --error-exitcode 9 -- -n "${XDIST:-6}" tests -m cuda -k "$small"
  SAN_TIMEOUT=${RACECHECK_TIMEOUT:-90} san racecheck kernels --error-exitcode 9 -- -n "${XDIST:-6}" \
    tests/test_ternary_split_k_cuda.py tests/test_ternary_sm90_cuda.py tests/test_norm_backward_cuda.py \
    tests/test_norm.py tests/test_mlgru.py tests/test_decode_step.py -m cuda -k "$small and (graph or tiny or 100 or 7 or 33 or split or v4)"
fi

bench() {  # bench <seconds> <name> <command...>
  local secs=$1 name=$2; shift 2
  echo "--- $name"
  timeout -s "${BENCH_SIGNAL:-TERM}" -k 10 "$secs" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?; note "$name rc=$rc"
  grep -v -i -E "warn" "$LOG/$name.log" | tail -${TAIL:-16}
}
if has bench; then
  step bench
  # BENCH picks and orders them: gemm gemm_sweep decode decode_batches prefill mlgru bitlinear
  # train_eager train_compiled ncu_gemm (NCU_SHAPE="M:K:N ...", default 2048:2560:2560) profile.
  for b in ${BENCH:-gemm decode mlgru bitlinear train_eager train_compiled}; do
    case $b in
      gemm) TAIL=60 bench 90 gemm python3 benchmarks/bench_ternary_cuda.py --splitk-sweep \
              --json "$LOG/splitk_sweep.json" ;;
      gemm_sweep) TAIL=${TAIL_SWEEP:-90} bench ${SWEEP_TIMEOUT:-240} gemm_sweep python3 benchmarks/bench_ternary_cuda.py --gemm-sweep \
                    --json "$LOG/gemm_sweep.json" ;;
      decode_batches) TAIL=30 bench 240 decode_batches python3 benchmarks/bench_decode.py --batch 1 8 64 \
                        --json "$LOG/bench_decode.json" ;;
      prefill) TAIL=20 bench 150 prefill python3 benchmarks/bench_model.py --device cuda --configs 2.7B --batch 1 \
                 --prefill 2048 --json "$LOG/bench_model_prefill.json" ;;
      # NCU_SHAPE may list several M:K:N: launches 2 .. 2n of the kernel are profiled, i.e. the
      # first shape's timed call, then each later shape's warm-up and timed call (a shape whose
      # product takes the tail split launches the kernel twice per call: profile it alone).
      ncu_gemm) shapes=(${NCU_SHAPE:-2048:2560:2560})
                TAIL=${TAIL_NCU:-80} bench 180 ncu_gemm ncu -k regex:gemm_sm90_kernel --launch-skip 1 \
                  --launch-count $((2 * ${#shapes[@]} - 1)) \
                  --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
                  --section MemoryWorkloadAnalysis python3 benchmarks/ncu_ternary_gemm.py \
                  "${shapes[@]/#/sm90_int8:}" ;;
      decode) TAIL=20 bench 75 decode env PYTHONPATH="$PYTHONPATH:benchmarks" python3 benchmarks/decode_variants.py \
                --batch 1 ;;
      mlgru) TAIL=30 bench 45 mlgru python3 benchmarks/bench_mlgru.py --quick --json "$LOG/bench_mlgru.json" ;;
      bitlinear) TAIL=24 bench 60 bitlinear python3 benchmarks/bench_train_cuda.py --quick \
                   --json "$LOG/bench_bitlinear.json" ;;
      train_eager) TAIL=14 bench 75 train_eager python3 benchmarks/bench_train_model.py --device cuda --modes eager \
                     --json "$LOG/bench_train_model_eager.json" ;;
      # SIGABRT at the limit: faulthandler prints every thread's Python stack (where a compile sat).
      train_compiled) TAIL=${TAIL_COMPILED:-14} BENCH_SIGNAL=ABRT bench ${TRAIN_COMPILED_TIMEOUT:-130} train_compiled \
                        python3 -X faulthandler benchmarks/bench_train_model.py --device cuda --modes compiled \
                        ${TRAIN_SIZES:+--sizes $TRAIN_SIZES} --json "$LOG/bench_train_model_compiled.json" ;;
      # PROFILE="370M:eager 1.3B:compiled ...": one profiled training step each (GPU time per kernel).
      profile) for pm in ${PROFILE:-1.3B:compiled}; do
                 sz=${pm%%:*}; md=${pm##*:}
                 TAIL=${TAIL_PROFILE:-45} bench 150 "profile_${sz}_${md}" python3 benchmarks/profile_train_step.py \
                   --size "$sz" $([ "$md" = compiled ] && echo --compile) --top 30 ${PROFILE_ARGS:-} \
                   --json "$LOG/profile_train_${sz}_${md}.json"
               done ;;
      *) echo "unknown bench $b" ;;
    esac
  done
fi

step summary
printf '%s\n' "${summary[@]}" | tee "$LOG/summary.txt"
tar czf "$OUT/final_$(echo "$STEPS" | tr ' ' '_').tgz" -C "$LOG" .
cp "$LOG/summary.txt" "$OUT/" 2>/dev/null || true
