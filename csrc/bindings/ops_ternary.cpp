// Bindings of the ternary linear family:
//   ternary_matmul       int8 activations x packed ternary weights (the forward product)
//   ternary_matmul_t     float grad x packed ternary weights, transposed (the dx product)
//   ternary_linear       training BitLinear on a latent weight (+ _backward, STE)
//   ternary_linear_packed inference BitLinear on packed weights (+ _backward, frozen W)
// The two BitLinear ops are compositions of custom ops (mmfree::rms_norm_quant,
// mmfree::quantize_ternary, mmfree::ternary_matmul[_t]) called through the dispatcher, so
// one implementation serves CPU and CUDA; autograd is attached in Python
// (mmfree_ext/ops/ternary.py). The backward ops recompute the int8 activations from x
// instead of saving them: nothing but the op inputs is kept for backward.
#include <ATen/core/dispatch/Dispatcher.h>

#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "ternary.h"

namespace mmfree {
namespace binding {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair call_rms_norm_quant(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::rms_norm_quant", "")
                       .typed<TensorPair(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, weight, eps);
}

TensorPair call_quantize_ternary(const at::Tensor& weight) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::quantize_ternary", "")
                       .typed<TensorPair(const at::Tensor&)>();
  return op.call(weight);
}

void check_packed_for(const at::Tensor& packed, int64_t k, const at::Tensor& ref, const char* ref_name) {
  check_dtype(packed, "packed", at::kByte);
  check_dim(packed, "packed", 2);
  check_contiguous(packed, "packed");
  check_same_device(packed, "packed", ref, ref_name);
  TORCH_CHECK(packed.size(1) == ternary::row_bytes(k), "mmfree: argument 'packed' must have ", ternary::row_bytes(k),
              " bytes per row (ceil(K/128)*32) for K=", k, " taken from '", ref_name, "', got shape ", packed.sizes());
}

void check_w_scale(const at::Tensor& w_scale, const at::Tensor& ref, const char* ref_name) {
  check_dtype(w_scale, "w_scale", at::kFloat);
  check_numel(w_scale, "w_scale", 1);
  check_same_device(w_scale, "w_scale", ref, ref_name);
}

void check_norm_weight(const at::Tensor& norm_weight, int64_t k, const at::Tensor& x) {
  check_float(norm_weight, "norm_weight");
  check_dim(norm_weight, "norm_weight", 1);
  check_same_device(norm_weight, "norm_weight", x, "x");
  TORCH_CHECK(norm_weight.size(0) == k, "mmfree: argument 'norm_weight' must have K=", k,
              " elements (the last dim of 'x'), got shape ", norm_weight.sizes());
}

void check_x(const at::Tensor& x) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "mmfree: argument 'x' must have at least 1 dim [..., K], got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) >= 1, "mmfree: argument 'x' must have K >= 1 (last dim), got shape ", x.sizes());
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

// ---- ternary_matmul ---------------------------------------------------------------------

at::Tensor ternary_matmul_impl(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& packed,
                               const at::Tensor& w_scale, at::ScalarType out_dtype) {
  check_dtype(x_q, "x_q", at::kChar);
  TORCH_CHECK(x_q.dim() >= 1, "mmfree: argument 'x_q' must have at least 1 dim [..., K], got a 0-dim tensor");
  check_contiguous(x_q, "x_q");
  const int64_t k = x_q.size(-1);
  TORCH_CHECK(k >= 1, "mmfree: argument 'x_q' must have K >= 1 (last dim), got shape ", x_q.sizes());
  check_dtype(x_scale, "x_scale", at::kFloat);
  check_contiguous(x_scale, "x_scale");
  check_same_device(x_scale, "x_scale", x_q, "x_q");
  TORCH_CHECK(x_scale.sizes() == x_q.sizes().slice(0, x_q.dim() - 1), "mmfree: argument 'x_scale' must have shape ",
              x_q.sizes().slice(0, x_q.dim() - 1), " (x_q's leading dims), got ", x_scale.sizes());
  check_packed_for(packed, k, x_q, "x_q");
  check_w_scale(w_scale, x_q, "x_q");
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "mmfree: argument 'out_dtype' must be float32, bfloat16 or float16, got ", out_dtype);

  const int64_t n = packed.size(0);
  const int64_t m = x_q.numel() / k;
  at::Tensor out = at::empty(with_last(x_q.sizes(), n), x_q.options().dtype(out_dtype));
  if (m == 0 || n == 0) return out;
  TernaryMatmulParams p{x_q.data_ptr<int8_t>(), k,   x_scale.data_ptr<float>(), packed.data_ptr<uint8_t>(),
                        w_scale.data_ptr<float>(),  out.data_ptr(),            to_dtype(out_dtype),
                        m,                          n,                         k};
  if (x_q.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x_q.device());
    MMFREE_CUDA_CHECK(cuda::ternary_matmul(p, current_stream(x_q)));
#endif
  } else {
    cpu::ternary_matmul(p);
  }
  return out;
}

