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

// c[i, 0..cols) += sum_n a[n][i] * b[n][0..16) for i < rows_out, with a packed as [n][6]
// (contiguous, so the six broadcasts of one step share a cache line and rows of grad that
// are 4 KiB apart cannot alias in L1).
void micro(const float* a, const float* b, int64_t nlen, float* c, int64_t ldc, int rows_out, int cols) {
  // Twelve named accumulators: GCC 12 keeps a __m256[6][2] array on the stack (a store per
  // FMA), which cost 3x here.
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t n = 0; n < nlen; ++n) {
    const __m256 b0 = _mm256_load_ps(b + n * 16), b1 = _mm256_load_ps(b + n * 16 + 8);
    const float* an = a + n * 6;
    __m256 av = _mm256_broadcast_ss(an + 0);
    c00 = _mm256_fmadd_ps(av, b0, c00);
    c01 = _mm256_fmadd_ps(av, b1, c01);
    av = _mm256_broadcast_ss(an + 1);
    c10 = _mm256_fmadd_ps(av, b0, c10);
    c11 = _mm256_fmadd_ps(av, b1, c11);
    av = _mm256_broadcast_ss(an + 2);
    c20 = _mm256_fmadd_ps(av, b0, c20);
    c21 = _mm256_fmadd_ps(av, b1, c21);
    av = _mm256_broadcast_ss(an + 3);
    c30 = _mm256_fmadd_ps(av, b0, c30);
    c31 = _mm256_fmadd_ps(av, b1, c31);
    av = _mm256_broadcast_ss(an + 4);
    c40 = _mm256_fmadd_ps(av, b0, c40);
    c41 = _mm256_fmadd_ps(av, b1, c41);
    av = _mm256_broadcast_ss(an + 5);
    c50 = _mm256_fmadd_ps(av, b0, c50);
    c51 = _mm256_fmadd_ps(av, b1, c51);
  }
  const __m256 lo[6] = {c00, c10, c20, c30, c40, c50};
  const __m256 hi[6] = {c01, c11, c21, c31, c41, c51};
  for (int i = 0; i < rows_out; ++i) {
    float* ci = c + i * ldc;
    if (cols == 16) {
      _mm256_storeu_ps(ci, _mm256_add_ps(_mm256_loadu_ps(ci), lo[i]));
      _mm256_storeu_ps(ci + 8, _mm256_add_ps(_mm256_loadu_ps(ci + 8), hi[i]));
    } else {
      alignas(32) float tmp[16];
      _mm256_store_ps(tmp, lo[i]);
      _mm256_store_ps(tmp + 8, hi[i]);
      for (int j = 0; j < cols; ++j) ci[j] += tmp[j];
    }
  }
}

}  // namespace

void matmul_t_tile_avx2(const TernaryMatmulTParams& p, int64_t m0, int64_t m1, int64_t k0, int64_t k1) {
  alignas(64) static thread_local float panel[kStrips * kPanelRows * 16];
  alignas(64) float apack[kPanelRows * 6];
  const int64_t cols = k1 - k0;
  for (int64_t m = m0; m < m1; ++m) std::memset(p.out + m * p.K + k0, 0, sizeof(float) * static_cast<size_t>(cols));
  for (int64_t n0 = 0; n0 < p.N; n0 += kPanelRows) {
    const int64_t rows = std::min(kPanelRows, p.N - n0);
    decode_panel(p, n0, rows, k0, panel);
    for (int64_t m = m0; m < m1; m += 6) {
      const int mr = static_cast<int>(std::min<int64_t>(6, m1 - m));
      for (int64_t n = 0; n < rows; ++n) {
        for (int i = 0; i < 6; ++i) apack[n * 6 + i] = i < mr ? p.grad[(m + i) * p.N + n0 + n] : 0.f;
      }
      for (int s = 0; s < kStrips && 16 * s < cols; ++s) {
        const int scols = static_cast<int>(std::min<int64_t>(16, cols - 16 * s));
        micro(apack, panel + s * kPanelRows * 16, rows, p.out + m * p.K + k0 + 16 * s, p.K, mr, scols);
      }
    }
  }
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
