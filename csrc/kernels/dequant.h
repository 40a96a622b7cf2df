// Dequantization of per-row int8 activations: out[r, i] = x_q[r, i] * x_scale[r], computed in
// fp32 and rounded once to the output dtype (what at::mul(x_q, x_scale[:, None]) gives in
// that dtype, bit for bit). BitLinear's dW product feeds cuBLAS an [M, K] operand in dY's
// dtype from the int8 activations the forward saved; this is that one pass.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace mmfree {

struct DequantRowsParams {
  const int8_t* x_q;     // [rows, k], contiguous
  const float* x_scale;  // [rows]
  int64_t rows;
  int64_t k;
  DType out_dtype;
  void* out;  // [rows, k] in out_dtype
};

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t dequantize_rows(const DequantRowsParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
