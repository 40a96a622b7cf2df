#!/usr/bin/env bash
# The benchmark half of a GPU session (after device_run.sh built into build/gpu): every
# C++ benchmark binary (old and new kernel versions side by side), the Python benchmarks
# with their baselines, the model throughput, and the demo. Each step is time-boxed so the
# whole call fits one device command; logs are tarred into $OUT/bench.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mmfree-out}
LOG=/tmp/mmfree-bench; rm -rf "$LOG"; mkdir -p "$LOG" "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
BIN=build/gpu/benchmarks/cpp
run() {  # run <seconds> <name> <command...>
  local secs=$1 name=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$secs" "$@" > "$LOG/$name.log" 2>&1
  echo "rc=$?" >> "$LOG/$name.log"
  grep -v -E "^(JSON|PASS )" "$LOG/$name.log" | tail -${TAIL:-60}
  tar czf "$OUT/bench.tgz" -C "$LOG" .  # after every step, in case the call runs out of time
}
TAIL=40 run 170 model      python3 benchmarks/bench_model.py --device cuda --json "$LOG/model.json"
TAIL=70 run 120 ternary_bin "$BIN/bench_ternary_cuda"
TAIL=30 run 90  ternary_t_bin "$BIN/bench_ternary_t_cuda"
TAIL=25 run 90  train_py    python3 benchmarks/bench_train_cuda.py --json "$LOG/train_cuda.json"
TAIL=40 run 60  norm_bin    "$BIN/bench_norm" cuda
TAIL=40 run 90  mlgru_bin   "$BIN/bench_mlgru"
TAIL=30 run 90  ternary_py  python3 benchmarks/bench_ternary_cuda.py --device cuda --quick --json "$LOG/ternary_cuda.json"
TAIL=30 run 90  mlgru_py    python3 benchmarks/bench_mlgru.py --device cuda --json "$LOG/mlgru.json"
TAIL=30 run 60  norm_py     python3 benchmarks/bench_norm.py --device cuda --json "$LOG/norm.json"
TAIL=25 run 90  demo        python3 -m mmfree_ext demo --seconds 25
tar czf "$OUT/bench.tgz" -C "$LOG" .
