// The GLU's activation: y = silu(u[.., :I]) * u[.., I:] and its backward.
//
// Rounding follows the reference (python/mmfree_ext/reference.py, `F.silu(gate) * v` in u's
// dtype): the forward computes silu in fp32, rounds it to u's dtype, multiplies by v in fp32
// and rounds again. The backward computes both input gradients in fp32 from fp32 copies of
// dy, gate and v and rounds once:
//   s = sigmoid(gate);  d_gate = dy * v * s * (1 + gate * (1 - s));  d_v = dy * gate * s.
// float64 computes in fp64 throughout (gradcheck is exact).
//
// Tensors are contiguous: u and grad_u [rows, 2I], y and dy [rows, I], all of one dtype.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

struct SiluMulParams {
  const void* u;  // [rows, 2 * inter]
  void* y;        // [rows, inter]
  DType dtype;
  int64_t rows;
  int64_t inter;
};

struct SiluMulBackwardParams {
  const void* dy;  // [rows, inter]
  const void* u;   // [rows, 2 * inter]
  void* du;        // [rows, 2 * inter]
  DType dtype;
  int64_t rows;
  int64_t inter;
};

namespace cpu {
void silu_mul(const SiluMulParams& p);
void silu_mul_backward(const SiluMulBackwardParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t silu_mul(const SiluMulParams& p, cudaStream_t stream);
cudaError_t silu_mul_backward(const SiluMulBackwardParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
