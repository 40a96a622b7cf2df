// Bindings of the BitLinear training step that quantizes once per step:
//   bitlinear_forward   y plus what the backward reuses: the packed ternary weight and its
//                       scale, the int8 activations x_q + x_scale, and optionally the packed
//                       transposed weight W_q^T (for the int8 dX)
//   bitlinear_backward  the STE backward from those saved tensors: no weight re-quantization,
//                       no norm + quant recompute of x
// Compositions of custom ops called through the dispatcher (as in ops_ternary.cpp), so one
// implementation serves CPU and CUDA; autograd is attached in Python
// (mmfree_ext/ops/bitlinear.py). mmfree::ternary_linear / ternary_linear_backward keep their
// schema and behaviour (they re-quantize); this pair is what mmfree_ext.ternary_linear and
// nn.BitLinear train with.
//
// dX, exact (default): mmfree::ternary_linear_packed_backward (bf16 tensor cores on CUDA,
// exact ternary products, fp32 accumulation, then the fused RMSNorm backward).
// dX, int8 (opt-in, SwitchBack-style): dY is quantized per row to int8 (absmax / 127) and
// multiplied by W_q^T through mmfree::ternary_matmul (the int8 GEMMs, wgmma on sm_90): an
// exact int32 product of the quantized dY, rescaled by dY's row scale and w_scale.
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <vector>

#include "bindings/checks.h"
#include "bindings/op_calls.h"
#include "common/ternary_format.h"

namespace mmfree {
namespace binding {
namespace {

at::Tensor call_unpack_ternary(const at::Tensor& packed, int64_t in_features) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::unpack_ternary", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(packed, in_features);
}

at::Tensor call_ternary_matmul(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& packed,
                               const at::Tensor& w_scale, at::ScalarType out_dtype) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::ternary_matmul", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         at::ScalarType)>();
  return op.call(x_q, x_scale, packed, w_scale, out_dtype);
}

TensorPair call_packed_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& packed,
                                const at::Tensor& w_scale, const at::Tensor& norm_weight, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mmfree::ternary_linear_packed_backward", "")
                       .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double)>();
  return op.call(grad_out, x, packed, w_scale, norm_weight, eps);
}

TensorPair call_rms_norm_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, double eps) {
  using Sig = TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mmfree::rms_norm_backward", "").typed<Sig>();
  return op.call(grad_y, x, weight, eps, std::nullopt, std::nullopt);
}

at::ScalarType compute_dtype(at::ScalarType s) { return s == at::kDouble ? at::kFloat : s; }

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

void check_inputs(const at::Tensor& x, const at::Tensor& norm_weight) {
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "mmfree: argument 'x' must have at least 1 dim [..., K], got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) >= 1, "mmfree: argument 'x' must have K >= 1 (last dim), got shape ", x.sizes());
  check_float(norm_weight, "norm_weight");
  check_dim(norm_weight, "norm_weight", 1);
  check_same_device(norm_weight, "norm_weight", x, "x");
  TORCH_CHECK(norm_weight.size(0) == x.size(-1), "mmfree: argument 'norm_weight' must have K=", x.size(-1),
              " elements (the last dim of 'x'), got shape ", norm_weight.sizes());
}

// W_q^T packed along N (rows = K): the codes are unpacked, transposed and re-packed. The
// codes are exact in bf16 and quantize_ternary maps {-1, 0, 1} back onto themselves (their
// absmean is <= 1, so |c| / absmean >= 1 clamps to 1), so the codes are W_q^T exactly; the
// scale it computes is discarded (the caller keeps w_scale).
at::Tensor pack_transposed(const at::Tensor& packed, int64_t k) {
  const at::Tensor codes_t = call_unpack_ternary(packed, k).t().to(at::kBFloat16).contiguous();
  return std::get<0>(call_quantize_ternary(codes_t));
}

