#!/usr/bin/env bash
# Issue 12 item 3 (MLGRU at bandwidth) in one device call, inside a fixed budget: build
# (sm_90 only); the CUDA mlgru tests beside compute-sanitizer memcheck + racecheck on small
# v3 cases (multi-tile forward, chunk-parallel backward); then bench_mlgru --quick alone on the
# GPU (ours vs fla-core chunk_hgrn and ours with the v3 backward, same run, JSON to $OUT) and a
# short table last.
# Usage (device): OUT=... bash benchmarks/device_mlgru.sh [seconds, default 140]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mlgru_out}
mkdir -p "$OUT"
END=$((SECONDS + ${1:-140}))
left() { local l=$((END - SECONDS)); [ $l -gt 1 ] && echo $l || echo 1; }
upto() { local l; l=$(left); [ $l -lt $1 ] && echo $l || echo $1; }
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl > "$OUT/pip.log" 2>&1
fi
export PYTHONPATH=/tmp/site:python
timeout "$(left)" bash -c "cmake -S . -B build/gpu -G Ninja -DPython_EXECUTABLE=$(command -v python3) \
  -DMMFREE_CUDA_ARCHS=90 -DMMFREE_COPY_TO_SOURCE=ON > $OUT/build.log 2>&1 && cmake --build build/gpu -j 16 >> $OUT/build.log 2>&1"
echo "build rc=$? at ${SECONDS}s"
tail -2 "$OUT/build.log"

PYT="python3 -m pytest -q -p no:cacheprovider"
SMALL="chunked_backward_matches_cpu and (B2T33D33 or B3T1D7) or chunked_backward_varlen or multi_tile_forward and B3T777D24"
T=$(upto 40)
timeout "$T" $PYT -m cuda -k mlgru tests/test_mlgru.py tests/test_numerics_policy.py tests/test_large_index.py \
  tests/test_fuzz_mlgru.py > "$OUT/tests.log" 2>&1 &
P1=$!
timeout "$T" compute-sanitizer --tool memcheck --error-exitcode 9 $PYT tests/test_mlgru.py -k "$SMALL" \
  > "$OUT/memcheck.log" 2>&1 &
P2=$!
timeout "$T" compute-sanitizer --tool racecheck --error-exitcode 9 $PYT tests/test_mlgru.py \
  -k "chunked_backward_varlen or multi_tile_forward and B3T777D24 and dtype1" > "$OUT/racecheck.log" 2>&1 &
P3=$!
wait $P1; echo "tests rc=$? at ${SECONDS}s"; tail -2 "$OUT/tests.log"
grep -E "^FAILED|^ERROR" "$OUT/tests.log" | head -12
wait $P2; echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|passed|failed" "$OUT/memcheck.log" | tail -2
wait $P3; echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|passed|failed" "$OUT/racecheck.log" | tail -2
timeout "$(left)" python3 benchmarks/bench_mlgru.py --device cuda --quick --json "$OUT/bench_mlgru.json" \
  > "$OUT/bench.log" 2>&1
echo "bench rc=$? at ${SECONDS}s"
python3 - "$OUT/bench_mlgru.json" << 'PY' || tail -30 "$OUT/bench.log"
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
target = {("mlgru_scan fwd", "B=4 T=2048 D=2560"): 45, ("mlgru_scan fwd+bwd", "B=4 T=2048 D=2560"): 250,
          ("mlgru_scan fwd+bwd", "B=16 T=2048 D=2048"): 700}
print("| case | shape | ours us | GB/s | baseline | baseline us | target us |")
for r in rows:
    print(f"| {r['name']} | {r['shape']} | {r['us']:.1f} | {r.get('gbps') or 0:.0f} | {r.get('baseline_name')} | "
          f"{r['baseline_us'] or 0:.1f} | {target.get((r['name'], r['shape']), '')} |")
PY
