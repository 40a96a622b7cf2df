// Argument checks and small adapters shared by the op bindings. Every check names the
// argument and says what was expected, so bad input fails with a clear RuntimeError.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <string>

#include "common/dtype.h"

#if defined(MMFREE_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mmfree {
namespace binding {

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "mmfree: argument '", name, "' is an undefined tensor");
}

inline void check_dtype(const at::Tensor& t, const char* name, at::ScalarType expected) {
  check_defined(t, name);
  TORCH_CHECK(t.scalar_type() == expected, "mmfree: argument '", name, "' must have dtype ", expected,
              ", got ", t.scalar_type());
}

// float32, bfloat16, float16 (and float64 where allow_double).
inline void check_float(const at::Tensor& t, const char* name, bool allow_double = true) {
  check_defined(t, name);
  const auto s = t.scalar_type();
  const bool ok = s == at::kFloat || s == at::kBFloat16 || s == at::kHalf || (allow_double && s == at::kDouble);
  TORCH_CHECK(ok, "mmfree: argument '", name, "' must be a floating tensor (float32, bfloat16, float16",
              allow_double ? ", float64" : "", "), got ", s);
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "mmfree: argument '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "mmfree: argument '", name,
              "' must be contiguous (call .contiguous() first), got strides ", t.strides(), " for shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "mmfree: argument '", name, "' is on ", t.device(), " but '", ref_name,
              "' is on ", ref.device(), "; move them to one device");
}

inline void check_numel(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK(t.numel() == n, "mmfree: argument '", name, "' must have ", n, " element(s), got shape ", t.sizes());
}

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "mmfree: unsupported dtype ", s);
  }
}

#if defined(MMFREE_WITH_CUDA)
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

#define MMFREE_CUDA_CHECK(expr)                                                                \
  do {                                                                                         \
    const cudaError_t mmfree_err_ = (expr);                                                    \
    TORCH_CHECK(mmfree_err_ == cudaSuccess, "mmfree: CUDA error in ", #expr, ": ",             \
                cudaGetErrorString(mmfree_err_));                                              \
  } while (0)
#endif

}  // namespace binding
}  // namespace mmfree