// ---- ternary_matmul_t -------------------------------------------------------------------

at::Tensor ternary_matmul_t_impl(const at::Tensor& grad, const at::Tensor& packed, const at::Tensor& w_scale,
                                 int64_t in_features) {
  check_float(grad, "grad");
  TORCH_CHECK(grad.dim() >= 1, "mmfree: argument 'grad' must have at least 1 dim [..., N], got a 0-dim tensor");
  TORCH_CHECK(in_features >= 1, "mmfree: argument 'in_features' must be >= 1, got ", in_features);
  check_packed_for(packed, in_features, grad, "in_features");
  check_w_scale(w_scale, grad, "grad");
  const int64_t n = packed.size(0);
  TORCH_CHECK(grad.size(-1) == n, "mmfree: argument 'grad' must have N=", n, " (rows of 'packed') in its last dim, got shape ",
              grad.sizes());
  const auto out_sizes = with_last(grad.sizes(), in_features);
  if (grad.is_cuda()) {
    // No dedicated CUDA kernel yet: decode W to int8, then a dense fp32 product.
    static auto unpack = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mmfree::unpack_ternary", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
    at::Tensor w = unpack.call(packed, in_features).to(at::kFloat).mul_(w_scale.reshape({}));
    return at::matmul(grad.to(at::kFloat), w).reshape(out_sizes);
  }
  at::Tensor g = grad.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(out_sizes, grad.options().dtype(at::kFloat));
  const int64_t m = n > 0 ? g.numel() / n : out.numel() / in_features;
  TernaryMatmulTParams p{g.data_ptr<float>(), packed.data_ptr<uint8_t>(), w_scale.data_ptr<float>(),
                         out.data_ptr<float>(), m, n, in_features};
  cpu::ternary_matmul_t(p);
  return out;
}

// ---- BitLinear --------------------------------------------------------------------------

// The quantized input side, computed in fp32 whatever x's dtype (the reference does too).
TensorPair quantized_input(const at::Tensor& x, const at::Tensor& norm_weight, double eps) {
  const at::Tensor xf = x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x.contiguous();
  const at::Tensor gf = norm_weight.scalar_type() == at::kDouble ? norm_weight.to(at::kFloat) : norm_weight.contiguous();
  return call_rms_norm_quant(xf, gf, eps);
}

// y in x's dtype; float64 callers (gradcheck) get the fp32 result widened exactly.
at::Tensor bit_linear_forward(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                              const at::Tensor& norm_weight, double eps) {
  auto [x_q, x_scale] = quantized_input(x, norm_weight, eps);
  const bool f64 = x.scalar_type() == at::kDouble;
  at::Tensor y = ternary_matmul_impl(x_q, x_scale, packed, w_scale, f64 ? at::kFloat : x.scalar_type());
  return f64 ? y.to(at::kDouble) : y;
}

void check_weight_for(const at::Tensor& weight, const at::Tensor& x) {
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  TORCH_CHECK(weight.size(1) == x.size(-1), "mmfree: argument 'weight' must be [N, K] with K=", x.size(-1),
              " (the last dim of 'x'), got shape ", weight.sizes());
}

at::Tensor ternary_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight, double eps) {
  check_x(x);
  check_weight_for(weight, x);
  check_norm_weight(norm_weight, x.size(-1), x);
  auto [packed, w_scale] = call_quantize_ternary(weight);
  return bit_linear_forward(x, packed, w_scale, norm_weight, eps);
}

at::Tensor ternary_linear_packed_impl(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& w_scale,
                                      const at::Tensor& norm_weight, double eps) {
  check_x(x);
  check_packed_for(packed, x.size(-1), x, "x");
  check_w_scale(w_scale, x, "x");
  check_norm_weight(norm_weight, x.size(-1), x);
  return bit_linear_forward(x, packed, w_scale, norm_weight, eps);
}

void check_grad_out(const at::Tensor& grad_out, const at::Tensor& x, int64_t n) {
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(with_last(x.sizes(), n)), "mmfree: argument 'grad_out' must have shape ",
              with_last(x.sizes(), n), " (x's leading dims, N), got ", grad_out.sizes());
}

