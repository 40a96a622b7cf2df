// AVX2/FMA body of the transposed ternary product out = grad @ (W_q * w_scale).
//
// A classic register-blocked SGEMM (6 x 16 micro-tile, 12 ymm accumulators) whose B
// operand is decoded on the fly: the 128-column panel of up to kPanelRows weight rows is
// one packed block per row, expanded to floats {-w_scale, 0, +w_scale} in a 128 KiB
// buffer (L2) and reused by every row of the tile. W is never materialized in float.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/ternary_format.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

constexpr int64_t kPanelRows = 256;
constexpr int kStrips = kTPanelCols / 16;

// panel[s][n][16]: strip s holds columns k0 + 16 s .. +15, which are bytes 16*(s%2)..+15
// of the block at bit pair s/2 (k = j*32 + b).
void decode_panel(const TernaryMatmulTParams& p, int64_t n0, int64_t rows, int64_t k0, float* panel) {
  const int64_t rb = ternary::row_bytes(p.K);
  const __m128i m3 = _mm_set1_epi8(3);
  const __m256 ws = _mm256_set1_ps(*p.w_scale);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t n = 0; n < rows; ++n) {
    const uint8_t* blk = p.packed + (n0 + n) * rb + (k0 / 128) * 32;
    for (int s = 0; s < kStrips; ++s) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16 * (s % 2)));
      const __m128i c = _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(2 * (s / 2))), m3);
      const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
      const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
      float* dst = panel + (s * kPanelRows + n) * 16;
      _mm256_store_ps(dst, _mm256_mul_ps(_mm256_sub_ps(lo, one), ws));
      _mm256_store_ps(dst + 8, _mm256_mul_ps(_mm256_sub_ps(hi, one), ws));
    }
  }
}

// c[i, 0..cols) += sum_n a[i, n] * b[n, 0..16) for MR rows.
template <int MR>
void micro(const float* a, int64_t lda, const float* b, int64_t nlen, float* c, int64_t ldc, int cols) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t n = 0; n < nlen; ++n) {
    const __m256 b0 = _mm256_load_ps(b + n * 16), b1 = _mm256_load_ps(b + n * 16 + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * lda + n);
      acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (cols == 16) {
      _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][0]));
      _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_loadu_ps(ci + 8), acc[i][1]));
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, acc[i][0]);
      _mm256_store_ps(tmp + 8, acc[i][1]);
      for (int j = 0; j < cols; ++j) ci[j] += tmp[j];
    }
  }
}

}  // namespace

void matmul_t_tile_avx2(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1) {
  alignas(64) static thread_local float panel[kStrips * kPanelRows * 16];
  const int64_t cols = k1 - k0;
  for (int64_t m = m0; m < m1; ++m) std::memset(p.out + m * p.K + k0, 0, sizeof(float) * static_cast<size_t>(cols));
  for (int64_t n0 = 0; n0 < p.N; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, p.N - n0);
    decode_panel(p, n0, rows, k0, panel);
    for (int s = 0; s < kStrips && 16 * s < cols; ++s) {
      const int scols = static_cast<int>(std::min<int64_t>(16, cols - 16 * s));
      const float* b = panel + s * kPanelRows * 16;
      int64_t m = m0;
      for (; m + 6 <= m1; m += 6) micro<6>(p.grad + m * p.N + n0, p.N, b, rows, p.out + m * p.K + k0 + 16 * s, p.K, scols);
      const float* a = p.grad + m * p.N + n0;
      float* c = p.out + m * p.K + k0 + 16 * s;
      switch (m1 - m) {
        case 5: micro<5>(a, p.N, b, rows, c, p.K, scols); break;
        case 4: micro<4>(a, p.N, b, rows, c, p.K, scols); break;
        case 3: micro<3>(a, p.N, b, rows, c, p.K, scols); break;
        case 2: micro<2>(a, p.N, b, rows, c, p.K, scols); break;
        case 1: micro<1>(a, p.N, b, rows, c, p.K, scols); break;
        default: break;
      }
    }
  }
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
