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

int64_t check_u(const Tensor& u) {
  check_float(u, "u");
  check_contiguous(u, "u");
  MMFREE_CHECK(u.dim() >= 1 && size_at(u, -1) % 2 == 0,
               "mmfree: argument 'u' must be [..., 2*I] with an even last dim, got shape ", u.sizes());
  return size_at(u, -1) / 2;
}

Tensor silu_mul_impl(const Tensor& u) {
  const int64_t inter = check_u(u);
  Tensor y = empty(sizes_with_last(u, inter), u.scalar_type(), u);
  const int64_t rows = inter > 0 ? y.numel() / inter : 0;
  SiluMulParams p{u.data_ptr(), y.data_ptr(), to_dtype(u.scalar_type()), rows, inter};
  if (u.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(u);
    MMFREE_CUDA_CHECK(cuda::silu_mul(p, current_stream(u)));
#endif
  } else {
    cpu::silu_mul(p);
  }
  return y;
}

Tensor silu_mul_backward_impl(const Tensor& grad_y, const Tensor& u) {
  const int64_t inter = check_u(u);
  check_dtype(grad_y, "grad_y", u.scalar_type());
  check_contiguous(grad_y, "grad_y");
  check_same_device(grad_y, "grad_y", u, "u");
  const std::vector<int64_t> half = sizes_with_last(u, inter);
  MMFREE_CHECK(grad_y.sizes().equals(half), "mmfree: argument 'grad_y' must have shape ", half,
               " (u's shape with the last dim halved), got ", grad_y.sizes());
  Tensor du = torch::stable::empty_like(u);
  const int64_t rows = inter > 0 ? grad_y.numel() / inter : 0;
  SiluMulBackwardParams p{grad_y.data_ptr(), u.data_ptr(), du.data_ptr(), to_dtype(u.scalar_type()), rows, inter};
  if (u.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(u);
    MMFREE_CUDA_CHECK(cuda::silu_mul_backward(p, current_stream(u)));
#endif
  } else {
    cpu::silu_mul_backward(p);
  }
  return du;
}

}  // namespace

#define MMFREE_ACT_IMPLS(m)                            \
  m.impl("silu_mul", TORCH_BOX(&silu_mul_impl)); \
  m.impl("silu_mul_backward", TORCH_BOX(&silu_mul_backward_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("silu_mul(Tensor u) -> Tensor");
  m.def("silu_mul_backward(Tensor grad_y, Tensor u) -> Tensor");
}
STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_ACT_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_ACT_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
