// Schema of the model-level decode step (csrc/kernels/decode.h says what it computes).
// Device implementations register against it (STABLE_TORCH_LIBRARY_IMPL; CUDA: ops_decode_cuda.cpp); the
// CompositeExplicitAutograd implementation in python/mmfree_ext/ops/decode.py runs the same
// step op by op wherever no fused implementation is registered.
#include "bindings/checks.h"

namespace mmfree {
namespace binding {

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def(
      "decode_step(Tensor tokens, Tensor(a!) state, Tensor embeddings, Tensor lower_bounds, Tensor norms, "
      "Tensor down_norms, Tensor[] packed, Tensor w_scales, Tensor final_norms, float eps) -> Tensor");
}
#endif

}  // namespace binding
}  // namespace mmfree
