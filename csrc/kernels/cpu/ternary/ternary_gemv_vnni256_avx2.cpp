// AVX-VNNI (256-bit, VEX-encoded vpdpbusd) GEMV body of the CPU ternary product, for CPUs
// with AVX-VNNI but without AVX-512 (Alder Lake and later client cores, Zen 5 desktop parts
// with AVX-512 disabled) and for runs capped to the AVX2 path on AVX-512 machines.
//
// Same mask trick as ternary_gemv_avx512.cpp: a 32-byte load is exactly one packed block,
// v & (3 << 2j) holds the codes of k = j*32 + b times 4^j, so the activations keep their
// natural (padded) order. dot = acc0 + (acc1 >> 2) + (acc2 >> 4) + (acc3 >> 6), exact.
// Compiled with the AVX2 flags; the one VNNI instruction is written as asm ({vex} prefix),
// so the compiler needs no -mavxvnni, and it only runs when cpu_features().avxvnni.
#include <immintrin.h>

#include "common/ternary_format.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

inline __m256i dpbusd(__m256i acc, __m256i codes, __m256i x) {
  __asm__("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(codes), "x"(x));
  return acc;
}

inline __m256i combine(__m256i a0, __m256i a1, __m256i a2, __m256i a3) {
  return _mm256_add_epi32(_mm256_add_epi32(a0, _mm256_srai_epi32(a1, 2)),
                          _mm256_add_epi32(_mm256_srai_epi32(a2, 4), _mm256_srai_epi32(a3, 6)));
}

inline int32_t reduce1(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// R (1 or 2) weight rows: 2 x 4 accumulators + 4 activation vectors + masks fit the 16 ymm.
template <int R>
void rows_dot(const uint8_t* w, int64_t rb, const int8_t* x, int64_t nblocks, int32_t* dots) {
  const __m256i m0 = _mm256_set1_epi8(0x03), m1 = _mm256_set1_epi8(0x0c);
  const __m256i m2 = _mm256_set1_epi8(0x30), m3 = _mm256_set1_epi8(static_cast<char>(0xc0));
  __m256i a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = _mm256_setzero_si256();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const __m256i* xb = reinterpret_cast<const __m256i*>(x + blk * 128);
    const __m256i x0 = _mm256_loadu_si256(xb), x1 = _mm256_loadu_si256(xb + 1);
    const __m256i x2 = _mm256_loadu_si256(xb + 2), x3 = _mm256_loadu_si256(xb + 3);
    for (int r = 0; r < R; ++r) {
      // 8 KiB ahead into L2/L3, as the AVX-512 GEMV (the streamer alone is not enough).
      _mm_prefetch(reinterpret_cast<const char*>(w + r * rb + blk * 32 + 8192), _MM_HINT_T2);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * rb + blk * 32));
      a[r][0] = dpbusd(a[r][0], _mm256_and_si256(v, m0), x0);
      a[r][1] = dpbusd(a[r][1], _mm256_and_si256(v, m1), x1);
      a[r][2] = dpbusd(a[r][2], _mm256_and_si256(v, m2), x2);
      a[r][3] = dpbusd(a[r][3], _mm256_and_si256(v, m3), x3);
    }
  }
  for (int r = 0; r < R; ++r) dots[r] = reduce1(combine(a[r][0], a[r][1], a[r][2], a[r][3]));
}

}  // namespace

void gemv_rows_avxvnni(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = ternary::blocks_per_row(p.K);
  int32_t dots[2];
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    for (int64_t m = 0; m < p.M; ++m) {
      rows_dot<2>(p.packed + n * rb, rb, px.x + m * px.stride, nblocks, dots);
      store_outputs(p, px, m, n, dots, 2);
    }
  }
  for (; n < n1; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      rows_dot<1>(p.packed + n * rb, rb, px.x + m * px.stride, nblocks, dots);
      store_outputs(p, px, m, n, dots, 1);
    }
  }
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
