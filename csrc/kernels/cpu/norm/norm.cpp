// CPU entry points of the norm kernels: weight conversion, scratch, ISA choice and the
// split over rows. The math lives in norm_rows.inl (scalar / AVX2 / AVX-512 builds of it)
// and, for float64 rms_norm / swish_gate, in norm_f64.cpp.
#include <algorithm>
#include <vector>

#include "cpu/cpu_features.h"
#include "cpu/norm/norm_row_io.h"
#include "cpu/norm/norm_rows.h"
#include "cpu/norm/norm_serial.h"
#include "cpu/parallel.h"
#include "norm.h"

namespace mmfree {
namespace cpu {
namespace {

// Rows per task: about 32K elements, so a single decode row (or a few) never pays for a
// thread hand-off, while prefill batches spread over all threads.
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(k, 1)); }

// fp32 view of n weights: the pointer itself when already fp32, else a converted copy.
const float* weights_f32(const void* w, DType t, int64_t n, std::vector<float>& buf) {
  if (t == DType::kFloat32) return static_cast<const float*>(w);
  buf.resize(static_cast<size_t>(n));
  norm_rows::load_row(w, t, 0, n, buf.data());  // dtype switch outside the loop: vectorizes
  return buf.data();
}

// The row kernel for the active ISA among the builds that exist (nullptr: not compiled),
// scalar otherwise.
#if defined(MMFREE_HAVE_AVX512_KERNELS)
#define MMFREE_NORM_AVX512(f) &norm_rows::f
#else
#define MMFREE_NORM_AVX512(f) nullptr
#endif
#if defined(MMFREE_HAVE_AVX2_KERNELS)
#define MMFREE_NORM_AVX2(f) &norm_rows::f
#else
#define MMFREE_NORM_AVX2(f) nullptr
#endif

template <class Fn>
Fn pick(Fn scalar, Fn avx2, Fn avx512) {
  const Isa path = active_isa();
  if (path == Isa::kAvx512 && avx512 != nullptr) return avx512;
  if (path == Isa::kAvx2 && avx2 != nullptr) return avx2;
  return scalar;
}
#define MMFREE_NORM_PICK(name) pick(&norm_rows::name##_scalar, MMFREE_NORM_AVX2(name##_avx2), MMFREE_NORM_AVX512(name##_avx512))

}  // namespace

void rms_norm_quant(const RmsNormQuantParams& p) {
  if (p.rows == 0 || p.k == 0) return;
  std::vector<float> wbuf;
  const float* w32 = weights_f32(p.weights, p.w_dtype, p.num_weights * p.k, wbuf);
  const auto rows = MMFREE_NORM_PICK(quant);
  parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) { rows(p, w32, r0, r1); });
}

void rms_norm(const RmsNormParams& p) {
  if (p.rows == 0 || p.k == 0) return;
  if (p.dtype == DType::kFloat64) {
    parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) { norm_rows::rms_norm_f64(p, r0, r1); });
    return;
  }
  std::vector<float> wbuf;
  const float* w32 = weights_f32(p.weight, p.w_dtype, p.k, wbuf);
  const auto rows = MMFREE_NORM_PICK(rms_norm);
  parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) { rows(p, w32, r0, r1); });
}

void rms_norm_swish_gate(const RmsNormSwishGateParams& p) {
  if (p.rows == 0 || p.k == 0) return;
  if (p.dtype == DType::kFloat64) {
    parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) { norm_rows::swish_gate_f64(p, r0, r1); });
    return;
  }
  std::vector<float> wbuf;
  const float* w32 = weights_f32(p.weight, p.w_dtype, p.k, wbuf);
  const auto rows = MMFREE_NORM_PICK(swish_gate);
  parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) { rows(p, w32, r0, r1); });
}

void rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p) {
  if (p.rows == 0 || p.k == 0) return;
  std::vector<float> wbuf, nwbuf;
  const float* w32 = weights_f32(p.weight, p.w_dtype, p.k, wbuf);
  const float* nw32 = weights_f32(p.norm_weight, p.norm_w_dtype, p.k, nwbuf);
  const auto rows = MMFREE_NORM_PICK(swish_gate_quant);
  parallel_for(0, p.rows, row_grain(p.k), [&](int64_t r0, int64_t r1) {
    std::vector<float> scratch(static_cast<size_t>(p.k));
    rows(p, w32, nw32, scratch.data(), r0, r1);
  });
}

namespace norm_serial {

void rms_norm_quant(const RmsNormQuantParams& p, const float* w32) {
  if (p.rows == 0 || p.k == 0) return;
  MMFREE_NORM_PICK(quant)(p, w32, 0, p.rows);
}

void rms_norm(const RmsNormParams& p, const float* w32) {
  if (p.rows == 0 || p.k == 0) return;
  MMFREE_NORM_PICK(rms_norm)(p, w32, 0, p.rows);
}

void rms_norm_swish_gate_quant(const RmsNormSwishGateParams& p, const float* w32, const float* nw32, float* scratch) {
  if (p.rows == 0 || p.k == 0) return;
  MMFREE_NORM_PICK(swish_gate_quant)(p, w32, nw32, scratch, 0, p.rows);
}

}  // namespace norm_serial

}  // namespace cpu
}  // namespace mmfree
