// CPU per-row absmax int8 quantization (quant_rows.h). Each row is widened to fp32 once
// into a per-chunk buffer, then reduced and coded; rows run in parallel.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common/float_convert.h"
#include "cpu/parallel.h"
#include "quant_rows.h"

namespace mmfree {
namespace cpu {
namespace {

void widen_row(const void* in, DType t, int64_t offset, int64_t cols, float* out) {
  switch (t) {
    case DType::kFloat32: std::copy_n(static_cast<const float*>(in) + offset, cols, out); break;
    case DType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(in) + offset;
      for (int64_t i = 0; i < cols; ++i) out[i] = bf16_bits_to_float(src[i]);
      break;
    }
    default:
      for (int64_t i = 0; i < cols; ++i) out[i] = load_as_float(in, t, offset + i);
  }
}

void quantize_row(const float* g, int64_t cols, int8_t* q, float* scale) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t i = 0; i < cols; ++i) {
    finite = finite && std::isfinite(g[i]);
    amax = std::max(amax, std::fabs(g[i]));
  }
  if (!finite) {
    *scale = std::nanf("");
    std::fill_n(q, cols, int8_t{0});
    return;
  }
  const float s0 = amax / 127.0f;  // 0 for a zero row and for subnormal rows below 127 * 2^-149
  const float s = s0 > 0.f ? s0 : 1.0f;
  *scale = s;
  for (int64_t i = 0; i < cols; ++i) {
    const float r = std::nearbyint(g[i] / s);  // round half to even (the default rounding mode)
    q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, r)));
  }
}

}  // namespace

void quantize_rows_int8(const QuantRowsParams& p) {
  if (p.rows == 0 || p.cols == 0) {
    std::fill_n(p.scale, p.rows, 1.0f);  // an empty row is an all-zero row
    return;
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / p.cols);
  parallel_for(0, p.rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(static_cast<size_t>(p.cols));
    for (int64_t r = r0; r < r1; ++r) {
      widen_row(p.in, p.in_dtype, r * p.cols, p.cols, row.data());
      quantize_row(row.data(), p.cols, p.q + r * p.cols, p.scale + r);
    }
  });
}

}  // namespace cpu
}  // namespace mmfree
