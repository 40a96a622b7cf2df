#!/usr/bin/env bash
# compute-sanitizer over the CUDA code paths, on small cases so it fits a GPU session
# (about 4 minutes on the H200): memcheck (out-of-bounds / misaligned accesses, leaks of
# device errors), racecheck (shared-memory hazards), initcheck (reads of device memory
# never written) and synccheck (barriers in divergent code, illegal syncs) for every kernel
# family, through the op tests (pytest -k picks small CUDA cases) and through the
# torch-free check binaries. Prints one line per run; logs go to $1 (a folder).
# TOOLS="memcheck initcheck" limits the tools run.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/sanitize}
mkdir -p "$LOG"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
BIN=${BIN:-build/gpu/benchmarks/cpp}
status=0

TOOLS=${TOOLS:-memcheck racecheck initcheck synccheck}
run() {  # run <tool> <name> <command...>
  local tool=$1 name=$2; shift 2
  case " $TOOLS " in *" $tool "*) ;; *) return 0 ;; esac
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
# The NaN/inf policy and concurrency tests (issue 18): small shapes, every kernel family.
run memcheck policy     $PYT tests/test_numerics_policy.py -k "cuda or not isa"
run memcheck streams    $PYT tests/test_concurrency.py -k "cuda"
# initcheck: every kernel family reads only what was written (padding, tails, workspaces).
run initcheck pack      $PYT tests/test_pack.py -k "cuda"
run initcheck norm      $PYT tests/test_norm.py -k "cuda and (matches_reference and (7 or 2560) or empty or multi)"
run initcheck norm_bwd  $PYT tests/test_norm.py -k "cuda and backward_matches_reference"
run initcheck ternary   $PYT tests/test_ternary_cuda.py -k "cpu_and_cuda or empty or misaligned"
run initcheck ternary_t $PYT tests/test_ternary_t_cuda.py -k "exact and (1-5-3 or 7-300)"
run initcheck mlgru     $PYT tests/test_mlgru.py -k "cuda and (paths_agree or varlen)"
# synccheck: the block reductions and the chunked scan's barriers.
run synccheck norm      $PYT tests/test_norm.py -k "cuda and (matches_reference and 2560 or backward_matches_reference)"
run synccheck ternary   $PYT tests/test_ternary_cuda.py -k "cpu_and_cuda"
run synccheck ternary_t $PYT tests/test_ternary_t_cuda.py -k "exact and 7-300"
run synccheck mlgru     $PYT tests/test_mlgru.py -k "cuda and paths_agree"
# A short fuzz pass under memcheck (needs hypothesis on the machine: carry its wheel).
if python3 -c "import hypothesis" 2>/dev/null; then
  MMFREE_FUZZ_PROFILE=ci run memcheck fuzz $PYT tests/test_fuzz_ternary.py tests/test_fuzz_mlgru.py \
    -k "cuda and (unpack or grouped or bad_arguments or (mlgru_scan and not backward))"
fi
if [ -x "$BIN/bench_ternary_cuda" ]; then
  run memcheck ternary_bin  "$BIN/bench_ternary_cuda" --check-only
  run racecheck ternary_bin "$BIN/bench_ternary_cuda" --check-only
fi
if [ -x "$BIN/bench_ternary_t_cuda" ]; then
  run memcheck ternary_t_bin  "$BIN/bench_ternary_t_cuda" --check-only
  run racecheck ternary_t_bin "$BIN/bench_ternary_t_cuda" --check-only
fi
exit $status
