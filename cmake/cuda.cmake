# Decide whether to build the CUDA kernels, and configure the CUDA language if so.
# CUDA is built when MMFREE_ENABLE_CUDA is on, a CUDA compiler is found and the installed
# torch is a CUDA build; otherwise the build is CPU-only and says why. Sets MMFREE_WITH_CUDA.

set(MMFREE_WITH_CUDA OFF)
set(MMFREE_CUDA_SKIP_REASON "")

if(NOT MMFREE_ENABLE_CUDA)
  set(MMFREE_CUDA_SKIP_REASON "MMFREE_ENABLE_CUDA=OFF")
elseif(MMFREE_TORCH_CUDA STREQUAL "")
  set(MMFREE_CUDA_SKIP_REASON "the installed torch is a CPU-only build")
else()
  # /usr/local/bin/nvcc is often a shell wrapper; CMake must see the real toolkit so that
  # it finds the headers and libraries beside the compiler.
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    if(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "$ENV{CUDA_HOME}/bin/nvcc")
    elseif(EXISTS "/usr/local/cuda/bin/nvcc")
      set(CMAKE_CUDA_COMPILER "/usr/local/cuda/bin/nvcc")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MMFREE_WITH_CUDA ON)
  else()
    set(MMFREE_CUDA_SKIP_REASON "no CUDA compiler (nvcc) found")
  endif()
endif()

if(MMFREE_WITH_CUDA)
  if(NOT CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES ${MMFREE_CUDA_ARCHS})
  endif()
  # Link the shared runtime: torch loads libcudart.so.13 already, and one runtime per
  # process keeps streams and errors in one place.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  string(APPEND CMAKE_CUDA_FLAGS " --expt-relaxed-constexpr -lineinfo")
  message(STATUS "mmfree-ext: building CUDA kernels for archs ${CMAKE_CUDA_ARCHITECTURES} with ${CMAKE_CUDA_COMPILER}")
else()
  message(STATUS "mmfree-ext: CUDA kernels skipped: ${MMFREE_CUDA_SKIP_REASON}")
endif()