// (y, packed, w_scale, x_q, x_scale, packed_t). packed_t is [K, row_bytes(N)] when
// with_transposed, else [0, row_bytes(N)].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bitlinear_forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& norm_weight, double eps, bool with_transposed) {
  check_inputs(x, norm_weight);
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  const int64_t k = x.size(-1), n = weight.size(0);
  TORCH_CHECK(weight.size(1) == k, "mmfree: argument 'weight' must be [N, K] with K=", k,
              " (the last dim of 'x'), got shape ", weight.sizes());
  auto [packed, w_scale] = call_quantize_ternary(weight);
  // The quantized input side in fp32 whatever x's dtype (as ternary_linear does).
  const at::Tensor xf = x.scalar_type() == at::kDouble ? x.to(at::kFloat) : x.contiguous();
  const at::Tensor gf = norm_weight.scalar_type() == at::kDouble ? norm_weight.to(at::kFloat) : norm_weight.contiguous();
  auto [x_q, x_scale] = call_rms_norm_quant(xf, gf, eps);
  at::Tensor y = call_ternary_matmul(x_q, x_scale, packed, w_scale, compute_dtype(x.scalar_type()));
  if (x.scalar_type() == at::kDouble) y = y.to(at::kDouble);
  at::Tensor packed_t = with_transposed && n > 0
                            ? pack_transposed(packed, k)
                            : at::empty({with_transposed ? k : 0, ternary::row_bytes(std::max<int64_t>(n, 1))},
                                        packed.options());
  if (with_transposed && n == 0) packed_t.zero_();
  return {y, packed, w_scale, x_q, x_scale, packed_t};
}

// Per-row absmax int8 quantization of g [M, N]: q = round(g / s) in [-127, 127], s = max|g| / 127
// (an all-zero row gets s = 1 and q = 0). Row blocks bound the fp32 temporary to ~64 MiB.
TensorPair quantize_rows_int8(const at::Tensor& g) {
  const int64_t m = g.size(0), n = g.size(1);
  at::Tensor q = at::empty({m, n}, g.options().dtype(at::kChar));
  at::Tensor scale = at::empty({m}, g.options().dtype(at::kFloat));
  const int64_t rows = std::max<int64_t>(1, (int64_t{16} << 20) / std::max<int64_t>(n, 1));
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t r = std::min(rows, m - r0);
    const at::Tensor gb = g.narrow(0, r0, r);
    const at::Tensor amax = gb.abs().amax(-1).to(at::kFloat);
    at::Tensor sb = scale.narrow(0, r0, r);
    sb.copy_(at::where(amax > 0, amax / 127.0, at::ones_like(amax)));
    q.narrow(0, r0, r).copy_(at::div(gb, sb.unsqueeze(1)).round_().clamp_(-127, 127));
  }
  return {q, scale};
}

void check_saved(const at::Tensor& x, const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& packed,
                 const at::Tensor& w_scale, int64_t k) {
  check_dtype(x_q, "x_q", at::kChar);
  check_contiguous(x_q, "x_q");
  check_same_device(x_q, "x_q", x, "x");
  TORCH_CHECK(x_q.sizes() == x.sizes(), "mmfree: argument 'x_q' must have x's shape ", x.sizes(), ", got ",
              x_q.sizes());
  check_dtype(x_scale, "x_scale", at::kFloat);
  check_same_device(x_scale, "x_scale", x, "x");
  TORCH_CHECK(x_scale.sizes() == x.sizes().slice(0, x.dim() - 1), "mmfree: argument 'x_scale' must have shape ",
              x.sizes().slice(0, x.dim() - 1), " (x's leading dims), got ", x_scale.sizes());
  check_dtype(packed, "packed", at::kByte);
  check_dim(packed, "packed", 2);
  check_same_device(packed, "packed", x, "x");
  TORCH_CHECK(packed.size(1) == ternary::row_bytes(k), "mmfree: argument 'packed' must have ", ternary::row_bytes(k),
              " bytes per row for K=", k, ", got shape ", packed.sizes());
  check_dtype(w_scale, "w_scale", at::kFloat);
  check_numel(w_scale, "w_scale", 1);
  check_same_device(w_scale, "w_scale", x, "x");
}

