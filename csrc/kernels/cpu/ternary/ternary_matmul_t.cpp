// CPU transposed ternary product for the BitLinear backward: out = grad @ (W_q * w_scale).
// Entry point and scalar path; the AVX2 body (also used on AVX-512 machines) is in
// ternary_matmul_t_avx2.cpp. Work is split into (row block x 128-column panel) tiles;
// each tile decodes its own panel of W from the packed codes, one slice at a time.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ternary_format.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {

void matmul_t_tile_scalar(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const float ws = *p.w_scale;
  const int64_t cols = k1 - k0;
  float wrow[kTPanelCols];
  for (int64_t m = m0; m < m1; ++m) std::memset(p.out + m * p.K + k0, 0, sizeof(float) * static_cast<size_t>(cols));
  for (int64_t n = 0; n < p.N; ++n) {
    const uint8_t* w = p.packed + n * rb;
    for (int64_t k = k0; k < k1; ++k) {
      const int code = (w[ternary::byte_of(k)] >> ternary::shift_of(k)) & 3;
      wrow[k - k0] = static_cast<float>(ternary::decode(static_cast<uint8_t>(code))) * ws;
    }
    for (int64_t m = m0; m < m1; ++m) {
      const float g = p.grad[m * p.N + n];
      float* o = p.out + m * p.K + k0;
      for (int64_t c = 0; c < cols; ++c) o[c] += g * wrow[c];
    }
  }
}

}  // namespace ternary_detail

void ternary_matmul_t(const TernaryMatmulTParams& p) {
  using namespace ternary_detail;
  if (p.M <= 0 || p.K <= 0) return;
  if (p.N <= 0) {
    std::memset(p.out, 0, sizeof(float) * static_cast<size_t>(p.M * p.K));
    return;
  }
#if defined(MMFREE_HAVE_AMX_KERNELS)
  if (p.M >= kAmxMinM && use_amx_bf16()) {
    matmul_t_amx_bf16(p);
    return;
  }
#endif
  auto body = &matmul_t_tile_scalar;
#if defined(MMFREE_HAVE_AVX2_KERNELS)
  if (active_isa() >= Isa::kAvx2) body = &matmul_t_tile_avx2;
#endif
  constexpr int64_t kRowBlock = 192;  // rows per tile (a multiple of the 6-row micro-tile)
  const int64_t panels = (p.K + kTPanelCols - 1) / kTPanelCols;
  const int64_t row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  parallel_for(0, panels * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t % panels, rblk = t / panels;
      const int64_t k0 = panel * kTPanelCols, m0 = rblk * kRowBlock;
      body(p, m0, std::min(p.M, m0 + kRowBlock), k0, std::min(p.K, k0 + kTPanelCols));
    }
  });
}

}  // namespace cpu
}  // namespace mmfree
