# Locate the torch whose headers and C shims the bindings compile against. The bindings
# use only the LibTorch stable ABI, targeted at MMFREE_TORCH_TARGET (TORCH_TARGET_VERSION),
# so any torch >= that release can build them and every torch >= it can load the result:
# the build torch is not a runtime pin. Sets:
#   MMFREE_TORCH_VERSION, MMFREE_TORCH_CUDA (empty for a CPU build of torch),
#   MMFREE_TORCH_INCLUDE_DIRS, MMFREE_TORCH_LIB_DIR, MMFREE_TORCH_TARGET ("2.11"),
#   MMFREE_TORCH_TARGET_DEFINE (the TORCH_TARGET_VERSION value).
# Only the C shim libraries are linked (torch_cpu, and torch_cuda for the CUDA kernels'
# current-stream shim), never TorchConfig's C++ targets.

find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)

set(MMFREE_TORCH_TARGET "2.11" CACHE STRING "Oldest torch release the built extension loads into (stable ABI target)")

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, os; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(torch.__file__))"
  OUTPUT_VARIABLE _mmfree_torch_out
  RESULT_VARIABLE _mmfree_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _mmfree_torch_rc EQUAL 0)
  message(FATAL_ERROR "mmfree-ext: cannot import torch with ${Python_EXECUTABLE}. `pip install .` gets it as a "
                      "build requirement; with --no-build-isolation install torch>=${MMFREE_TORCH_TARGET} first.")
endif()
string(REPLACE "\n" ";" _mmfree_torch_out "${_mmfree_torch_out}")
list(GET _mmfree_torch_out 0 MMFREE_TORCH_VERSION)
list(GET _mmfree_torch_out 1 MMFREE_TORCH_CUDA)
list(GET _mmfree_torch_out 2 _mmfree_torch_dir)

if(MMFREE_TORCH_VERSION VERSION_LESS MMFREE_TORCH_TARGET)
  message(FATAL_ERROR "mmfree-ext: torch ${MMFREE_TORCH_VERSION} is older than the stable-ABI target ${MMFREE_TORCH_TARGET}")
endif()
string(REPLACE "." ";" _mmfree_target_parts "${MMFREE_TORCH_TARGET}")
list(GET _mmfree_target_parts 0 _mmfree_target_major)
list(GET _mmfree_target_parts 1 _mmfree_target_minor)
math(EXPR MMFREE_TORCH_TARGET_DEFINE "(${_mmfree_target_major} << 56) | (${_mmfree_target_minor} << 48)" OUTPUT_FORMAT HEXADECIMAL)

set(MMFREE_TORCH_INCLUDE_DIRS "${_mmfree_torch_dir}/include")
set(MMFREE_TORCH_LIB_DIR "${_mmfree_torch_dir}/lib")
find_library(MMFREE_TORCH_CPU_LIB NAMES torch_cpu PATHS "${MMFREE_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
message(STATUS "mmfree-ext: torch ${MMFREE_TORCH_VERSION} (CUDA: '${MMFREE_TORCH_CUDA}') at ${_mmfree_torch_dir}, "
               "stable ABI target ${MMFREE_TORCH_TARGET} (${MMFREE_TORCH_TARGET_DEFINE})")
