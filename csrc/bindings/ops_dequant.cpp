// Binding of dequantize_rows(x_q, x_scale, dtype): x_q * x_scale[..., None] in dtype, computed
// in fp32 and rounded once (equal bit for bit to at::mul of the int8 and fp32 tensors into
// dtype). CUDA runs the vectorized kernel (kernels/dequant.h); the CPU is that aten::mul.
// bitlinear_backward calls it for the dW operand.
// Also quantize_rows_int8(x) -> (q, scale): per-row absmax int8 (kernels/quant_rows.h), the
// dY operand of bitlinear_backward's opt-in int8 dX.
#include "bindings/checks.h"
#include "dequant.h"
#include "quant_rows.h"

namespace mmfree {
namespace binding {
namespace {

Tensor dequantize_rows_impl(const Tensor& x_q, const Tensor& x_scale, ScalarType dtype) {
  check_dtype(x_q, "x_q", kChar);
  MMFREE_CHECK(x_q.dim() >= 1, "mmfree: argument 'x_q' must have at least 1 dimension [..., K], got a 0-D tensor");
  check_contiguous(x_q, "x_q");
  check_dtype(x_scale, "x_scale", kFloat);
  check_same_device(x_scale, "x_scale", x_q, "x_q");
  std::vector<int64_t> lead = sizes_vec(x_q);
  lead.pop_back();
  MMFREE_CHECK(x_scale.sizes().equals(lead), "mmfree: argument 'x_scale' must have shape ", lead,
               " (x_q's leading dims), got ", x_scale.sizes());
  MMFREE_CHECK(dtype == kFloat || dtype == kBFloat16 || dtype == kHalf || dtype == kDouble,
               "mmfree: argument 'dtype' must be a floating dtype (float32, bfloat16, float16, float64), got ", dtype);
  Tensor out = empty(x_q.sizes(), dtype, x_q);
  const int64_t k = size_at(x_q, -1);
  if (x_q.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(x_q);
    const Tensor s = contig(x_scale);
    const DequantRowsParams p{ptr<int8_t>(x_q), ptr<float>(s), k == 0 ? 0 : x_q.numel() / k, k, to_dtype(dtype),
                              out.data_ptr()};
    MMFREE_CUDA_CHECK(cuda::dequantize_rows(p, current_stream(x_q)));
    return out;
#endif
  }
  aten::mul_out(out, x_q, torch::stable::unsqueeze(x_scale, -1));
  return out;
}

std::tuple<Tensor, Tensor> quantize_rows_int8_impl(const Tensor& x) {
  MMFREE_CHECK(x.scalar_type() == kFloat || x.scalar_type() == kBFloat16 || x.scalar_type() == kHalf,
               "mmfree: argument 'x' must have dtype float32, bfloat16 or float16, got ", x.scalar_type());
  MMFREE_CHECK(x.dim() >= 1, "mmfree: argument 'x' must have at least 1 dimension [..., N], got a 0-D tensor");
  const Tensor xc = contig(x);
  std::vector<int64_t> lead = sizes_vec(x);
  lead.pop_back();
  Tensor q = empty(x.sizes(), kChar, x);
  Tensor scale = empty(lead, kFloat, x);
  const int64_t cols = size_at(x, -1);
  const int64_t rows = scale.numel();
  const QuantRowsParams p{xc.data_ptr(), to_dtype(x.scalar_type()), rows, cols, ptr<int8_t>(q), ptr<float>(scale)};
  if (x.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    MMFREE_CHECK(rows <= 0x7fffffff, "mmfree: argument 'x' must have at most 2^31 - 1 rows on CUDA, got ", rows);
    const CudaGuard guard(x);
    MMFREE_CUDA_CHECK(cuda::quantize_rows_int8(p, current_stream(x)));
    return {q, scale};
#endif
  }
  cpu::quantize_rows_int8(p);
  return {q, scale};
}

}  // namespace

#define MMFREE_DEQUANT_IMPLS(m)                                   \
  m.impl("dequantize_rows", TORCH_BOX(&dequantize_rows_impl)); \
  m.impl("quantize_rows_int8", TORCH_BOX(&quantize_rows_int8_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("dequantize_rows(Tensor x_q, Tensor x_scale, ScalarType dtype) -> Tensor");
  m.def("quantize_rows_int8(Tensor x) -> (Tensor q, Tensor scale)");
}
STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_DEQUANT_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_DEQUANT_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
