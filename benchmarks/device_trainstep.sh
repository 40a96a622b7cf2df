#!/usr/bin/env bash
# The training-step work of issue 12 on the GPU machine (H200, python3 with torch, nvcc 13),
# in one call of at most ~3 minutes: build for sm_90 (skipped when the extension is already
# built with CUDA), run the CUDA tests of the fused loss, silu_mul and the model training
# step, then print a short table: fused lm_head + cross entropy vs materialized logits +
# F.cross_entropy (fwd+bwd time and peak memory at M=8192, V=32000, K=2560, bf16) and
# silu_mul fwd/bwd GB/s. Logs and JSON go to $OUT.
#
#   bash benchmarks/device_trainstep.sh              (from the repository root)
#   SKIP_BUILD=1 bash benchmarks/device_trainstep.sh (extension already built in python/)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

built_cuda() { $PY -c "import mmfree_ext, sys; sys.exit(0 if mmfree_ext.build_info()['cuda'] else 1)" 2>/dev/null; }
if [ -z "${SKIP_BUILD:-}" ] && ! built_cuda; then
  echo "=== build ($(date +%T))"
  cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE="$(command -v $PY)" -DMMFREE_CUDA_ARCHS=90 \
    -DMMFREE_COPY_TO_SOURCE=ON > "$OUT/build.log" 2>&1 && cmake --build build/gpu -j 16 >> "$OUT/build.log" 2>&1 \
    || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; exit 1; }
fi

echo "=== CUDA tests ($(date +%T))"
timeout 120 $PY -m pytest -q -m cuda tests/test_loss.py tests/test_act.py tests/test_train_step.py 2>&1 \
  | tee "$OUT/tests_trainstep.log" | tail -15
test_rc=${PIPESTATUS[0]}

echo "=== bench ($(date +%T))"
timeout 90 $PY benchmarks/bench_trainstep.py --device cuda --json "$OUT/bench_trainstep.json" 2>&1 \
  | tee "$OUT/bench_trainstep.log"
bench_rc=${PIPESTATUS[0]}
echo "tests rc=$test_rc  bench rc=$bench_rc"
