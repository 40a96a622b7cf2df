// Bindings of the GLU activation:
//   silu_mul           u [.., 2I] -> silu(u[.., :I]) * u[.., I:]  [.., I]
//   silu_mul_backward  (grad_y [.., I], u [.., 2I]) -> grad_u [.., 2I]
// Kernels in csrc/kernels/{cpu,cuda}/act (act.h says the rounding); autograd is attached
// in Python (mmfree_ext/ops/act.py), saving only u.
#include "act.h"
#include "bindings/checks.h"

namespace mmfree {
namespace binding {
namespace {

int64_t check_u(const at::Tensor& u) {
  check_float(u, "u");
  check_contiguous(u, "u");
  TORCH_CHECK(u.dim() >= 1 && u.size(-1) % 2 == 0, "mmfree: argument 'u' must be [..., 2*I] with an even last dim, got shape ",
              u.sizes());
  return u.size(-1) / 2;
}

std::vector<int64_t> half_last(const at::Tensor& u, int64_t inter) {
  std::vector<int64_t> sizes(u.sizes().begin(), u.sizes().end());
  sizes.back() = inter;
  return sizes;
}

at::Tensor silu_mul_impl(const at::Tensor& u) {
  const int64_t inter = check_u(u);
  at::Tensor y = at::empty(half_last(u, inter), u.options());
  const int64_t rows = inter > 0 ? y.numel() / inter : 0;
  SiluMulParams p{u.data_ptr(), y.data_ptr(), to_dtype(u.scalar_type()), rows, inter};
  if (u.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(u.device());
    MMFREE_CUDA_CHECK(cuda::silu_mul(p, current_stream(u)));
#endif
  } else {
    cpu::silu_mul(p);
  }
  return y;
}

at::Tensor silu_mul_backward_impl(const at::Tensor& grad_y, const at::Tensor& u) {
  const int64_t inter = check_u(u);
  check_dtype(grad_y, "grad_y", u.scalar_type());
  check_contiguous(grad_y, "grad_y");
  check_same_device(grad_y, "grad_y", u, "u");
  TORCH_CHECK(grad_y.sizes() == at::IntArrayRef(half_last(u, inter)), "mmfree: argument 'grad_y' must have shape ",
              half_last(u, inter), " (u's shape with the last dim halved), got ", grad_y.sizes());
  at::Tensor du = at::empty_like(u);
  const int64_t rows = inter > 0 ? grad_y.numel() / inter : 0;
  SiluMulBackwardParams p{grad_y.data_ptr(), u.data_ptr(), du.data_ptr(), to_dtype(u.scalar_type()), rows, inter};
  if (u.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(u.device());
    MMFREE_CUDA_CHECK(cuda::silu_mul_backward(p, current_stream(u)));
#endif
  } else {
    cpu::silu_mul_backward(p);
  }
  return du;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("silu_mul(Tensor u) -> Tensor");
  m.def("silu_mul_backward(Tensor grad_y, Tensor u) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmfree, CPU, m) {
  m.impl("silu_mul", &silu_mul_impl);
  m.impl("silu_mul_backward", &silu_mul_backward_impl);
}

#if defined(MMFREE_WITH_CUDA)
TORCH_LIBRARY_IMPL(mmfree, CUDA, m) {
  m.impl("silu_mul", &silu_mul_impl);
  m.impl("silu_mul_backward", &silu_mul_backward_impl);
}
#endif

}  // namespace binding
}  // namespace mmfree
