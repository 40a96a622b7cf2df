// Per-row absmax int8 quantization (SwitchBack-style), the dY operand of BitLinear's opt-in
// int8 dX: for each row r of g [rows, cols],
//   s[r] = max_i |g[r, i]| / 127          (IEEE division; 1 where that is 0: an all-zero row,
//                                          or fp32 subnormals below 127 * 2^-149, coded 0)
//   q[r, i] = round_half_even(g[r, i] / s[r]) clamped to [-127, 127]
// A row holding a NaN or an inf gets s = NaN and all codes 0, so everything computed from
// it is NaN (docs/numerics.md: a non-finite value is never hidden behind a finite scale).
// One pass of reads for the max and one for the codes; on CUDA one block per row, the second
// read served from L2.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace mmfree {

struct QuantRowsParams {
  const void* in;  // [rows, cols], contiguous
  DType in_dtype;  // float32, bfloat16 or float16
  int64_t rows;
  int64_t cols;
  int8_t* q;      // [rows, cols]
  float* scale;   // [rows]
};

namespace cpu {
void quantize_rows_int8(const QuantRowsParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t quantize_rows_int8(const QuantRowsParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
