#!/usr/bin/env bash
# compute-sanitizer over the CUDA code paths, on small cases so it fits a GPU session
# (about 4 minutes on the H200): memcheck (out-of-bounds / misaligned accesses, leaks of
# device errors), racecheck (shared-memory hazards), initcheck (reads of device memory
# never written) and synccheck (barriers in divergent code, illegal syncs) for every kernel
# family, through the op tests (pytest -k picks small CUDA cases) and through the
# torch-free check binaries. Prints one line per run; logs go to $1 (a folder).
# TOOLS="memcheck initcheck" limits the tools run, ONLY (an extended regex over the run
# names) the runs, RUN_TIMEOUT (s, default 240) each run's time box. WHEEL_DIR=<folder with
# the cp312 wheel> runs against that wheel installed in /tmp/site, from a copy of tests/.
# initcheck counts TMA (bulk-copy) writes, which cuBLAS's sm_90 kernels and the int8-weight
# GEMM use, only with --check-bulk-copy: every initcheck run passes it.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/sanitize}
mkdir -p "$LOG"
if [ -n "${WHEEL_DIR:-}" ]; then
  rm -rf /tmp/site /tmp/san-work && mkdir -p /tmp/san-work
  python3 -m pip install -q --no-deps --no-index --target /tmp/site "$WHEEL_DIR"/mmfree_ext-*.whl || exit 1
  cp -r tests pyproject.toml /tmp/san-work/ && cd /tmp/san-work
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
fi
BIN=${BIN:-build/gpu/benchmarks/cpp}
status=0

TOOLS=${TOOLS:-memcheck racecheck initcheck synccheck}
run() {  # run <tool> <name> <command...>
  local tool=$1 name=$2; shift 2
  case " $TOOLS " in *" $tool "*) ;; *) return 0 ;; esac
  [[ -z "${ONLY:-}" || "$name" =~ ${ONLY} ]] || return 0
  local flags=()
  [ "$tool" = initcheck ] && flags=(--check-bulk-copy yes)
  timeout -s INT -k 15 "${RUN_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 "${flags[@]}" "$@" \
    > "$LOG/$name.$tool.log" 2>&1
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
# The int8-weight form (TMA with aligned x rows, cp.async with unaligned ones; the test
# module's own impl parameter), its split-K cluster instances and the weight expansion.
run memcheck ternary_int8 $PYT tests/test_ternary_sm90_cuda.py \
  -k "sm90_int8 and (200-777 or extreme or misaligned or split_bitwise_equal_to_unsplit and 300-777 or graph)"
run racecheck ternary_int8 $PYT tests/test_ternary_sm90_cuda.py \
  -k "sm90_int8 and (200-777 and dtype0 or split_bitwise_equal_to_unsplit and 300-777 and 2)"
run initcheck ternary_int8 $PYT tests/test_ternary_sm90_cuda.py -k "sm90_int8 and (200-777 or split_misaligned)"
# The decoding wgmma kernel split over a cluster, the small-M split-K kernel, decode_step.
run memcheck sm90_split  $PYT tests/test_ternary_sm90_cuda.py -k "sm90- and split_bitwise_equal_to_unsplit and 300-777"
run racecheck sm90_split $PYT tests/test_ternary_sm90_cuda.py -k "sm90- and split_bitwise_equal_to_unsplit and 300-777 and 2"
run memcheck split_k     $PYT tests/test_ternary_split_k_cuda.py -k "exact_accumulators and (300 or 100) and 2-"
run racecheck split_k    $PYT tests/test_ternary_split_k_cuda.py -k "exact_accumulators and 100 and 2-"
run memcheck decode      $PYT tests/test_decode_step.py -k "fused and (matches_op_by_op and 1- or odd_hidden or cuda_graph)"
run racecheck decode     $PYT tests/test_decode_step.py -k "matches_op_by_op and 1-dtype0-cuda-fused"
run memcheck decode_v4   $PYT tests/test_decode_step.py -k "v4_matches_op_by_op and (tiny-f32 or odd) or v4_cluster_sizes"
run racecheck decode_v4  $PYT tests/test_decode_step.py -k "v4_matches_op_by_op and tiny-f32"
run memcheck ternary_tail $PYT tests/test_ternary_sm90_cuda.py -k "tail_wave_cuda_graph"
run memcheck quant_rows  $PYT tests/test_quant_rows.py tests/test_bitlinear.py -k "cuda"
run racecheck quant_rows $PYT tests/test_quant_rows.py -k "cuda and (matches_reference and 13824 or misaligned or nan)"
run initcheck quant_rows $PYT tests/test_quant_rows.py -k "cuda and (matches_reference or empty)"
# The panels dX buffer of the GLU backward (cuBLAS writes it by TMA, see the header).
run initcheck glu        $PYT tests/test_act.py -k "silu_mul_ternary_linear_equals and cuda"
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
