#!/usr/bin/env bash
# Issue 11 on an H100/H200: build for sm_90 (the wgmma GEMM is sm_90a), the wgmma GEMM's
# tests, the existing ternary tests (whose prefill cases now take the wgmma path), a
# compute-sanitizer memcheck + racecheck pass over the new kernel on small shapes, and the
# GEMM sweep vs bf16 cuBLAS (JSON + a short table printed last).
#   bash benchmarks/device_gemm90.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gemm90}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
step() {  # step <name> <timeout_s> <command...>: runs, logs, one summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s $(tail -1 "$OUT_DIR/$name.log" | cut -c1-150)" | tee -a "$SUMMARY"
  return $rc
}

step build 240 bash -c "cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=$(command -v python3) \
  -DMMFREE_CUDA_ARCHS=90 -DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=ON && cmake --build build/gpu -j 16" \
  || { cat "$SUMMARY"; grep -m5 -i "error" "$OUT_DIR/build.log"; exit 1; }
PYT="python3 -m pytest -q -x -p no:cacheprovider"
step test_sm90 180 $PYT tests/test_ternary_sm90_cuda.py
step bench_sweep 150 python3 benchmarks/bench_ternary_cuda.py --gemm-sweep --json "$OUT_DIR/gemm_sweep.json"
SAN="compute-sanitizer --error-exitcode 9"
export MMFREE_TERNARY_GEMM=sm90
step memcheck_sm90 120 $SAN --tool memcheck $PYT tests/test_ternary_sm90_cuda.py -k "misaligned or 200-777"
step racecheck_sm90 120 $SAN --tool racecheck $PYT tests/test_ternary_sm90_cuda.py -k "200-777 and dtype0"
unset MMFREE_TERNARY_GEMM
step test_ternary 150 $PYT tests/test_ternary_cuda.py tests/test_ternary_t_cuda.py
step bin_check 120 build/gpu/benchmarks/cpp/bench_ternary_cuda --check-only
echo "== summary"; cat "$SUMMARY"
echo "== GEMM sweep (ratio = bf16 F.linear us / ours us)"
grep -A200 "^impl " "$OUT_DIR/bench_sweep.log" | head -70
