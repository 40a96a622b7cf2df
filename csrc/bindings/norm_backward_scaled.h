// The RMSNorm backward with its incoming gradient scaled as it is read, called directly by
// the BitLinear backward (ops_ternary.cpp): dX = (dY @ W_q) * w_scale reaches the norm as the
// unscaled product in x's dtype plus w_scale, so no pass scales and casts an fp32 [M, K]
// product first. Not an op: a C++ entry point of ops_norm.cpp for the CUDA build.
#pragma once

#include <tuple>

#include "bindings/checks.h"

namespace mmfree {
namespace binding {

#if defined(MMFREE_WITH_CUDA)
// (dx, dweight) of rms_norm for grad_y * grad_scale[0]; grad_scale: a 1-element fp32 CUDA
// tensor on x's device. Same checks and kernels as mmfree::rms_norm_backward.
std::tuple<Tensor, Tensor> rms_norm_backward_scaled(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                    double eps, const Tensor& grad_scale);
#endif

}  // namespace binding
}  // namespace mmfree