// (grad_x, grad_weight in weight_dtype, grad_norm_weight).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bitlinear_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_q, const at::Tensor& x_scale,
    const at::Tensor& packed, const at::Tensor& w_scale, const at::Tensor& packed_t, const at::Tensor& norm_weight,
    double eps, at::ScalarType weight_dtype, bool int8_dx) {
  check_inputs(x, norm_weight);
  const int64_t k = x.size(-1);
  check_saved(x, x_q, x_scale, packed, w_scale, k);
  const int64_t n = packed.size(0);
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x, "x");
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef(with_last(x.sizes(), n)), "mmfree: argument 'grad_out' must have shape ",
              with_last(x.sizes(), n), " (x's leading dims, N), got ", grad_out.sizes());
  TORCH_CHECK(weight_dtype == at::kFloat || weight_dtype == at::kBFloat16 || weight_dtype == at::kHalf ||
                  weight_dtype == at::kDouble,
              "mmfree: argument 'weight_dtype' must be a floating dtype, got ", weight_dtype);
  const at::Tensor g2 = grad_out.reshape({-1, n}).to(compute_dtype(grad_out.scalar_type())).contiguous();
  const int64_t m = g2.size(0);

  at::Tensor dx, dg;
  if (!int8_dx) {
    std::tie(dx, dg) = call_packed_backward(grad_out.contiguous(), x, packed, w_scale, norm_weight, eps);
  } else {
    check_dtype(packed_t, "packed_t", at::kByte);
    check_dim(packed_t, "packed_t", 2);
    check_same_device(packed_t, "packed_t", x, "x");
    TORCH_CHECK(packed_t.size(0) == k && packed_t.size(1) == ternary::row_bytes(std::max<int64_t>(n, 1)),
                "mmfree: int8 dX needs 'packed_t' = W_q^T packed along N, shape [", k, ", ",
                ternary::row_bytes(std::max<int64_t>(n, 1)), "] (bitlinear_forward with with_transposed=True), got ",
                packed_t.sizes());
    const at::ScalarType xt = compute_dtype(x.scalar_type());
    at::Tensor dxn;
    if (n == 0 || m == 0) {
      dxn = at::zeros({m, k}, x.options().dtype(xt));
    } else {
      auto [g_q, g_scale] = quantize_rows_int8(g2);
      dxn = call_ternary_matmul(g_q, g_scale, packed_t, w_scale, xt);
    }
    const at::Tensor x2 = x.reshape({-1, k}).to(xt).contiguous();
    const at::ScalarType gt = norm_weight.scalar_type() == xt ? xt : at::kFloat;
    std::tie(dx, dg) = call_rms_norm_backward(dxn, x2, norm_weight.to(gt).contiguous(), eps);
    dx = dx.reshape(x.sizes()).to(x.scalar_type());
    dg = dg.to(norm_weight.scalar_type());
  }

  // dW[n, k] = sum_m dY[m, n] * x_q[m, k] * x_scale[m], in dY's dtype (fp32 accumulation). cuBLAS
  // takes one dtype for both operands, so an [M, K] operand in dY's dtype is materialized
  // either way (scaling dY's rows instead would add an M x N pass): x_q * x_scale, one pass
  // from the saved int8 activations, rounded once (mmfree::dequantize_rows).
  static auto dequantize_rows = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("mmfree::dequantize_rows", "")
                                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::ScalarType)>();
  const at::Tensor x_deq = dequantize_rows.call(x_q.reshape({-1, k}), x_scale.reshape({-1}), g2.scalar_type());
  at::Tensor dw = at::mm(g2.t(), x_deq).to(weight_dtype);
  return {dx, dw, dg};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def(
      "bitlinear_forward(Tensor x, Tensor weight, Tensor norm_weight, float eps, bool with_transposed=False) "
      "-> (Tensor y, Tensor packed, Tensor w_scale, Tensor x_q, Tensor x_scale, Tensor packed_t)");
  m.def(
      "bitlinear_backward(Tensor grad_out, Tensor x, Tensor x_q, Tensor x_scale, Tensor packed, Tensor w_scale, "
      "Tensor packed_t, Tensor norm_weight, float eps, ScalarType weight_dtype, bool int8_dx=False) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)");
}

#define MMFREE_BITLINEAR_IMPLS(m)                        \
  m.impl("bitlinear_forward", &bitlinear_forward_impl);  \
  m.impl("bitlinear_backward", &bitlinear_backward_impl);

TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_BITLINEAR_IMPLS(m) }

#if defined(MMFREE_WITH_CUDA)
TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_BITLINEAR_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
