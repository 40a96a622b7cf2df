// AVX2 body of the CPU ternary product (see ternary_matmul.cpp for the work split).
//
// Offset codes c = w + 1 in {0, 1, 2} are unsigned, activations signed int8, so
// vpmaddubsw(c, x) multiplies them pairwise and adds adjacent pairs into int16:
// |c0*x0 + c1*x1| <= 2*2*128 = 512 per lane. Every int16 accumulator below adds at most
// kMaxInt16Terms such results (|sum| <= 64 * 512 = 32768 would still fit; we stop at 32,
// i.e. <= 16384) before vpmaddwd widens it to int32, so no input can overflow, at any K.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ternary_format.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

constexpr int kMaxInt16Terms = 32;
constexpr int64_t kChunk = 1024;  // K per unpacked code chunk in the GEMM path (32 x 32)
constexpr int kNr = 4;            // weight rows per GEMM tile
static_assert(kChunk / 32 <= kMaxInt16Terms, "GEMM int16 accumulators would overflow");

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// Offset dot product sum_k c[k] * x[k] of one packed weight row and one padded activation
// row, unpacking the codes in registers (shift + and per 32 codes).
int32_t dot_row(const uint8_t* w, const int8_t* x, int64_t nblocks) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256();
  // Two int16 accumulators, each adding 2 maddubs results per block.
  constexpr int64_t kFlushBlocks = kMaxInt16Terms / 2;
  for (int64_t blk0 = 0; blk0 < nblocks; blk0 += kFlushBlocks) {
    const int64_t blk1 = std::min(nblocks, blk0 + kFlushBlocks);
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + blk * 32));
      const int8_t* xb = x + blk * 128;
      const __m256i c0 = _mm256_and_si256(v, m3);
      const __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
      const __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
      const __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
      const __m256i p0 = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb)));
      const __m256i p1 = _mm256_maddubs_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 32)));
      const __m256i p2 = _mm256_maddubs_epi16(c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 64)));
      const __m256i p3 = _mm256_maddubs_epi16(c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 96)));
      a = _mm256_add_epi16(a, _mm256_add_epi16(p0, p1));
      b = _mm256_add_epi16(b, _mm256_add_epi16(p2, p3));
    }
    acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones)));
  }
  return hsum_epi32(acc);
}

// Codes of `rows` weight rows for k in [k0, k0 + klen) into codes[r * kChunk + k - k0],
// in natural k order (one byte per code). Missing rows (rows < kNr) read as zero codes.
void unpack_chunk(const uint8_t* packed, int64_t rb, int64_t n, int rows, int64_t k0, int64_t klen, uint8_t* codes) {
  const __m256i m3 = _mm256_set1_epi8(3);
  for (int r = 0; r < kNr; ++r) {
    uint8_t* dst = codes + r * kChunk;
    if (r >= rows) {
      std::memset(dst, 0, static_cast<size_t>(klen));
      continue;
    }
    const uint8_t* src = packed + (n + r) * rb + (k0 / 128) * 32;
    for (int64_t blk = 0; blk < klen / 128; ++blk) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + blk * 32));
      __m256i* d = reinterpret_cast<__m256i*>(dst + blk * 128);
      _mm256_store_si256(d + 0, _mm256_and_si256(v, m3));
      _mm256_store_si256(d + 1, _mm256_and_si256(_mm256_srli_epi16(v, 2), m3));
      _mm256_store_si256(d + 2, _mm256_and_si256(_mm256_srli_epi16(v, 4), m3));
      _mm256_store_si256(d + 3, _mm256_and_si256(_mm256_srli_epi16(v, 6), m3));
    }
  }
}

// One activation row against the kNr code rows of this k step (int16 accumulation).
inline void row_step(__m256i& s0, __m256i& s1, __m256i& s2, __m256i& s3, const __m256i* c, __m256i xv) {
  s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(c[0], xv));
  s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(c[1], xv));
  s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(c[2], xv));
  s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(c[3], xv));
}

// Adds the int32 sums of four int16 accumulators to acc[0..3].
inline void flush4(__m256i s0, __m256i s1, __m256i s2, __m256i s3, int32_t* acc) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i t0 = _mm256_madd_epi16(s0, ones), t1 = _mm256_madd_epi16(s1, ones);
  const __m256i t2 = _mm256_madd_epi16(s2, ones), t3 = _mm256_madd_epi16(s3, ones);
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(t0, t1), _mm256_hadd_epi32(t2, t3));
  const __m128i sum = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  __m128i* a = reinterpret_cast<__m128i*>(acc);
  _mm_storeu_si128(a, _mm_add_epi32(_mm_loadu_si128(a), sum));
}

// MR (1 or 2) activation rows x kNr unpacked weight rows over one chunk (<= kChunk, so each
// int16 lane adds at most kChunk/32 maddubs results); adds into acc[i * kNr + r]. Named
// accumulators: GCC 12 spills a __m256i[MR][4] array to the stack every step.
template <int MR>
void micro(const uint8_t* codes, const int8_t* x, int64_t stride, int64_t klen, int32_t* acc) {
  static_assert(MR == 1 || MR == 2, "micro-tile shape");
  const __m256i z = _mm256_setzero_si256();
  __m256i s00 = z, s01 = z, s02 = z, s03 = z, s10 = z, s11 = z, s12 = z, s13 = z;
  for (int64_t k = 0; k < klen; k += 32) {
    __m256i c[kNr];
    for (int r = 0; r < kNr; ++r) c[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(codes + r * kChunk + k));
    row_step(s00, s01, s02, s03, c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    if constexpr (MR > 1) {
      row_step(s10, s11, s12, s13, c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + stride + k)));
    }
  }
  flush4(s00, s01, s02, s03, acc);
  if constexpr (MR > 1) flush4(s10, s11, s12, s13, acc + kNr);
}

void gemm(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t mc_max = gemm_row_block(px.kp);
  alignas(64) uint8_t codes[kNr * kChunk];
  std::vector<int32_t> acc(static_cast<size_t>(mc_max * kNr));
  for (int64_t mb = 0; mb < p.M; mb += mc_max) {
    const int64_t mc = std::min(mc_max, p.M - mb);
    for (int64_t n = n0; n < n1; n += kNr) {
      const int rows = static_cast<int>(std::min<int64_t>(kNr, n1 - n));
      std::fill(acc.begin(), acc.end(), 0);
      for (int64_t k0 = 0; k0 < px.kp; k0 += kChunk) {
        const int64_t klen = std::min(kChunk, px.kp - k0);
        unpack_chunk(p.packed, rb, n, rows, k0, klen, codes);
        const int8_t* xb = px.x + mb * px.stride + k0;
        int64_t i = 0;
        for (; i + 2 <= mc; i += 2) micro<2>(codes, xb + i * px.stride, px.stride, klen, acc.data() + i * kNr);
        if (i < mc) micro<1>(codes, xb + i * px.stride, px.stride, klen, acc.data() + i * kNr);
      }
      for (int64_t i = 0; i < mc; ++i) store_outputs(p, px, mb + i, n, acc.data() + i * kNr, rows);
    }
  }
}

}  // namespace

void matmul_rows_avx2(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  if (p.M >= 4) {
    gemm(p, px, n0, n1);
    return;
  }
  // GEMV: each weight row is streamed from memory once and stays in L1 for the other
  // (at most 3) activation rows.
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = px.kp / 128;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      const int32_t dot = dot_row(p.packed + n * rb, px.x + m * px.stride, nblocks);
      store_outputs(p, px, m, n, &dot, 1);
    }
  }
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
