# Locate the installed torch through the Python interpreter that runs the build, and
# record what it was built with. Sets:
#   MMFREE_TORCH_VERSION, MMFREE_TORCH_CUDA (empty for a CPU build of torch),
#   MMFREE_TORCH_INCLUDE_DIRS, MMFREE_TORCH_LIBS (list of library files to link),
#   MMFREE_TORCH_CXX_FLAGS.
# We link torch's libraries by file instead of through TorchConfig's imported targets:
# those pull in nvrtc and run FindCUDA, neither of which this extension needs.

find_package(Python 3.9 REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, os; print(torch.__version__); print(torch.version.cuda or ''); print(os.path.dirname(torch.__file__)); print(int(torch._C._GLIBCXX_USE_CXX11_ABI))"
  OUTPUT_VARIABLE _mmfree_torch_out
  RESULT_VARIABLE _mmfree_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _mmfree_torch_rc EQUAL 0)
  message(FATAL_ERROR "mmfree-ext: cannot import torch with ${Python_EXECUTABLE}. Install torch first "
                      "and build with `pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _mmfree_torch_out "${_mmfree_torch_out}")
list(GET _mmfree_torch_out 0 MMFREE_TORCH_VERSION)
list(GET _mmfree_torch_out 1 MMFREE_TORCH_CUDA)
list(GET _mmfree_torch_out 2 _mmfree_torch_dir)
list(GET _mmfree_torch_out 3 _mmfree_torch_abi)

set(MMFREE_TORCH_INCLUDE_DIRS
  "${_mmfree_torch_dir}/include"
  "${_mmfree_torch_dir}/include/torch/csrc/api/include")
set(MMFREE_TORCH_LIB_DIR "${_mmfree_torch_dir}/lib")
set(MMFREE_TORCH_CXX_FLAGS "-D_GLIBCXX_USE_CXX11_ABI=${_mmfree_torch_abi}")

set(MMFREE_TORCH_LIBS "")
foreach(_lib c10 torch_cpu torch)
  find_library(_mmfree_lib_${_lib} NAMES ${_lib} PATHS "${MMFREE_TORCH_LIB_DIR}" NO_DEFAULT_PATH REQUIRED)
  list(APPEND MMFREE_TORCH_LIBS "${_mmfree_lib_${_lib}}")
endforeach()
message(STATUS "mmfree-ext: torch ${MMFREE_TORCH_VERSION} (CUDA: '${MMFREE_TORCH_CUDA}') at ${_mmfree_torch_dir}")
