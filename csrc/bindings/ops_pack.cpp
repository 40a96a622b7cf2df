// Bindings of the ternary packing ops: quantize_ternary and unpack_ternary.
#include "bindings/checks.h"
#include "common/ternary_format.h"
#include "pack.h"

namespace mmfree {
namespace binding {
namespace {

void check_weight(const Tensor& weight) {
  check_float(weight, "weight");
  check_dim(weight, "weight", 2);
  check_contiguous(weight, "weight");
}

void check_packed(const Tensor& packed, int64_t in_features) {
  check_dtype(packed, "packed", kByte);
  check_dim(packed, "packed", 2);
  check_contiguous(packed, "packed");
  MMFREE_CHECK(in_features >= 1, "mmfree: argument 'in_features' must be >= 1, got ", in_features);
  MMFREE_CHECK(packed.size(1) == ternary::row_bytes(in_features), "mmfree: argument 'packed' must have ",
               ternary::row_bytes(in_features), " bytes per row for in_features=", in_features,
               " (ceil(K/128)*32), got shape ", packed.sizes());
}

std::tuple<Tensor, Tensor> quantize_ternary_impl(const Tensor& weight) {
  check_weight(weight);
  const int64_t rows = weight.size(0), k = weight.size(1);
  MMFREE_CHECK(k >= 1, "mmfree: argument 'weight' must have in_features >= 1, got shape ", weight.sizes());
  Tensor packed = empty({rows, ternary::row_bytes(k)}, kByte, weight);
  Tensor scale = empty({}, kFloat, weight);
  TernaryQuantizeParams p{weight.data_ptr(), to_dtype(weight.scalar_type()), rows, k,
                          ptr<uint8_t>(packed), ptr<float>(scale), nullptr};
  if (weight.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(weight);
    Tensor ws = empty({kTernaryQuantizeWorkspace}, kDouble, weight);
    p.workspace = ptr<double>(ws);
    MMFREE_CUDA_CHECK(cuda::ternary_quantize(p, current_stream(weight)));
#endif
  } else {
    cpu::ternary_quantize(p);
  }
  return {packed, scale};
}

Tensor unpack_ternary_impl(const Tensor& packed, int64_t in_features) {
  check_packed(packed, in_features);
  const int64_t rows = packed.size(0);
  Tensor out = empty({rows, in_features}, kChar, packed);
  int64_t invalid = 0;
  if (packed.is_cuda()) {
#if defined(MMFREE_WITH_CUDA)
    const CudaGuard guard(packed);
    Tensor count = empty({1}, kLong, packed);
    TernaryUnpackParams p{ptr<uint8_t>(packed), rows, in_features, ptr<int8_t>(out), ptr<int64_t>(count)};
    MMFREE_CUDA_CHECK(cuda::ternary_unpack(p, current_stream(packed)));
    // A sync: unpacking is a debugging/conversion op, not a hot path.
    invalid = *ptr<int64_t>(torch::stable::to(count, Device(torch::headeronly::DeviceType::CPU)));
#endif
  } else {
    TernaryUnpackParams p{ptr<uint8_t>(packed), rows, in_features, ptr<int8_t>(out), &invalid};
    cpu::ternary_unpack(p);
  }
  MMFREE_CHECK(invalid == 0, "mmfree: argument 'packed' holds ", invalid,
               " invalid 2-bit code(s) (code 3, or a non-zero code in the row padding); "
               "it is not a packed ternary tensor for in_features=",
               in_features);
  return out;
}

}  // namespace

#define MMFREE_PACK_IMPLS(m)                                     \
  m.impl("quantize_ternary", TORCH_BOX(&quantize_ternary_impl)); \
  m.impl("unpack_ternary", TORCH_BOX(&unpack_ternary_impl));

#if !defined(MMFREE_WITH_CUDA)
STABLE_TORCH_LIBRARY_FRAGMENT(mmfree, m) {
  m.def("quantize_ternary(Tensor weight) -> (Tensor packed, Tensor scale)");
  m.def("unpack_ternary(Tensor packed, int in_features) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(mmfree, CPU, m) { MMFREE_PACK_IMPLS(m) }
#else
STABLE_TORCH_LIBRARY_IMPL(mmfree, CUDA, m) { MMFREE_PACK_IMPLS(m) }
#endif

}  // namespace binding
}  // namespace mmfree
