#!/usr/bin/env bash
# Issue 11 scope 2 on an H100/H200: the BitLinear training op's CUDA tests (bitlinear +
# ternary, which routes ternary_linear's autograd through it), the training-step bench
# (M=8192, 2560->13824 bf16: exact / int8 dX vs bf16 nn.Linear, reference.bit_linear; time
# and peak memory) and, unless QUICK=1, the 500-step loss curves on CUDA. Assumes the
# extension is built in place (SKIP_BUILD=1) or builds it for sm_90.
#   bash benchmarks/device_bitlinear.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/bitlinear}}
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
if [ -z "${SKIP_BUILD:-}" ]; then
  step build 240 bash -c "cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=$(command -v python3) \
    -DMMFREE_CUDA_ARCHS=90 -DMMFREE_COPY_TO_SOURCE=ON && cmake --build build/gpu -j 16" \
    || { cat "$SUMMARY"; grep -m5 -i "error" "$OUT_DIR/build.log"; exit 1; }
fi
step test_bitlinear 120 python3 -m pytest -q -p no:cacheprovider tests/test_bitlinear.py tests/test_ternary.py \
  || grep -E "^(FAILED|ERROR|E  )" "$OUT_DIR/test_bitlinear.log" | head -30
step bench_train 180 python3 benchmarks/bench_train_cuda.py --json "$OUT_DIR/train_cuda.json"
grep -A30 "^## training" "$OUT_DIR/bench_train.log" | head -30
if [ -z "${QUICK:-}" ]; then
  step loss_curve 300 python3 benchmarks/loss_curve_int8_dx.py --device cuda --steps 500 --seeds 0 1 \
    --json "$OUT_DIR/loss_curve_int8_dx.json" --png "$OUT_DIR/loss_curve_int8_dx.png"
  tail -8 "$OUT_DIR/loss_curve.log"
fi
cat "$SUMMARY"
