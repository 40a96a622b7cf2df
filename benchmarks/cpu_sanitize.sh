#!/usr/bin/env bash
# The CPU kernels and bindings under AddressSanitizer + UndefinedBehaviorSanitizer.
#
# Builds the extension CPU-only with -DMMFREE_SANITIZE=address;undefined into build/asan
# (the in-place python/mmfree_ext/_C stays untouched), copies the Python package with that
# _C into a scratch folder, and runs the CPU tests there. python and torch are not
# instrumented, so libasan/libubsan are preloaded; leak checking is off (the interpreter's
# own allocations would swamp it). Any report fails the run (halt_on_error).
#
#   benchmarks/cpu_sanitize.sh [pytest args...]      (default: the CPU op and fuzz tests)
#   PYTHON=/path/to/python JOBS=2 benchmarks/cpu_sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
JOBS=${JOBS:-$(nproc)}
BUILD=${BUILD:-build/asan}
SCRATCH=${SCRATCH:-$BUILD/pkg}

cmake -S . -B "$BUILD" -G Ninja -DPython_EXECUTABLE="$(command -v "$PYTHON")" -DMMFREE_ENABLE_CUDA=OFF \
  -DMMFREE_COPY_TO_SOURCE=OFF -DMMFREE_BUILD_BENCHMARKS=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DMMFREE_SANITIZE=address;undefined" > "$BUILD.configure.log"
cmake --build "$BUILD" -j "$JOBS"

rm -rf "$SCRATCH" && mkdir -p "$SCRATCH"
cp -r python/mmfree_ext "$SCRATCH/"
rm -f "$SCRATCH"/mmfree_ext/_C*.so
cp "$BUILD"/_C*.so "$SCRATCH/mmfree_ext/"

CXX=${CXX:-c++}
LIBASAN=$($CXX -print-file-name=libasan.so)
LIBUBSAN=$($CXX -print-file-name=libubsan.so)
export LD_PRELOAD="$LIBASAN:$LIBUBSAN"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export PYTHONPATH="$SCRATCH"
if [ $# -eq 0 ]; then
  set -- tests/test_pack.py tests/test_norm.py tests/test_ternary.py tests/test_mlgru.py tests/test_numerics_policy.py \
    tests/test_fuzz_norm.py tests/test_fuzz_ternary.py tests/test_fuzz_mlgru.py tests/test_concurrency.py \
    tests/test_large_index.py
fi
"$PYTHON" -c "import mmfree_ext, sys; print('sanitized build:', mmfree_ext.__file__, file=sys.stderr)"
exec "$PYTHON" -m pytest -q -p no:cacheprovider -m "not cuda" "$@"
