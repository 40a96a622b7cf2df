// float64 rms_norm and rms_norm_swish_gate forward, computed in fp64 throughout: the exact
// path that makes gradcheck meaningful. (The quantizing ops follow the reference's fp32.)
#include <cmath>
#include <vector>

#include "cpu/norm/norm_row_io.h"
#include "cpu/norm/norm_rows.h"

namespace mmfree {
namespace cpu {
namespace norm_rows {

void rms_norm_f64(const RmsNormParams& p, int64_t r0, int64_t r1) {
  const int64_t k = p.k;
  std::vector<double> w(static_cast<size_t>(k)), s(static_cast<size_t>(k)), res(static_cast<size_t>(k));
  load_row(p.weight, p.w_dtype, 0, k, w.data());
  for (int64_t r = r0; r < r1; ++r) {
    load_row(p.x, p.dtype, r * k, k, s.data());
    if (p.residual != nullptr) {
      load_row(p.residual, p.dtype, r * k, k, res.data());
      for (int64_t i = 0; i < k; ++i) s[i] += res[i];
    }
    store_row(p.residual_out, p.dtype, r * k, k, s.data());
    double ss = 0;
    for (int64_t i = 0; i < k; ++i) ss += s[i] * s[i];
    const double rstd = 1.0 / std::sqrt(ss / static_cast<double>(k) + static_cast<double>(p.eps));
    for (int64_t i = 0; i < k; ++i) s[i] = (s[i] * rstd) * w[i];
    store_row(p.y, p.dtype, r * k, k, s.data());
  }
}

void swish_gate_f64(const RmsNormSwishGateParams& p, int64_t r0, int64_t r1) {
  const int64_t k = p.k;
  std::vector<double> w(static_cast<size_t>(k)), g(static_cast<size_t>(k)), h(static_cast<size_t>(k));
  load_row(p.weight, p.w_dtype, 0, k, w.data());
  for (int64_t r = r0; r < r1; ++r) {
    load_row(p.g, p.dtype, r * k, k, g.data());
    load_row(p.h, p.dtype, r * k, k, h.data());
    double ss = 0;
    for (int64_t i = 0; i < k; ++i) ss += g[i] * g[i];
    const double rstd = 1.0 / std::sqrt(ss / static_cast<double>(k) + static_cast<double>(p.eps));
    for (int64_t i = 0; i < k; ++i) g[i] = ((g[i] * rstd) * w[i]) * (h[i] / (1.0 + std::exp(-h[i])));
    store_row(p.y, p.dtype, r * k, k, g.data());
  }
}

}  // namespace norm_rows
}  // namespace cpu
}  // namespace mmfree
