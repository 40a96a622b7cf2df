// Output rescale shared by the ternary matmul kernels, in the reference's order:
// out = (float(acc) * x_scale[m]) * w_scale, rounded once to the output type.
#pragma once

#include "cuda/common.cuh"

namespace mmfree {
namespace cuda {
namespace ternary_kernels {

template <class T>
__device__ __forceinline__ T rescale(int32_t acc, float x_scale, float w_scale) {
  // Two separate products (no FMA can form): bit-identical to the CPU and the reference.
  const float y = __fmul_rn(__fmul_rn(__int2float_rn(acc), x_scale), w_scale);
  return from_float<T>(y);
}

// The output types the op supports; others are rejected with cudaErrorInvalidValue.
#define MMFREE_TERNARY_DISPATCH_OUT(dtype, T, ...)                                    \
  switch (dtype) {                                                                    \
    case ::mmfree::DType::kFloat32: { using T = float; __VA_ARGS__; break; }          \
    case ::mmfree::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case ::mmfree::DType::kFloat16: { using T = __half; __VA_ARGS__; break; }         \
    default: return cudaErrorInvalidValue;                                            \
  }

}  // namespace ternary_kernels
}  // namespace cuda
}  // namespace mmfree
