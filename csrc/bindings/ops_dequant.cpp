// Binding of dequantize_rows(x_q, x_scale, dtype): x_q * x_scale[..., None] in dtype, computed
// in fp32 and rounded once (equal bit for bit to at::mul of the int8 and fp32 tensors into
// dtype). CUDA runs the vectorized kernel (kernels/dequant.h); the CPU is that at::mul.
// bitlinear_backward calls it for the dW operand.
#include "bindings/checks.h"
#include "dequant.h"

namespace mmfree {
namespace binding {
namespace {

at::Tensor dequantize_rows_impl(const at::Tensor& x_q, const at::Tensor& x_scale, at::ScalarType dtype) {
  check_dtype(x_q, "x_q", at::kChar);
  TORCH_CHECK(x_q.dim() >= 1, "mmfree: argument 'x_q' must have at least 1 dimension [..., K], got a 0-D tensor");
  check_contiguous(x_q, "x_q");
  check_dtype(x_scale, "x_scale", at::kFloat);
  check_same_device(x_scale, "x_scale", x_q, "x_q");
  TORCH_CHECK(x_scale.sizes() == x_q.sizes().slice(0, x_q.dim() - 1), "mmfree: argument 'x_scale' must have shape ",
              x_q.sizes().slice(0, x_q.dim() - 1), " (x_q's leading dims), got ", x_scale.sizes());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kDouble,
              "mmfree: argument 'dtype' must be a floating dtype (float32, bfloat16, float16, float64), got ", dtype);
  at::Tensor out = at::empty(x_q.sizes(), x_q.options().dtype(dtype));
  const int64_t k = x_q.size(-1);
  if (x_q.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x_q.device());
    const at::Tensor s = x_scale.contiguous();
    const DequantRowsParams p{x_q.data_ptr<int8_t>(), s.data_ptr<float>(), k == 0 ? 0 : x_q.numel() / k, k,
                              to_dtype(dtype), out.data_ptr()};
    MMFREE_CUDA_CHECK(cuda::dequantize_rows(p, current_stream(x_q)));
    return out;
#endif
  }
  at::mul_out(out, x_q, x_scale.unsqueeze(-1));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("dequantize_rows(Tensor x_q, Tensor x_scale, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmfree, CPU, m) { m.impl("dequantize_rows", &dequantize_rows_impl); }

#if defined(MMFREE_WITH_CUDA)
TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { m.impl("dequantize_rows", &dequantize_rows_impl); }
#endif

}  // namespace binding
}  // namespace mmfree
