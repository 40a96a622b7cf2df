// Argument checks and small adapters shared by the op bindings. Every check names the
// argument and says what was expected, so bad input fails with a clear RuntimeError. The
// texts are matched by the tests: keep them when porting or adding ops.
#pragma once

#include <string>

#include "bindings/torch_stable.h"
#include "common/dtype.h"

namespace mmfree {
namespace binding {

inline void check_defined(const Tensor& t, const char* name) {
  MMFREE_CHECK(t.defined(), "mmfree: argument '", name, "' is an undefined tensor");
}

inline void check_dtype(const Tensor& t, const char* name, ScalarType expected) {
  check_defined(t, name);
  MMFREE_CHECK(t.scalar_type() == expected, "mmfree: argument '", name, "' must have dtype ", expected, ", got ",
               t.scalar_type());
}

// float32, bfloat16, float16 (and float64 where allow_double).
inline void check_float(const Tensor& t, const char* name, bool allow_double = true) {
  check_defined(t, name);
  const auto s = t.scalar_type();
  const bool ok = s == kFloat || s == kBFloat16 || s == kHalf || (allow_double && s == kDouble);
  MMFREE_CHECK(ok, "mmfree: argument '", name, "' must be a floating tensor (float32, bfloat16, float16",
               allow_double ? ", float64" : "", "), got ", s);
}

inline void check_dim(const Tensor& t, const char* name, int64_t dim) {
  MMFREE_CHECK(t.dim() == dim, "mmfree: argument '", name, "' must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_contiguous(const Tensor& t, const char* name) {
  MMFREE_CHECK(t.is_contiguous(), "mmfree: argument '", name,
               "' must be contiguous (call .contiguous() first), got strides ", t.strides(), " for shape ", t.sizes());
}

inline void check_same_device(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  MMFREE_CHECK(t.device() == ref.device(), "mmfree: argument '", name, "' is on ", t.device(), " but '", ref_name,
               "' is on ", ref.device(), "; move them to one device");
}

inline void check_numel(const Tensor& t, const char* name, int64_t n) {
  MMFREE_CHECK(t.numel() == n, "mmfree: argument '", name, "' must have ", n, " element(s), got shape ", t.sizes());
}

inline DType to_dtype(ScalarType s) {
  switch (s) {
    case kFloat: return DType::kFloat32;
    case kBFloat16: return DType::kBFloat16;
    case kHalf: return DType::kFloat16;
    case kDouble: return DType::kFloat64;
    default: throw std::runtime_error(str("mmfree: unsupported dtype ", s));
  }
}

}  // namespace binding
}  // namespace mmfree