// STE backward through the product and the RMSNorm, in fp32 (as the reference):
//   dxn = dY @ (W_q * w_scale)                 (ternary_matmul_t, from the packed codes)
//   dg  = sum_rows(dxn * xhat),  xhat = x * rstd
//   dx  = rstd * (dxn*g - xhat * mean(dxn*g * xhat))
// Returns (dx in x's dtype, dg in norm_weight's dtype, g2 = dY as fp32 [M, N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_and_input_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& packed, const at::Tensor& w_scale,
                                                                       const at::Tensor& norm_weight, double eps) {
  const int64_t k = x.size(-1), n = packed.size(0);
  const at::Tensor g2 = grad_out.reshape({-1, n}).to(at::kFloat).contiguous();
  at::Tensor dxn = ternary_matmul_t_impl(g2, packed, w_scale, k);
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat);
  const at::Tensor rstd = at::rsqrt(x2.square().sum(-1, true).div_(static_cast<double>(k)).add_(eps));
  const at::Tensor xhat = x2 * rstd;
  at::Tensor dg = (dxn * xhat).sum(0);
  dxn.mul_(norm_weight.to(at::kFloat));  // now d/dxhat
  const at::Tensor mean_dot = (dxn * xhat).sum(-1, true).div_(static_cast<double>(k));
  at::Tensor dx = dxn.sub_(xhat * mean_dot).mul_(rstd);
  return {dx.to(x.scalar_type()).reshape(x.sizes()), dg.to(norm_weight.scalar_type()), g2};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ternary_linear_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& norm_weight, double eps) {
  check_x(x);
  check_weight_for(weight, x);
  check_norm_weight(norm_weight, x.size(-1), x);
  check_grad_out(grad_out, x, weight.size(0));
  auto [packed, w_scale] = call_quantize_ternary(weight);
  auto [dx, dg, g2] = norm_and_input_backward(grad_out, x, packed, w_scale, norm_weight, eps);
  // dW = dY^T @ (x_q * x_scale): the int8 activations are recomputed from x (same kernel as
  // the forward, so bit-identical), one dense fp32 product.
  auto [x_q, x_scale] = quantized_input(x, norm_weight, eps);
  const int64_t k = x.size(-1);
  const at::Tensor x_deq = x_q.reshape({-1, k}).to(at::kFloat).mul_(x_scale.reshape({-1, 1}));
  at::Tensor dw = at::mm(g2.t(), x_deq).to(weight.scalar_type());
  return {dx, dw, dg};
}

std::tuple<at::Tensor, at::Tensor> ternary_linear_packed_backward_impl(const at::Tensor& grad_out, const at::Tensor& x,
                                                                       const at::Tensor& packed, const at::Tensor& w_scale,
                                                                       const at::Tensor& norm_weight, double eps) {
  check_x(x);
  check_packed_for(packed, x.size(-1), x, "x");
  check_w_scale(w_scale, x, "x");
  check_norm_weight(norm_weight, x.size(-1), x);
  check_grad_out(grad_out, x, packed.size(0));
  auto [dx, dg, g2] = norm_and_input_backward(grad_out, x, packed, w_scale, norm_weight, eps);
  return {dx, dg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("ternary_matmul(Tensor x_q, Tensor x_scale, Tensor packed, Tensor w_scale, ScalarType out_dtype) -> Tensor");
  m.def("ternary_matmul_t(Tensor grad, Tensor packed, Tensor w_scale, int in_features) -> Tensor");
  m.def("ternary_linear(Tensor x, Tensor weight, Tensor norm_weight, float eps) -> Tensor");
  m.def(
      "ternary_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor norm_weight, float eps) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)");
  m.def("ternary_linear_packed(Tensor x, Tensor packed, Tensor w_scale, Tensor norm_weight, float eps) -> Tensor");
  m.def(
      "ternary_linear_packed_backward(Tensor grad_out, Tensor x, Tensor packed, Tensor w_scale, Tensor norm_weight, "
      "float eps) -> (Tensor grad_x, Tensor grad_norm_weight)");
}

TORCH_LIBRARY_IMPL(mmfree, CPU, m) {
  m.impl("ternary_matmul", &ternary_matmul_impl);
  m.impl("ternary_matmul_t", &ternary_matmul_t_impl);
  m.impl("ternary_linear", &ternary_linear_impl);
  m.impl("ternary_linear_backward", &ternary_linear_backward_impl);
  m.impl("ternary_linear_packed", &ternary_linear_packed_impl);
  m.impl("ternary_linear_packed_backward", &ternary_linear_packed_backward_impl);
}

#if defined(MMFREE_WITH_CUDA)
TORCH_LIBRARY_IMPL(mmfree, CUDA, m) {
  m.impl("ternary_matmul", &ternary_matmul_impl);
  m.impl("ternary_matmul_t", &ternary_matmul_t_impl);
  m.impl("ternary_linear", &ternary_linear_impl);
  m.impl("ternary_linear_backward", &ternary_linear_backward_impl);
  m.impl("ternary_linear_packed", &ternary_linear_packed_impl);
  m.impl("ternary_linear_packed_backward", &ternary_linear_packed_backward_impl);
}
#endif

}  // namespace binding
}  // namespace mmfree
