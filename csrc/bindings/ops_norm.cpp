// Bindings of the fused RMSNorm ops: rms_norm_quant(_multi), rms_norm (+ residual),
// rms_norm_swish_gate(_quant) and the backward passes.
#include <vector>

#include "bindings/checks.h"
#include "bindings/norm_backward_scaled.h"
#include "norm.h"

namespace mmfree {
namespace binding {
namespace {

// The row input: a float tensor of >= 1 dims with a non-empty last dim, contiguous.
int64_t check_rows_input(const Tensor& x, const char* name) {
  check_float(x, name);
  MMFREE_CHECK(x.dim() >= 1, "mmfree: argument '", name, "' must have at least 1 dimension [..., K], got a 0-D tensor");
  check_contiguous(x, name);
  MMFREE_CHECK(size_at(x, -1) >= 1, "mmfree: argument '", name, "' must have a non-empty last dimension K, got shape ",
              x.sizes());
  return size_at(x, -1);
}

// A companion of the row input: same dtype, shape and device, contiguous.
void check_like(const Tensor& t, const char* name, const Tensor& x, const char* x_name) {
  check_defined(t, name);
  check_same_device(t, name, x, x_name);
  MMFREE_CHECK(t.scalar_type() == x.scalar_type(), "mmfree: argument '", name, "' must have the dtype of '", x_name,
              "' (", x.scalar_type(), "), got ", t.scalar_type());
  MMFREE_CHECK(t.sizes().equals(x.sizes()), "mmfree: argument '", name, "' must have the shape of '", x_name, "' ",
              x.sizes(), ", got ", t.sizes());
  check_contiguous(t, name);
}

void check_weight(const Tensor& w, const char* name, int64_t k, const Tensor& x, const char* x_name) {
  check_float(w, name);
  check_same_device(w, name, x, x_name);
  MMFREE_CHECK(w.dim() == 1 && w.size(0) == k, "mmfree: argument '", name, "' must be 1-D of size K=", k,
              " (the last dimension of '", x_name, "'), got shape ", w.sizes());
  check_contiguous(w, name);
}

int64_t rows_of(const Tensor& x) { return x.numel() / size_at(x, -1); }

std::vector<int64_t> lead_shape(const Tensor& x) {
  std::vector<int64_t> s = sizes_vec(x);
  s.pop_back();
  return s;
}

#if defined(MMFREE_WITH_CUDA)
// The CUDA kernels read weights in the input dtype or fp32; other mixes go through fp32.
Tensor cuda_weight(const Tensor& w, const Tensor& x) {
  return (w.scalar_type() == x.scalar_type() || w.scalar_type() == kFloat) ? w : to(w, kFloat);
}
#endif

std::tuple<Tensor, Tensor> quant_impl(const Tensor& x, Tensor weights, double eps, bool multi) {
  const int64_t k = check_rows_input(x, "x");
  int64_t num_w = 1;
  if (multi) {
    check_float(weights, "weights");
    check_same_device(weights, "weights", x, "x");
    MMFREE_CHECK(weights.dim() == 2 && weights.size(0) >= 1 && weights.size(1) == k,
                "mmfree: argument 'weights' must be 2-D [P, K] with P >= 1 and K=", k,
                " (the last dimension of 'x'), got shape ", weights.sizes());
    check_contiguous(weights, "weights");
    num_w = weights.size(0);
  } else {
    check_weight(weights, "weight", k, x, "x");
  }
  std::vector<int64_t> q_shape = sizes_vec(x);
  std::vector<int64_t> s_shape = lead_shape(x);
  if (multi) {
    q_shape.insert(q_shape.begin(), num_w);
    s_shape.insert(s_shape.begin(), num_w);
  }
  Tensor x_q = empty(q_shape, kChar, x);
  Tensor x_scale = empty(s_shape, kFloat, x);
  const int64_t rows = rows_of(x);
  if (rows == 0) return {x_q, x_scale};
#if defined(MMFREE_WITH_CUDA)
  if (x.is_cuda()) weights = cuda_weight(weights, x);
#endif
  RmsNormQuantParams p{x.data_ptr(), to_dtype(x.scalar_type()), weights.data_ptr(), to_dtype(weights.scalar_type()),
                       num_w, rows, k, static_cast<float>(eps), x_q.mutable_data_ptr<int8_t>(), x_scale.mutable_data_ptr<float>()};
  if (x.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x);
    MMFREE_CUDA_CHECK(cuda::rms_norm_quant(p, current_stream(x)));
#endif
  } else {
    cpu::rms_norm_quant(p);
  }
  return {x_q, x_scale};
}

std::tuple<Tensor, Tensor> rms_norm_quant_impl(const Tensor& x, const Tensor& weight, double eps) {
  return quant_impl(x, weight, eps, false);
}

std::tuple<Tensor, Tensor> rms_norm_quant_multi_impl(const Tensor& x, const Tensor& weights,
                                                              double eps) {
  return quant_impl(x, weights, eps, true);
}

std::tuple<Tensor, Tensor> rms_norm_impl(const Tensor& x, const Tensor& weight_in, double eps,
                                                 const std::optional<Tensor>& residual) {
  const int64_t k = check_rows_input(x, "x");
  check_weight(weight_in, "weight", k, x, "x");
  if (residual.has_value()) check_like(*residual, "residual", x, "x");
  Tensor y = torch::stable::empty_like(x);
  Tensor residual_out = torch::stable::empty_like(x);
  const int64_t rows = rows_of(x);
  if (rows == 0) return {y, residual_out};
  Tensor weight = weight_in;
#if defined(MMFREE_WITH_CUDA)
  if (x.is_cuda()) weight = cuda_weight(weight_in, x);
#endif
  RmsNormParams p{x.data_ptr(), residual.has_value() ? residual->data_ptr() : nullptr, to_dtype(x.scalar_type()),
                  weight.data_ptr(), to_dtype(weight.scalar_type()), rows, k, static_cast<float>(eps),
                  y.data_ptr(), residual_out.data_ptr()};
  if (x.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x);
    MMFREE_CUDA_CHECK(cuda::rms_norm(p, current_stream(x)));
#endif
  } else {
    cpu::rms_norm(p);
  }
  return {y, residual_out};
}

// grad_scale (CUDA only, may be null): a device fp32 scalar multiplying grad_y as it is read.
std::tuple<Tensor, Tensor> norm_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, double eps,
                                         const std::optional<Tensor>& residual,
                                         const std::optional<Tensor>& grad_residual, const Tensor* grad_scale) {
  const int64_t k = check_rows_input(x, "x");
  check_weight(weight, "weight", k, x, "x");
  check_like(grad_y, "grad_y", x, "x");
  if (residual.has_value()) check_like(*residual, "residual", x, "x");
  if (grad_residual.has_value()) check_like(*grad_residual, "grad_residual", x, "x");
  Tensor dx = torch::stable::empty_like(x);
  Tensor dweight = torch::stable::empty_like(weight);
  const int64_t rows = rows_of(x);
  RmsNormBackwardParams p{grad_y.data_ptr(),
                          x.data_ptr(),
                          residual.has_value() ? residual->data_ptr() : nullptr,
                          grad_residual.has_value() ? grad_residual->data_ptr() : nullptr,
                          to_dtype(x.scalar_type()),
                          weight.data_ptr(),
                          to_dtype(weight.scalar_type()),
                          rows,
                          k,
                          static_cast<float>(eps),
                          dx.data_ptr(),
                          dweight.data_ptr(),
                          nullptr};
  if (x.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x);
    if (grad_scale != nullptr) p.grad_scale = ptr<float>(*grad_scale);
    Tensor ws = empty({std::max<int64_t>(norm_backward_partial_rows(rows), 1), k}, x.scalar_type() == kDouble ? kDouble : kFloat, x);
    p.dweight_partial = ws.data_ptr();
    MMFREE_CUDA_CHECK(cuda::rms_norm_backward(p, current_stream(x)));
#endif
  } else {
    MMFREE_CHECK(grad_scale == nullptr, "mmfree: the scaled rms_norm backward is CUDA only");
    cpu::rms_norm_backward(p);
  }
  return {dx, dweight};
}

