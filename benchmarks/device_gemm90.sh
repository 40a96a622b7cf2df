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

step build ${T_BUILD:-240} bash -c "cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=$(command -v python3) \
  -DMMFREE_CUDA_ARCHS=90 -DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=ON && cmake --build build/gpu -j 16" \
  || { cat "$SUMMARY"; grep -m5 -i "error" "$OUT_DIR/build.log"; exit 1; }
PYT="python3 -m pytest -q -x -p no:cacheprovider"
step test_sm90 ${T_STEP:-180} python3 -m pytest -q -p no:cacheprovider --maxfail=4 tests/test_ternary_sm90_cuda.py \
  || grep -E "^(FAILED|ERROR|E  )" "$OUT_DIR/test_sm90.log" | head -30
step bench_sweep ${T_STEP:-180} python3 benchmarks/bench_ternary_cuda.py --gemm-sweep --json "$OUT_DIR/gemm_sweep.json"
grep -A200 "^impl " "$OUT_DIR/bench_sweep.log" | head -70
SAN="compute-sanitizer --error-exitcode 9"
export MMFREE_TERNARY_GEMM=sm90
step memcheck_sm90 ${T_SAN:-120} $SAN --tool memcheck $PYT tests/test_ternary_sm90_cuda.py -k "misaligned or 200-777"
step racecheck_sm90 ${T_SAN:-120} $SAN --tool racecheck $PYT tests/test_ternary_sm90_cuda.py -k "200-777 and dtype0"
unset MMFREE_TERNARY_GEMM
if [ -z "${QUICK:-}" ]; then  # QUICK=1: the new kernel only
  step test_ternary 150 $PYT tests/test_ternary_cuda.py
  step bin_check 120 build/gpu/benchmarks/cpp/bench_ternary_cuda --check-only
fi
if [ -n "${NCU:-}" ]; then  # NCU=1: one profile of the wgmma kernel at M=8192, 2560->13824
  step ncu 120 ncu --clock-control none -k regex:gemm_sm90 -c 1 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section SchedulerStats --section Occupancy env MMFREE_TERNARY_GEMM=sm90 python3 -c "
import torch, mmfree_ext
from mmfree_ext import reference as ref
x = torch.randint(-128, 128, (8192, 2560), dtype=torch.int8, device='cuda')
p = ref.pack_ternary(torch.randint(-1, 2, (13824, 2560), dtype=torch.int8, device='cuda'))
torch.ops.mmfree.ternary_matmul(x, torch.ones(8192, device='cuda'), p, torch.ones((), device='cuda'), torch.bfloat16)
torch.cuda.synchronize()"
  grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Memory Throughput|L1/TEX Hit|Shared|Stall|Issue Slots|Executed Ipc|No Eligible|Warp Cycles|Registers|Block Limit|Achieved|Pipe|Bank" \
    "$OUT_DIR/ncu.log" | head -45
fi
echo "== summary"; cat "$SUMMARY"
echo "== GEMM sweep (ratio = bf16 F.linear us / ours us)"
grep -A200 "^impl " "$OUT_DIR/bench_sweep.log" | head -70
