// Ternary weight quantization and packing (format: common/ternary_format.h).
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace mmfree {

// Latent float weight [rows, in_features] (contiguous) -> packed codes + scale.
struct TernaryQuantizeParams {
  const void* weight;
  DType weight_dtype;
  int64_t rows;
  int64_t in_features;
  uint8_t* packed;  // [rows, ternary::row_bytes(in_features)]
  float* scale;     // one element: max(mean|W|, 1e-5), written by the kernel
  double* workspace;  // CUDA only: kTernaryQuantizeWorkspace doubles for the reduction
};
constexpr int kTernaryQuantizeWorkspace = 512;

// Packed codes -> int8 weights [rows, in_features]. Reports invalid codes (3) instead of
// guessing: invalid_count gets the number of them (CPU: host pointer; CUDA: device pointer).
struct TernaryUnpackParams {
  const uint8_t* packed;
  int64_t rows;
  int64_t in_features;
  int8_t* out;
  int64_t* invalid_count;
};

namespace cpu {
void ternary_quantize(const TernaryQuantizeParams& p);
void ternary_unpack(const TernaryUnpackParams& p);
}  // namespace cpu

#if defined(MMFREE_WITH_CUDA)
namespace cuda {
cudaError_t ternary_quantize(const TernaryQuantizeParams& p, cudaStream_t stream);
cudaError_t ternary_unpack(const TernaryUnpackParams& p, cudaStream_t stream);
}  // namespace cuda
#endif

}  // namespace mmfree