std::tuple<Tensor, Tensor> rms_norm_backward_impl(const Tensor& grad_y, const Tensor& x,
                                                          const Tensor& weight, double eps,
                                                          const std::optional<Tensor>& residual,
                                                          const std::optional<Tensor>& grad_residual) {
  return norm_backward(grad_y, x, weight, eps, residual, grad_residual, nullptr);
}

void check_gate_inputs(const Tensor& g, const Tensor& h, const Tensor& weight, int64_t* k) {
  *k = check_rows_input(g, "g");
  check_like(h, "h", g, "g");
  check_weight(weight, "weight", *k, g, "g");
}

Tensor rms_norm_swish_gate_impl(const Tensor& g, const Tensor& h, const Tensor& weight_in, double eps) {
  int64_t k = 0;
  check_gate_inputs(g, h, weight_in, &k);
  Tensor y = torch::stable::empty_like(g);
  const int64_t rows = rows_of(g);
  if (rows == 0) return y;
  Tensor weight = weight_in;
#if defined(MMFREE_WITH_CUDA)
  if (g.is_cuda()) weight = cuda_weight(weight_in, g);
#endif
  RmsNormSwishGateParams p{};
  p.g = g.data_ptr();
  p.h = h.data_ptr();
  p.dtype = to_dtype(g.scalar_type());
  p.weight = weight.data_ptr();
  p.w_dtype = to_dtype(weight.scalar_type());
  p.rows = rows;
  p.k = k;
  p.eps = static_cast<float>(eps);
  p.y = y.data_ptr();
  if (g.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(g);
    MMFREE_CUDA_CHECK(cuda::rms_norm_swish_gate(p, current_stream(g)));
#endif
  } else {
    cpu::rms_norm_swish_gate(p);
  }
  return y;
}

