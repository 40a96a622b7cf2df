#!/usr/bin/env bash
# Issue 14's CPU measurements in one run, for a quiet machine (nothing else running: the
# 2-thread figures need both cores). Builds nothing: run after `make build`. Writes
# cpu_run.json (or $1) and prints a short table last (gemv, gemm, gemm_t = the training dX
# product, mlgru, norm, decode). About 4-7 minutes on 2 cores.
#
#   bash benchmarks/cpu_run.sh [out.json]
#
# ggml-python (llama.cpp's TQ2_0 baseline) is optional: `pip install ggml-python==0.0.45`
# (it compiles ggml, a few minutes); without it the ggml columns are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-${VENV:-.venv}/bin/python}
OUT=${1:-cpu_run.json}
PYTHONPATH=python timeout 900 "$PY" benchmarks/bench_cpu.py --json "$OUT" "${@:2}"
echo "wrote $OUT"
