// Bindings of the ternary packing ops: quantize_ternary and unpack_ternary.
#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "pack.h"

namespace mmfree {
namespace binding {
namespace {

void check_weight(const at::Tensor& weight) {
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
}

void check_packed(const at::Tensor& packed, int64_t in_features) {
  check_dtype(packed, "packed", at::kByte);
  check_dim(packed, "packed", 2);
  check_contiguous(packed, "packed");
  TORCH_CHECK(in_features >= 1, "mmfree: argument 'in_features' must be >= 1, got ", in_features);
  TORCH_CHECK(packed.size(1) == ternary::row_bytes(in_features), "mmfree: argument 'packed' must have ",
              ternary::row_bytes(in_features), " bytes per row for in_features=", in_features,
              " (ceil(K/128)*32), got shape ", packed.sizes());
}

std::tuple<at::Tensor, at::Tensor> quantize_ternary_impl(const at::Tensor& weight) {
  check_weight(weight);
  const int64_t rows = weight.size(0), k = weight.size(1);
  TORCH_CHECK(k >= 1, "mmfree: argument 'weight' must have in_features >= 1, got shape ", weight.sizes());
  at::Tensor packed = at::empty({rows, ternary::row_bytes(k)}, weight.options().dtype(at::kByte));
  at::Tensor scale = at::empty({}, weight.options().dtype(at::kFloat));
  TernaryQuantizeParams p{weight.data_ptr(), to_dtype(weight.scalar_type()), rows, k,
                          packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), nullptr};
  if (weight.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(weight.device());
    at::Tensor ws = at::empty({kTernaryQuantizeWorkspace}, weight.options().dtype(at::kDouble));
    p.workspace = ws.data_ptr<double>();
    MMFREE_CUDA_CHECK(cuda::ternary_quantize(p, current_stream(weight)));
#endif
  } else {
    cpu::ternary_quantize(p);
  }
  return {packed, scale};
}

at::Tensor unpack_ternary_impl(const at::Tensor& packed, int64_t in_features) {
  check_packed(packed, in_features);
  const int64_t rows = packed.size(0);
  at::Tensor out = at::empty({rows, in_features}, packed.options().dtype(at::kChar));
  int64_t invalid = 0;
  if (packed.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(packed.device());
    at::Tensor count = at::empty({1}, packed.options().dtype(at::kLong));
    TernaryUnpackParams p{packed.data_ptr<uint8_t>(), rows, in_features, out.data_ptr<int8_t>(),
                          count.data_ptr<int64_t>()};
    MMFREE_CUDA_CHECK(cuda::ternary_unpack(p, current_stream(packed)));
    invalid = count.item<int64_t>();  // a sync: unpacking is a debugging/conversion op, not a hot path
#endif
  } else {
    TernaryUnpackParams p{packed.data_ptr<uint8_t>(), rows, in_features, out.data_ptr<int8_t>(), &invalid};
    cpu::ternary_unpack(p);
  }
  TORCH_CHECK(invalid == 0, "mmfree: argument 'packed' holds ", invalid,
              " invalid 2-bit code(s) (code 3, or a non-zero code in the row padding); "
              "it is not a packed ternary tensor for in_features=", in_features);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("quantize_ternary(Tensor weight) -> (Tensor packed, Tensor scale)");
  m.def("unpack_ternary(Tensor packed, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmfree, CPU, m) {
  m.impl("quantize_ternary", &quantize_ternary_impl);
  m.impl("unpack_ternary", &unpack_ternary_impl);
}

#if defined(MMFREE_WITH_CUDA)
TORCH_LIBRARY_IMPL(mmfree, CUDA, m) {
  m.impl("quantize_ternary", &quantize_ternary_impl);
  m.impl("unpack_ternary", &unpack_ternary_impl);
}
#endif

}  // namespace binding
}  // namespace mmfree
