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
#include <algorithm>
#include <vector>

#include "bindings/checks.h"
#include "bindings/op_calls.h"
#include "common/ternary_format.h"

namespace mmfree {
namespace binding {
namespace {

Tensor call_unpack_ternary(const Tensor& packed, int64_t in_features) {
  return call_tensor_op("mmfree::unpack_ternary", "", packed, in_features);
}

Tensor call_ternary_matmul(const Tensor& x_q, const Tensor& x_scale, const Tensor& packed, const Tensor& w_scale,
                           ScalarType out_dtype) {
  return call_tensor_op("mmfree::ternary_matmul", "", x_q, x_scale, packed, w_scale, out_dtype);
}

TensorPair call_packed_backward(const Tensor& grad_out, const Tensor& x, const Tensor& packed, const Tensor& w_scale,
                                const Tensor& norm_weight, double eps) {
  auto r = call_op<2>("mmfree::ternary_linear_packed_backward", "", grad_out, x, packed, w_scale, norm_weight, eps);
  return {take(r[0]), take(r[1])};
}

TensorPair call_rms_norm_backward(const Tensor& grad_y, const Tensor& x, const Tensor& weight, double eps) {
  auto r = call_op<2>("mmfree::rms_norm_backward", "", grad_y, x, weight, eps, std::optional<Tensor>(),
                      std::optional<Tensor>());
  return {take(r[0]), take(r[1])};
}

ScalarType compute_dtype(ScalarType s) { return s == kDouble ? kFloat : s; }

// x's sizes without the last dim (x_scale's shape).
std::vector<int64_t> leading(const Tensor& x) {
  std::vector<int64_t> s = sizes_vec(x);
  s.pop_back();
  return s;
}

void check_inputs(const Tensor& x, const Tensor& norm_weight) {
  check_float(x, "x");
  MMFREE_CHECK(x.dim() >= 1, "mmfree: argument 'x' must have at least 1 dim [..., K], got a 0-dim tensor");
  MMFREE_CHECK(size_at(x, -1) >= 1, "mmfree: argument 'x' must have K >= 1 (last dim), got shape ", x.sizes());
  check_float(norm_weight, "norm_weight");
  check_dim(norm_weight, "norm_weight", 1);
  check_same_device(norm_weight, "norm_weight", x, "x");
  MMFREE_CHECK(norm_weight.size(0) == size_at(x, -1), "mmfree: argument 'norm_weight' must have K=", size_at(x, -1),
               " elements (the last dim of 'x'), got shape ", norm_weight.sizes());
}

// W_q^T packed along N (rows = K): the codes are unpacked, transposed and re-packed. The
// codes are exact in bf16 and quantize_ternary maps {-1, 0, 1} back onto themselves (their
// absmean is <= 1, so |c| / absmean >= 1 clamps to 1), so the codes are W_q^T exactly; the
// scale it computes is discarded (the caller keeps w_scale).
Tensor pack_transposed(const Tensor& packed, int64_t k) {
  const Tensor codes_t = torch::stable::contiguous(to(aten::t(call_unpack_ternary(packed, k)), kBFloat16));
  return std::get<0>(call_quantize_ternary(codes_t));
}

// (y, packed, w_scale, x_q, x_scale, packed_t). packed_t is [K, row_bytes(N)] when
// with_transposed, else [0, row_bytes(N)].
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bitlinear_forward_impl(const Tensor& x, const Tensor& weight,
                                                                                 const Tensor& norm_weight, double eps,
                                                                                 bool with_transposed) {
  check_inputs(x, norm_weight);
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
  check_same_device(weight, "weight", x, "x");
  const int64_t k = size_at(x, -1), n = weight.size(0);
  MMFREE_CHECK(weight.size(1) == k, "mmfree: argument 'weight' must be [N, K] with K=", k,
              " (the last dim of 'x'), got shape ", weight.sizes());
  auto [packed, w_scale] = call_quantize_ternary(weight);
  // The quantized input side in fp32 whatever x's dtype (as ternary_linear does).
  const Tensor xf = x.scalar_type() == kDouble ? to(x, kFloat) : contig(x);
  const Tensor gf = norm_weight.scalar_type() == kDouble ? to(norm_weight, kFloat) : contig(norm_weight);
  auto [x_q, x_scale] = call_rms_norm_quant(xf, gf, eps);
  Tensor y = call_ternary_matmul(x_q, x_scale, packed, w_scale, compute_dtype(x.scalar_type()));
  if (x.scalar_type() == kDouble) y = to(y, kDouble);
  Tensor packed_t = with_transposed && n > 0
                        ? pack_transposed(packed, k)
                        : empty({with_transposed ? k : 0, ternary::row_bytes(std::max<int64_t>(n, 1))}, kByte, packed);
  if (with_transposed && n == 0) torch::stable::zero_(packed_t);
  return {y, packed, w_scale, x_q, x_scale, packed_t};
}

// Per-row absmax int8 quantization of g [M, N] (mmfree::quantize_rows_int8, one kernel).
TensorPair call_quantize_rows_int8(const Tensor& g) {
  auto r = call_op<2>("mmfree::quantize_rows_int8", "", g);
  return {take(r[0]), take(r[1])};
}

void check_saved(const Tensor& x, const Tensor& x_q, const Tensor& x_scale, const Tensor& packed, const Tensor& w_scale,
                 int64_t k) {
  check_dtype(x_q, "x_q", kChar);
  check_contiguous(x_q, "x_q");
  check_same_device(x_q, "x_q", x, "x");
  MMFREE_CHECK(x_q.sizes().equals(x.sizes()), "mmfree: argument 'x_q' must have x's shape ", x.sizes(), ", got ",
              x_q.sizes());
  check_dtype(x_scale, "x_scale", kFloat);
  check_same_device(x_scale, "x_scale", x, "x");
  MMFREE_CHECK(x_scale.sizes().equals(leading(x)), "mmfree: argument 'x_scale' must have shape ", leading(x),
               " (x's leading dims), got ", x_scale.sizes());
  check_dtype(packed, "packed", kByte);
  check_dim(packed, "packed", 2);
  check_same_device(packed, "packed", x, "x");
  MMFREE_CHECK(packed.size(1) == ternary::row_bytes(k), "mmfree: argument 'packed' must have ", ternary::row_bytes(k),
              " bytes per row for K=", k, ", got shape ", packed.sizes());
  check_dtype(w_scale, "w_scale", kFloat);
  check_numel(w_scale, "w_scale", 1);
  check_same_device(w_scale, "w_scale", x, "x");
}

// (grad_x, grad_weight in weight_dtype, grad_norm_weight).
std::tuple<Tensor, Tensor, Tensor> bitlinear_backward_impl(const Tensor& grad_out, const Tensor& x, const Tensor& x_q,
                                                           const Tensor& x_scale, const Tensor& packed,
                                                           const Tensor& w_scale, const Tensor& packed_t,
                                                           const Tensor& norm_weight, double eps,
                                                           ScalarType weight_dtype, bool int8_dx) {
  check_inputs(x, norm_weight);
  const int64_t k = size_at(x, -1);
  check_saved(x, x_q, x_scale, packed, w_scale, k);
  const int64_t n = packed.size(0);
  check_float(grad_out, "grad_out");
  check_same_device(grad_out, "grad_out", x, "x");
  const std::vector<int64_t> out_sizes = sizes_with_last(x, n);
  MMFREE_CHECK(grad_out.sizes().equals(out_sizes), "mmfree: argument 'grad_out' must have shape ", out_sizes,
               " (x's leading dims, N), got ", grad_out.sizes());
  MMFREE_CHECK(weight_dtype == kFloat || weight_dtype == kBFloat16 || weight_dtype == kHalf || weight_dtype == kDouble,
               "mmfree: argument 'weight_dtype' must be a floating dtype, got ", weight_dtype);
  // Rows from x, not -1: with N = 0 (no outputs) dY has no elements to infer them from.
  const Tensor g2 = contig(
      to(torch::stable::reshape(grad_out, {x.numel() / k, n}), compute_dtype(grad_out.scalar_type())));
  const int64_t m = g2.size(0);

  std::optional<Tensor> dx, dg;
  if (!int8_dx) {
    std::tie(dx, dg) = call_packed_backward(contig(grad_out), x, packed, w_scale, norm_weight, eps);
  } else {
    check_dtype(packed_t, "packed_t", kByte);
    check_dim(packed_t, "packed_t", 2);
    check_same_device(packed_t, "packed_t", x, "x");
    MMFREE_CHECK(packed_t.size(0) == k && packed_t.size(1) == ternary::row_bytes(std::max<int64_t>(n, 1)),
                "mmfree: int8 dX needs 'packed_t' = W_q^T packed along N, shape [", k, ", ",
                ternary::row_bytes(std::max<int64_t>(n, 1)), "] (bitlinear_forward with with_transposed=True), got ",
                packed_t.sizes());
    const ScalarType xt = compute_dtype(x.scalar_type());
    std::optional<Tensor> dxn;
    if (n == 0 || m == 0) {
      dxn = zeros({m, k}, xt, x);
    } else {
      auto [g_q, g_scale] = call_quantize_rows_int8(g2);
      dxn = call_ternary_matmul(g_q, g_scale, packed_t, w_scale, xt);
    }
    const Tensor x2 = contig(to(torch::stable::reshape(x, {-1, k}), xt));
    const ScalarType gt = norm_weight.scalar_type() == xt ? xt : kFloat;
    std::tie(dx, dg) = call_rms_norm_backward(*dxn, x2, contig(to(norm_weight, gt)), eps);
    dx = to(torch::stable::reshape(*dx, x.sizes()), x.scalar_type());
    dg = to(*dg, norm_weight.scalar_type());
  }

  // dW[n, k] = sum_m dY[m, n] * x_q[m, k] * x_scale[m], in dY's dtype (fp32 accumulation). cuBLAS
  // takes one dtype for both operands, so an [M, K] operand in dY's dtype is materialized
  // either way (scaling dY's rows instead would add an M x N pass): x_q * x_scale, one pass
  // from the saved int8 activations, rounded once (mmfree::dequantize_rows). Building it a
  // block of columns at a time (16 MiB less at the step's peak) cost 5% of the step on the
  // H200 (benchmarks/NOTES.md, session 6), so it is built whole.
  const Tensor x_deq = call_tensor_op("mmfree::dequantize_rows", "", torch::stable::reshape(x_q, {-1, k}),
                                      torch::stable::reshape(x_scale, {-1}), g2.scalar_type());
  Tensor dw = to(aten::mm(aten::t(g2), x_deq), weight_dtype);
  return {*dx, dw, *dg};
}

}  // namespace

#define MMFREE_BITLINEAR_IMPLS(m)                                   \
  m.impl("bitlinear_forward", TORCH_BOX(&bitlinear_forward_impl)); \
  m.impl("bitlinear_backward", TORCH_BOX(&bitlinear_backward_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def(
      "bitlinear_forward(Tensor x, Tensor weight, Tensor norm_weight, float eps, bool with_transposed=False) "
      "-> (Tensor y, Tensor packed, Tensor w_scale, Tensor x_q, Tensor x_scale, Tensor packed_t)");
  m.def(
      "bitlinear_backward(Tensor grad_out, Tensor x, Tensor x_q, Tensor x_scale, Tensor packed, Tensor w_scale, "
      "Tensor packed_t, Tensor norm_weight, float eps, ScalarType weight_dtype, bool int8_dx=False) "
      "-> (Tensor grad_x, Tensor grad_weight, Tensor grad_norm_weight)");
}

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_BITLINEAR_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_BITLINEAR_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
