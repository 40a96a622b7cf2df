// Dequantization passes of the BitLinear backward, each one vectorized pass computed in fp32 and
// rounded once to the output dtype (bit for bit what at::mul gives in that dtype):
// * dequantize_rows: out[r, i] = x_q[r, i] * x_scale[r], the int8 activations the forward
//   saved, as the [M, K] operand in dY's dtype that cuBLAS takes for dW;
// * scale_cast: out[i] = in[i] * scale[0] (a device scalar, no host sync), the fp32 dX
//   product of the decoded-panel path times w_scale, into x's dtype, when dY's dtype is not
//   x's (with one dtype, the training step's case, the RMSNorm backward applies w_scale as
//   it reads the unscaled product: RmsNormBackwardParams::grad_scale).
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

struct ScaleCastParams {
  const float* in;     // [n], contiguous
  const float* scale;  // one element, on the device
  int64_t n;
  DType out_dtype;
  void* out;  // [n] in out_dtype
};

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t dequantize_rows(const DequantRowsParams& p, cudaStream_t stream);
cudaError_t scale_cast(const ScaleCastParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
