// Small helpers shared by the CUDA kernels (torch-free).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace mmfree {
namespace cuda {

template <class T> struct TypeOf;
template <> struct TypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <> struct TypeOf<double> { static constexpr DType value = DType::kFloat64; };
template <> struct TypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };
template <> struct TypeOf<__half> { static constexpr DType value = DType::kFloat16; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(double v) { return static_cast<float>(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_float<double>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Runs the statements with `T` bound to the C++ type of `dtype`; an unknown dtype makes the
// enclosing launcher return cudaErrorInvalidValue (the torch layer checks dtypes first).
#define MMFREE_DISPATCH_FLOAT(dtype, T, ...)                                  \
  switch (dtype) {                                                          \
    case ::mmfree::DType::kFloat32: { using T = float; __VA_ARGS__; break; }         \
    case ::mmfree::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    case ::mmfree::DType::kFloat16: { using T = __half; __VA_ARGS__; break; }        \
    case ::mmfree::DType::kFloat64: { using T = double; __VA_ARGS__; break; }        \
    default: return cudaErrorInvalidValue;                                  \
  }

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace mmfree
