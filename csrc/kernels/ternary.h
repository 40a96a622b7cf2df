// Ternary matrix product: int8 activations x packed ternary weights -> rescaled output.
//   acc[m, n] = sum_k x_q[m, k] * w[n, k]          (exact int32; w in {-1, 0, +1})
//   out[m, n] = (float(acc) * x_scale[m]) * w_scale  cast to out_dtype (round to nearest even)
// Weights are in the canonical packed format (common/ternary_format.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

struct TernaryMatmulParams {
  const int8_t* x_q;      // [M, K], rows x_row_stride elements apart (>= K), contiguous along K
  int64_t x_row_stride;
  const float* x_scale;   // [M] dequantization multipliers of the activation rows
  const uint8_t* packed;  // [N, ternary::row_bytes(K)]
  const float* w_scale;   // one element (same device as the data)
  void* out;              // [M, N] contiguous, out_dtype
  DType out_dtype;
  int64_t M, N, K;
};

// Transposed product for the straight-through backward of BitLinear (SPEC.md section 1):
//   out[m, k] = sum_n grad[m, n] * (w[n, k] * w_scale)     (fp32 accumulation)
// read directly from the packed weights: no float copy of W is ever materialized (the CPU
// kernel decodes one L2-sized panel of W at a time).
struct TernaryMatmulTParams {
  const float* grad;      // [M, N] contiguous
  const uint8_t* packed;  // [N, ternary::row_bytes(K)]
  const float* w_scale;   // one element
  float* out;             // [M, K] contiguous
  int64_t M, N, K;
};

namespace cpu {
void ternary_matmul(const TernaryMatmulParams& p);
void ternary_matmul_t(const TernaryMatmulTParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t ternary_matmul(const TernaryMatmulParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
