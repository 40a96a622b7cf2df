// Baseline ternary matmul: one thread per output element, byte loads, int32 accumulation
// of x * (code - 1). Slow but alignment-free; the fast kernels are checked against it in
// the C++ benchmark, and ternary_matmul falls back to it for misaligned weight pointers.
#include "common/ternary_format.h"
#include "cuda/ternary/epilogue.cuh"
#include "cuda/ternary/launch.h"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {
namespace {

template <class T>
__global__ void simple_kernel(TernaryMatmulParams p) {
  const int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (idx >= p.M * p.N) return;
  const int64_t m = idx / p.N;
  const int64_t n = idx % p.N;
  const int8_t* x = p.x_q + m * p.x_row_stride;
  const uint8_t* w = p.packed + n * ternary::row_bytes(p.K);
  int32_t acc = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const int code = (w[ternary::byte_of(k)] >> ternary::shift_of(k)) & 3;
    acc += static_cast<int32_t>(x[k]) * (code - 1);
  }
  static_cast<T*>(p.out)[idx] = rescale<T>(acc, p.x_scale[m], *p.w_scale);
}

}  // namespace

cudaError_t launch_simple(const TernaryMatmulParams& p, cudaStream_t stream) {
  const int64_t total = p.M * p.N;
  if (total == 0) return cudaSuccess;
  MMFREE_TERNARY_DISPATCH_OUT(p.out_dtype, T, {
    simple_kernel<T><<<ceil_div(total, 256), 256, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
