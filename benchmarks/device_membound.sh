#!/usr/bin/env bash
# Issue 11 scope 2 (memory-bound pieces of the BitLinear step) and issue 12 scope 1 (glue) on an
# H200, one call: build for sm_90, the BitLinear stages bench (fwd+bwd of ours vs bf16
# nn.Linear, then every stage alone), the CUDA tests of the touched kernels beside a torch
# profile of one eager 370M training step, and last a table of the memory-bound stages
# against their bytes at 4.25 TB/s.
#   bash benchmarks/device_membound.sh [OUT_DIR]      (SKIP_BUILD=1: the extension is built)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/membound}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
# Every step's time box is cut to what is left of DEADLINE_S (seconds from the start), so a
# time-boxed device call ends with the final table printed.
DEADLINE_S=${DEADLINE_S:-600}
left() { local l=$((DEADLINE_S - SECONDS - 4)); [ "$l" -lt "$1" ] && echo $((l > 1 ? l : 1)) || echo "$1"; }
step() {  # step <name> <timeout_s> <command...>: runs, logs, one summary line
  local name=$1 limit; limit=$(left "$2"); shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s $(tail -1 "$OUT_DIR/$name.log" | cut -c1-150)" | tee -a "$SUMMARY"
  return $rc
}
if [ -z "${SKIP_BUILD:-}" ]; then
  step build "${BUILD_LIMIT:-110}" bash -c "cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=$(command -v python3) \
    -DMMFREE_CUDA_ARCHS=90 -DMMFREE_COPY_TO_SOURCE=ON && cmake --build build/gpu -j 16" \
    || { cat "$SUMMARY"; grep -m5 -i "error" "$OUT_DIR/build.log"; exit 1; }
fi
step bench_train 40 python3 -u benchmarks/bench_train_cuda.py --quick --json "$OUT_DIR/train_cuda.json"
# Tests and the profile side by side (the profile sums device time per kernel; the bench
# above ran alone).
timeout "$(left 45)" python3 -m pytest -q -x -p no:cacheprovider tests/test_dequant.py tests/test_norm_backward_cuda.py \
  tests/test_pack.py tests/test_bitlinear.py tests/test_scale_cast_cuda.py tests/test_cuda_writes_every_output.py -k "cuda or dequant" > "$OUT_DIR/tests.log" 2>&1 &
TESTS=$!
step profile 45 python3 -u benchmarks/profile_train_step.py --size 370M --batch 4 --seq 2048 --json "$OUT_DIR/profile_370m.json"
wait $TESTS
echo "tests rc=$? $(tail -1 "$OUT_DIR/tests.log" | cut -c1-150)" | tee -a "$SUMMARY"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/tests.log" | head -20
grep -A8 "^## training" "$OUT_DIR/bench_train.log"
sed -n '/^| family/,$p' "$OUT_DIR/profile.log" | head -70
python3 - "$OUT_DIR/bench_train.log" <<'PY'
import re, sys
rows = {}  # from the log (complete even when the bench was cut off): "name   123.4 us" / case rows
for line in open(sys.argv[1]):
    m = re.match(r"^(.*?)\s+([0-9.]+) us$", line.rstrip())
    if m:
        rows["stage: " + m.group(1).strip()] = float(m.group(2))
    m = re.match(r"^(mmfree bitlinear \(exact dX\)|bf16 nn.Linear)\s+([0-9.]+)\s", line)
    if m:
        rows[m.group(1)] = float(m.group(2))
m, k, n = 8192, 2560, 13824
bw = 4.25e6  # bytes per us
floors = {  # stage: (bytes, what they are)
    "stage: quantize_ternary(W)": (2 * n * k * 2 + n * k // 4, "W read twice + codes"),
    "stage: rms_norm_backward": (3 * m * k * 2 + 2 * (m // 8) * k * 4, "dy, x, dx + fp32 partials"),
    "stage: x_deq = x_q * x_scale": (m * k * 3, "int8 in, bf16 out"),
    "stage: x_deq via torch.mul (ref)": (m * k * 3, "int8 in, bf16 out"),
}
print(f"\n| stage | us | bytes MB | floor us | x floor |\n| --- | ---: | ---: | ---: | ---: |")
for name, (b, what) in floors.items():
    if name in rows:
        print(f"| {name[7:]} ({what}) | {rows[name]:.1f} | {b / 1e6:.1f} | {b / bw:.1f} | {rows[name] / (b / bw):.2f} |")
for name in ("mmfree bitlinear (exact dX)", "bf16 nn.Linear"):
    if name in rows:
        print(f"| {name} fwd+bwd | {rows[name]:.1f} | | | |")
PY
cat "$SUMMARY"