std::tuple<Tensor, Tensor> rms_norm_swish_gate_quant_impl(const Tensor& g, const Tensor& h,
                                                                  const Tensor& weight_in, double eps,
                                                                  const Tensor& norm_weight_in, double norm_eps) {
  int64_t k = 0;
  check_gate_inputs(g, h, weight_in, &k);
  check_weight(norm_weight_in, "norm_weight", k, g, "g");
  Tensor x_q = empty(g.sizes(), kChar, g);
  Tensor x_scale = empty(lead_shape(g), kFloat, g);
  const int64_t rows = rows_of(g);
  if (rows == 0) return {x_q, x_scale};
  Tensor weight = weight_in, norm_weight = norm_weight_in;
#if defined(MMFREE_WITH_CUDA)
  if (g.is_cuda()) {
    weight = cuda_weight(weight_in, g);
    norm_weight = cuda_weight(norm_weight_in, g);
  }
#endif
  RmsNormSwishGateParams p{};
  p.g = g.data_ptr();
  p.h = h.data_ptr();
  p.dtype = to_dtype(g.scalar_type());
  p.weight = weight.data_ptr();
  p.w_dtype = to_dtype(weight.scalar_type());
  p.rows = rows;
  p.k = k;
  p.eps = static_cast<float>(eps);
  p.norm_weight = norm_weight.data_ptr();
  p.norm_w_dtype = to_dtype(norm_weight.scalar_type());
  p.norm_eps = static_cast<float>(norm_eps);
  p.x_q = x_q.mutable_data_ptr<int8_t>();
  p.x_scale = x_scale.mutable_data_ptr<float>();
  if (g.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(g);
    MMFREE_CUDA_CHECK(cuda::rms_norm_swish_gate_quant(p, current_stream(g)));
#endif
  } else {
    cpu::rms_norm_swish_gate_quant(p);
  }
  return {x_q, x_scale};
}

