// AVX-512 VNNI GEMV body of the CPU ternary product (M < kGemvMaxM activation rows).
//
// The codes are never shifted: a 64-byte load v of one weight row covers two packed blocks
// (256 k), and v & (3 << 2j) holds the codes of bit pair j multiplied by 4^j. vpdpbusd
// multiplies those unsigned bytes by the signed activations straight into int32 lanes, one
// accumulator per j; each accumulator lane is then exactly 4^j times its dot product, so
//   dot = acc0 + (acc1 >> 2) + (acc2 >> 4) + (acc3 >> 6)      (exact arithmetic shifts).
// Per 64 weight bytes: 1 load, 1 prefetch, 4 vpandd, 4 vpdpbusd (the activations come from L1), i.e. 4
// cycles on the two 512-bit ports, ~16 bytes/cycle/core: well above a core's DRAM share.
// Range: |acc3 lane| <= 4 * 192 * 128 * (K / 256) = 384 * K < 2^31 for K < 5.5M.
//
// Lane L of byte j of the load holds k = (L / 32) * 128 + j * 32 + (L % 32) (two blocks),
// so the activations are prepared in that order (gemv_prepare_x512): 64 bytes per (pair of
// blocks, j). An odd last block is read with a 32-byte masked load; its upper half of the
// prepared activations is zero.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "common/ternary_format.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

// Software prefetch distance (bytes ahead in the weight stream, into L2/L3): the hardware
// streamer alone left the cold GEMV at ~8.5 GB/s, 8 KiB ahead gives ~12-14 GB/s on 2 cores
// (benchmarks/NOTES.md).
constexpr int64_t kPrefetchBytes = 8192;
inline __m512i dpbusd(__m512i acc, __m512i codes, __m512i x) {
  // vpdpbusd written as asm: GCC 12's register allocator adds a copy per intrinsic call.
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "v"(x));
  return acc;
}

inline int32_t reduce_add(__m512i v) {
  const __m256i s = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v, 0), _mm512_maskz_extracti64x4_epi64(0xf, v, 1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  return _mm_cvtsi128_si32(t);
}

// Sums of four row vectors at once: out[r] = sum of the lanes of v[r].
inline void reduce4(__m512i v0, __m512i v1, __m512i v2, __m512i v3, int32_t* out) {
  // 512 -> 256: add halves, then interleave pairs so one more add level handles two rows.
  const __m256i a0 = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v0, 0), _mm512_maskz_extracti64x4_epi64(0xf, v0, 1));
  const __m256i a1 = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v1, 0), _mm512_maskz_extracti64x4_epi64(0xf, v1, 1));
  const __m256i a2 = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v2, 0), _mm512_maskz_extracti64x4_epi64(0xf, v2, 1));
  const __m256i a3 = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v3, 0), _mm512_maskz_extracti64x4_epi64(0xf, v3, 1));
  const __m256i h01 = _mm256_hadd_epi32(a0, a1);  // [a0 pairs, a1 pairs] per 128-bit lane
  const __m256i h23 = _mm256_hadd_epi32(a2, a3);
  const __m256i h = _mm256_hadd_epi32(h01, h23);  // per lane: r0, r1, r2, r3 partials
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), s);
}

inline __m512i combine(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
  return _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_maskz_srai_epi32(0xffff, a1, 2)),
                          _mm512_add_epi32(_mm512_maskz_srai_epi32(0xffff, a2, 4), _mm512_maskz_srai_epi32(0xffff, a3, 6)));
}

// R (1..4) weight rows x one prepared activation row: dots[r] = sum_k c[n + r, k] * x[k].
template <int R>
void rows_dot(const uint8_t* w, int64_t rb, const int8_t* xp, int64_t nblocks, int32_t* dots) {
  const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
  const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8(static_cast<char>(0xc0));
  const __m512i z = _mm512_setzero_si512();
  __m512i a[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) a[r][j] = z;
  const int64_t pairs = nblocks / 2;
  auto step = [&](int64_t c, __mmask64 mask) {
    const int8_t* xc = xp + c * 256;
    const __m512i x0 = _mm512_load_si512(xc), x1 = _mm512_load_si512(xc + 64);
    const __m512i x2 = _mm512_load_si512(xc + 128), x3 = _mm512_load_si512(xc + 192);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * rb + c * 64 + kPrefetchBytes), _MM_HINT_T2);
      const __m512i v = mask == ~__mmask64{0} ? _mm512_loadu_si512(w + r * rb + c * 64)
                                              : _mm512_maskz_loadu_epi8(mask, w + r * rb + c * 64);
      a[r][0] = dpbusd(a[r][0], _mm512_and_si512(v, m0), x0);
      a[r][1] = dpbusd(a[r][1], _mm512_and_si512(v, m1), x1);
      a[r][2] = dpbusd(a[r][2], _mm512_and_si512(v, m2), x2);
      a[r][3] = dpbusd(a[r][3], _mm512_and_si512(v, m3), x3);
    }
  };
  for (int64_t c = 0; c < pairs; ++c) step(c, ~__mmask64{0});
  if (nblocks & 1) step(pairs, __mmask64{0xffffffff});
  if constexpr (R == 4) {
    reduce4(combine(a[0][0], a[0][1], a[0][2], a[0][3]), combine(a[1][0], a[1][1], a[1][2], a[1][3]),
            combine(a[2][0], a[2][1], a[2][2], a[2][3]), combine(a[3][0], a[3][1], a[3][2], a[3][3]), dots);
  } else {
    for (int r = 0; r < R; ++r) dots[r] = reduce_add(combine(a[r][0], a[r][1], a[r][2], a[r][3]));
  }
}

}  // namespace

void gemv_prepare_x512(const int8_t* x, int64_t k, int8_t* xp) {
  const int64_t nblocks = ternary::blocks_per_row(k);
  const int64_t bytes = gemv_x512_bytes(k);
  std::memset(xp, 0, static_cast<size_t>(bytes));
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t half = blk & 1;
    int8_t* dst = xp + (blk / 2) * 256 + half * 32;
    for (int j = 0; j < 4; ++j) {
      const int64_t k0 = blk * 128 + j * 32;
      if (k0 >= k) break;
      std::memcpy(dst + j * 64, x + k0, static_cast<size_t>(std::min<int64_t>(32, k - k0)));
    }
  }
}

void gemv_rows_avx512(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = ternary::blocks_per_row(p.K);
  alignas(16) int32_t dots[4];
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    for (int64_t m = 0; m < p.M; ++m) {
      rows_dot<4>(p.packed + n * rb, rb, px.x + m * px.stride, nblocks, dots);
      store_outputs(p, px, m, n, dots, 4);
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
