#!/usr/bin/env bash
# compute-sanitizer over the CUDA code paths, on small cases so it fits a GPU session:
# memcheck (out-of-bounds / misaligned accesses, leaks of device errors) and racecheck
# (shared-memory hazards) for every kernel family, through the op tests (pytest -k picks
# the CUDA cases) and through the torch-free check binaries. Prints one line per run;
# logs go to $1 (a folder).
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/sanitize}
mkdir -p "$LOG"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
BIN=${BIN:-build/gpu/benchmarks/cpp}
status=0

run() {  # run <tool> <name> <command...>
  local tool=$1 name=$2; shift 2
  timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 "$@" > "$LOG/$name.$tool.log" 2>&1
  local rc=$?
  local summary
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$LOG/$name.$tool.log" | tail -2 | tr '\n' ' ')
  echo "$tool $name rc=$rc $summary"
  [ $rc -eq 0 ] || status=1
}

PYT="python3 -m pytest -q -x -p no:cacheprovider"
run memcheck pack      $PYT tests/test_pack.py -k "cuda"
run memcheck norm      $PYT tests/test_norm.py -k "cuda and not gradcheck and (2560 or 7 or 8193 or empty or multi or agree or extremes)"
run racecheck norm     $PYT tests/test_norm.py -k "cuda and matches_reference and 2560"
run memcheck ternary   $PYT tests/test_ternary_cuda.py -k "cpu_and_cuda or extreme or empty or misaligned or graph"
# The sm_90a wgmma GEMM (forced; its tests skip on other GPUs) on small shapes.
MMFREE_TERNARY_GEMM=sm90 run memcheck ternary_sm90 $PYT tests/test_ternary_sm90_cuda.py -k "misaligned or 200-777"
MMFREE_TERNARY_GEMM=sm90 run racecheck ternary_sm90 $PYT tests/test_ternary_sm90_cuda.py -k "200-777 and dtype0"
run memcheck ternary_t  $PYT tests/test_ternary_t_cuda.py -k "exact and (1-5-3 or 7-300 or 15-64 or 200-37) or leading or backward"
run racecheck ternary_t $PYT tests/test_ternary_t_cuda.py -k "exact and 7-300"
run memcheck ternary_linear $PYT tests/test_ternary.py -k "cuda"
run memcheck mlgru     $PYT tests/test_mlgru.py -k "cuda and (paths_agree or varlen or decode or unaligned or empty)"
run racecheck mlgru    $PYT tests/test_mlgru.py -k "cuda and paths_agree"
if [ -x "$BIN/bench_ternary_cuda" ]; then
  run memcheck ternary_bin  "$BIN/bench_ternary_cuda" --check-only
  run racecheck ternary_bin "$BIN/bench_ternary_cuda" --check-only
fi
if [ -x "$BIN/bench_ternary_t_cuda" ]; then
  run memcheck ternary_t_bin  "$BIN/bench_ternary_t_cuda" --check-only
  run racecheck ternary_t_bin "$BIN/bench_ternary_t_cuda" --check-only
fi
exit $status
