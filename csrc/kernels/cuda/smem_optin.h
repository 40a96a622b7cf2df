// Opting a kernel into more than 48 KB of dynamic shared memory, once per device.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstdint>

namespace mmfree {
namespace cuda {

// Sets cudaFuncAttributeMaxDynamicSharedMemorySize for `kernel` on the current device the
// first time it is called there; `raised` (a static of the caller, one per kernel) records
// the devices done, so later calls -- including ones inside a CUDA graph capture, where
// the attribute call is not allowed -- skip it.
template <class Kernel>
cudaError_t raise_smem_once(Kernel kernel, int smem, std::atomic<uint64_t>& raised) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const uint64_t bit = dev < 64 ? uint64_t{1} << dev : 0;
  if (bit != 0 && (raised.load(std::memory_order_relaxed) & bit) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err == cudaSuccess) raised.fetch_or(bit, std::memory_order_relaxed);
  return err;
}

}  // namespace cuda
}  // namespace mmfree
