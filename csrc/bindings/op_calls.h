// Calls from one op's binding into other mmfree ops through the dispatcher (so that the
// composed ops run the same CPU or CUDA kernels as the public ones), shared by the bindings
// that compose them. Each handle is looked up once.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

#include "bindings/checks.h"

namespace mmfree {
namespace binding {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

inline TensorPair call_rms_norm_quant(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::rms_norm_quant", "")
                       .typed<TensorPair(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, eps);
}

inline TensorPair call_quantize_ternary(const at::Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::quantize_ternary", "")
                       .typed<TensorPair(const at::Tensor&)>();
  return op.call(weight);
}

}  // namespace binding
}  // namespace mmfree