std::tuple<Tensor, Tensor, Tensor> rms_norm_swish_gate_backward_impl(const Tensor& grad_y,
                                                                                 const Tensor& g,
                                                                                 const Tensor& h,
                                                                                 const Tensor& weight, double eps) {
  int64_t k = 0;
  check_gate_inputs(g, h, weight, &k);
  check_like(grad_y, "grad_y", g, "g");
  Tensor dg = torch::stable::empty_like(g);
  Tensor dh = torch::stable::empty_like(h);
  Tensor dweight = torch::stable::empty_like(weight);
  const int64_t rows = rows_of(g);
  RmsNormSwishGateBackwardParams p{grad_y.data_ptr(), g.data_ptr(), h.data_ptr(), to_dtype(g.scalar_type()),
                                   weight.data_ptr(), to_dtype(weight.scalar_type()), rows, k,
                                   static_cast<float>(eps), dg.data_ptr(), dh.data_ptr(), dweight.data_ptr(),
                                   nullptr};
  if (g.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(g);
    Tensor ws = empty({std::max<int64_t>(norm_backward_partial_rows(rows), 1), k}, g.scalar_type() == kDouble ? kDouble : kFloat, g);
    p.dweight_partial = ws.data_ptr();
    MMFREE_CUDA_CHECK(cuda::rms_norm_swish_gate_backward(p, current_stream(g)));
#endif
  } else {
    cpu::rms_norm_swish_gate_backward(p);
  }
  return {dg, dh, dweight};
}

}  // namespace

#if defined(MMFREE_WITH_CUDA)
std::tuple<Tensor, Tensor> rms_norm_backward_scaled(const Tensor& grad_y, const Tensor& x, const Tensor& weight,
                                                    double eps, const Tensor& grad_scale) {
  check_dtype(grad_scale, "grad_scale", kFloat);
  check_numel(grad_scale, "grad_scale", 1);
  check_same_device(grad_scale, "grad_scale", x, "x");
  MMFREE_CHECK(x.is_cuda(), "mmfree: the scaled rms_norm backward is CUDA only, got 'x' on the CPU");
  return norm_backward(grad_y, x, weight, eps, std::nullopt, std::nullopt, &grad_scale);
}
#endif

#define MMFREE_NORM_IMPLS(m)                                                                        \
  m.impl("rms_norm_quant", TORCH_BOX(&rms_norm_quant_impl));                                        \
  m.impl("rms_norm_quant_multi", TORCH_BOX(&rms_norm_quant_multi_impl));                            \
  m.impl("rms_norm", TORCH_BOX(&rms_norm_impl));                                                    \
  m.impl("rms_norm_backward", TORCH_BOX(&rms_norm_backward_impl));                                  \
  m.impl("rms_norm_swish_gate", TORCH_BOX(&rms_norm_swish_gate_impl));                              \
  m.impl("rms_norm_swish_gate_backward", TORCH_BOX(&rms_norm_swish_gate_backward_impl));            \
  m.impl("rms_norm_swish_gate_quant", TORCH_BOX(&rms_norm_swish_gate_quant_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("rms_norm_quant(Tensor x, Tensor weight, float eps) -> (Tensor x_q, Tensor x_scale)");
  m.def("rms_norm_quant_multi(Tensor x, Tensor weights, float eps) -> (Tensor x_q, Tensor x_scale)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual=None) -> (Tensor y, Tensor residual_out)");
  m.def(
      "rms_norm_backward(Tensor grad_y, Tensor x, Tensor weight, float eps, Tensor? residual=None, "
      "Tensor? grad_residual=None) -> (Tensor dx, Tensor dweight)");
  m.def("rms_norm_swish_gate(Tensor g, Tensor h, Tensor weight, float eps) -> Tensor");
  m.def(
      "rms_norm_swish_gate_backward(Tensor grad_y, Tensor g, Tensor h, Tensor weight, float eps) "
      "-> (Tensor dg, Tensor dh, Tensor dweight)");
  m.def(
      "rms_norm_swish_gate_quant(Tensor g, Tensor h, Tensor weight, float eps, Tensor norm_weight, "
      "float norm_eps) -> (Tensor x_q, Tensor x_scale)");
}

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_NORM_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_NORM_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
