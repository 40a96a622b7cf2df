#!/usr/bin/env bash
# Split-K on an H200 (issue 11: split-K inside the wgmma GEMM; issue 13 scope 4: the small-M
# cluster kernel), with the extension ALREADY BUILT in place (python/mmfree_ext/_C*.so,
# arch 90). In priority order, each step under a timeout and all within ~150 s (BUDGET; a
# step that would start past it is skipped and says so):
#   1. the new wgmma split-K tests, then the small-M split-K tests;
#   2. the one-run split-K table (bench_ternary_cuda.py --splitk-sweep, JSON): before the
#      sanitizers, so that slow sanitizer start-ups cannot cost the measurement;
#   3. compute-sanitizer memcheck + racecheck on small forced cases of both split kernels;
#   4. the rest of the wgmma tests and tests/test_ternary_cuda.py, if time is left.
# Files under OUT_DIR (7, so the device tool's 8 leave room for a build log): summary.txt,
# splitk_sweep.json and the logs test_sm90_split, test_smallm_split, bench, sanitize
# (memcheck, then racecheck), test_rest.
#   bash benchmarks/device_gemm_splitk.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gemm_splitk}}
mkdir -p "$OUT_DIR"
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH}
BUDGET=${BUDGET:-150}
SUMMARY="$OUT_DIR/summary.txt"
: > "$SUMMARY"
step() {  # step <name> <timeout_s> <command...>: runs under min(timeout, budget left), logs
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 5 ]; then echo "$name skipped (budget)" | tee -a "$SUMMARY"; return 124; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s $(tail -1 "$OUT_DIR/$name.log" | cut -c1-150)" | tee -a "$SUMMARY"
  return $rc
}
fails() { grep -E "^(FAILED|ERROR|E  )" "$OUT_DIR/$1.log" | head -20; }
ls python/mmfree_ext/_C*.so > /dev/null 2>&1 || { echo "build the extension in place first"; exit 1; }

PYT="python3 -m pytest -q -p no:cacheprovider --maxfail=5"
step test_sm90_split 45 $PYT tests/test_ternary_sm90_cuda.py -k split || fails test_sm90_split
step test_smallm_split 35 $PYT tests/test_ternary_split_k_cuda.py || fails test_smallm_split
step bench 60 python3 benchmarks/bench_ternary_cuda.py --splitk-sweep --json "$OUT_DIR/splitk_sweep.json"

# Small forced products of each split kernel: the wgmma split 3 ways (256-wide split tile,
# column tail, x rows of 2500 bytes: byte loads) and 8 ways over 9 k-tiles (ranks of 1 and
# 2 k-tiles, N = 8); the small-M split 8 ways with empty slices and 3 ways on the 64-row
# tile with a column tail and byte loads.
SAN_PY=$(mktemp -d)/san.py  # not under OUT_DIR: the device tool returns 8 files at most
cat > "$SAN_PY" <<'PY'
import os
import torch
import mmfree_ext  # noqa: F401
from mmfree_ext import reference as ref
CASES = [("sm90", "3", "auto", 200, 300, 2500), ("sm90", "8", "auto", 129, 8, 1100),
         ("auto", "off", "8", 3, 200, 100), ("auto", "off", "3", 40, 200, 6913)]
for gemm, sm90_split, split, m, n, k in CASES:
    os.environ.update(MMFREE_TERNARY_GEMM=gemm, MMFREE_TERNARY_SM90_SPLITK=sm90_split, MMFREE_TERNARY_SPLITK=split)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
    out = torch.ops.mmfree.ternary_matmul(x, torch.ones(m, device="cuda"), ref.pack_ternary(w),
                                          torch.ones((), device="cuda"), torch.float32)
    assert torch.equal(out.double(), torch.matmul(x.double(), w.double().t())), (gemm, sm90_split, split, m, n, k)
torch.cuda.synchronize()
print("san ok")
PY
SAN="compute-sanitizer --error-exitcode 9 --target-processes all"
step sanitize 70 bash -c "echo '== memcheck'; $SAN --tool memcheck python3 $SAN_PY; m=\$?; \
  echo '== racecheck'; $SAN --tool racecheck python3 $SAN_PY; r=\$?; echo \"memcheck rc=\$m racecheck rc=\$r\"; \
  [ \$m -eq 0 ] && [ \$r -eq 0 ]"
grep -hE "^== |ERROR SUMMARY|RACECHECK SUMMARY|hazard|san ok" "$OUT_DIR/sanitize.log" | head -10

# One log for both files (no test of test_ternary_cuda.py has "split" in its name).
step test_rest 70 $PYT tests/test_ternary_sm90_cuda.py tests/test_ternary_cuda.py -k "not split" || fails test_rest
echo "== summary ($SECONDS s)"; cat "$SUMMARY"
echo "== split-K table: us (bf16/ours); sk* = small-M split forced, sm90 = wgmma unsplit, sm90s* = wgmma split"
grep -A60 "^       K->N" "$OUT_DIR/bench.log" | head -50
