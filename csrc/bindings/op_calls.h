// Calls from one op's binding into other mmfree ops through the dispatcher (so that the
// composed ops run the same CPU or CUDA kernels as the public ones), shared by the bindings
// that compose them. They go through call_op (torch_stable.h), the stable dispatcher shim.
#pragma once

#include <tuple>

#include "bindings/checks.h"

namespace mmfree {
namespace binding {

using TensorPair = std::tuple<Tensor, Tensor>;

inline TensorPair call_rms_norm_quant(const Tensor& x, const Tensor& weight, double eps) {
  auto r = call_op<2>("mmfree::rms_norm_quant", "", x, weight, eps);
  return {take(r[0]), take(r[1])};
}

inline TensorPair call_quantize_ternary(const Tensor& weight) {
  auto r = call_op<2>("mmfree::quantize_ternary", "", weight);
  return {take(r[0]), take(r[1])};
}

}  // namespace binding
}  // namespace mmfree
