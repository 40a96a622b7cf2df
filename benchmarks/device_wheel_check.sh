#!/usr/bin/env bash
# Cross-version proof on the GPU machine (issue 15): a wheel built elsewhere against torch
# 2.14 (stable ABI, target 2.11) installs into this machine's system python3 (torch 2.11)
# and passes the CUDA tests, run from outside the source tree against the installed wheel.
#
# Preparing it on the CPU machine (a cp312 wheel: the GPU machine's python3 is 3.12):
#   rm -rf /work/main/.devscratch/abi2
#   make wheel VENV=/work/wt/abi-py312-venv DIST=/work/main/.devscratch/abi2/whl   # torch 2.14 there
#   cp -r tests pyproject.toml /work/main/.devscratch/abi2/
#   mkdir -p /work/main/.devscratch/abi2/benchmarks && cp benchmarks/device_wheel_check.sh "$_"
# then on the device (carry .devscratch/abi2):
#   cd .devscratch/abi2 && PYTEST_TIMEOUT=300 bash benchmarks/device_wheel_check.sh whl
#
# Usage (from a directory holding tests/ and pyproject.toml: the repository root, or a copy):
#   bash benchmarks/device_wheel_check.sh <dir holding mmfree_ext-*-cp312-*.whl> [pytest args...]
# Env: OUT (where the log, JUnit XML and counts go; a temp dir if unset), PYTEST_TIMEOUT
# (seconds for the pytest run, default 60; on expiry pytest is interrupted and still reports),
# EXTRA_SITE (a directory of test dependencies for this python, e.g. hypothesis, appended
# to PYTHONPATH; without hypothesis the fuzz modules are left out, and the log says so).
set -euo pipefail
wheel_dir=${1:?usage: device_wheel_check.sh <wheel dir> [pytest args...]}
shift
wheel=$(ls "$wheel_dir"/mmfree_ext-*.whl | head -n 1)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d /tmp/mmfree-wheel-check.XXXXXX)  # holds no python/mmfree_ext
cp -r tests pyproject.toml "$work/"

echo "=== wheel: $wheel ($(du -h "$wheel" | cut -f1))" | tee "$out/wheel_check.log"
python3 -m pip install -q --no-deps --no-index --force-reinstall --target "$work/site" "$wheel"

cd "$work"
export PYTHONPATH="$work/site${EXTRA_SITE:+:$EXTRA_SITE}"
python3 - 2>&1 <<'PYEOF' | tee -a "$out/wheel_check.log"
import os
import torch
import mmfree_ext
info = mmfree_ext.build_info()
print("torch", torch.__version__, "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("mmfree_ext.__file__", mmfree_ext.__file__)
print({k: info[k] for k in ("torch_version", "torch_target_version", "cuda_archs", "cuda_loaded", "cuda_skip_reason")})
assert mmfree_ext.__file__.startswith(os.environ["PYTHONPATH"].split(":")[0]), "not the installed wheel"
assert info["cuda_loaded"] and mmfree_ext.cuda_available(), "the CUDA kernels did not load: CUDA tests would skip"
PYEOF
ignore=()
if ! python3 -c "import hypothesis" 2>/dev/null; then  # the fuzz suite needs it
  echo "note: no hypothesis here: tests/test_fuzz_*.py left out (set EXTRA_SITE to run them)" | tee -a "$out/wheel_check.log"
  for f in tests/test_fuzz_*.py; do ignore+=("--ignore=$f"); done
fi
rc=0
# -v streams one line per test into the log, so the counts survive a run that the timeout
# has to kill (a long CUDA op can outlast SIGINT, and then no JUnit XML is written).
timeout -s INT -k 15 "${PYTEST_TIMEOUT:-60}" python3 -m pytest -v -ra -p no:cacheprovider -m cuda \
  "${ignore[@]}" tests --junitxml="$out/wheel_check.xml" "$@" >>"$out/wheel_check.log" 2>&1 || rc=$?
grep -E "(FAILED|ERROR)( |$)" "$out/wheel_check.log" | grep "::" | head -40 || true
tail -n 25 "$out/wheel_check.log"
echo "pytest exit status: $rc (124/130 or 2 after a timeout: interrupted)" | tee -a "$out/wheel_check.log"
# A run where every CUDA test skipped proves nothing: demand passes and no failures.
python3 - "$out/wheel_check.xml" "$out/wheel_check.log" <<'PYEOF' | tee "$out/wheel_check_counts.txt"
import os
import re
import sys
import xml.etree.ElementTree as ET
xml, log = sys.argv[1], sys.argv[2]
if os.path.exists(xml):
    s = ET.parse(xml).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    tests, fail, err, skip = (int(s.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    passed, src = tests - fail - err - skip, "JUnit XML"
else:  # killed: count the -v lines of the tests that finished
    outcome = re.compile(r"^tests/.*::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
    counts = {}
    for line in open(log, errors="replace"):
        m = outcome.search(line)
        if m:
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    passed, fail, err, skip = (counts.get(k, 0) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED"))
    tests, src = sum(counts.values()), "the -v log (run killed before its report)"
print(f"CUDA tests (installed wheel): {passed} passed, {fail} failed, {err} errors, {skip} skipped of {tests} run"
      f" (from {src})")
sys.exit(0 if passed > 0 and fail + err == 0 else 1)
PYEOF
