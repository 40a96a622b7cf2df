// AVX-512 body of the CPU ternary product (see ternary_matmul.cpp for the work split).
//
// With AVX-512 VNNI, vpdpbusd(acc, c, x) multiplies the unsigned offset codes c = w + 1 by
// the signed int8 activations and adds groups of 4 straight into int32 lanes: 64 MACs per
// instruction and no int16 stage. Without VNNI (Skylake-X) the same loops use
// vpmaddubsw (|pair sum| <= 512) then vpmaddwd with ones into int32, which cannot
// overflow either.
//
// One 32-byte packed block holds k = j*32 + b in bit pair j of byte b. Broadcast to both
// halves of a zmm and shifted per 16-bit lane by {0, 2} (low / high half) then masked, it
// gives the codes of k = 0..63 in order; shifted by {4, 6}, those of k = 64..127.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/ternary_format.h"
#include "cpu/cpu_features.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

constexpr int64_t kChunk = 1024;  // K per unpacked code chunk in the GEMM path
constexpr int kNr = 4;            // weight rows per GEMM tile
constexpr int kMr = 4;            // activation rows per GEMM micro-tile

// Horizontal sum (spelled out: _mm512_reduce_add_epi32 trips the same GCC 12 warning).
inline int32_t reduce_add(__m512i v) {
  const __m256i s = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(0xf, v, 0), _mm512_maskz_extracti64x4_epi64(0xf, v, 1));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  return _mm_cvtsi128_si32(t);
}

template <bool kVnni>
inline __m512i dot_add(__m512i acc, __m512i codes, __m512i x) {
  if constexpr (kVnni) {
    // Same instruction as _mm512_dpbusd_epi32(acc, codes, x) (GCC's own operand order:
    // "vpdpbusd %3, %2, %0" with %1 tied to %0), written as asm because GCC 12's register
    // allocator copies every accumulator of the intrinsic once per step (one extra move per
    // vpdpbusd in the GEMM loop).
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(codes), "vm"(x));
    return acc;
  } else {
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(codes, x), _mm512_set1_epi16(1)));
  }
}

inline void block_codes(const uint8_t* w, __m512i* lo, __m512i* hi) {
  const __m512i m3 = _mm512_set1_epi8(3);
  // 16-bit lane shifts: lanes 0..15 (low 256 bits) and 16..31 (high 256 bits), written as
  // dword pairs. (The maskz/set forms avoid GCC 12's -Wmaybe-uninitialized false positive
  // on the intrinsics built from _mm512_undefined.)
  const __m512i sh_lo = _mm512_set_epi32(0x00020002, 0x00020002, 0x00020002, 0x00020002, 0x00020002, 0x00020002,
                                         0x00020002, 0x00020002, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i sh_hi = _mm512_set_epi32(0x00060006, 0x00060006, 0x00060006, 0x00060006, 0x00060006, 0x00060006,
                                         0x00060006, 0x00060006, 0x00040004, 0x00040004, 0x00040004, 0x00040004,
                                         0x00040004, 0x00040004, 0x00040004, 0x00040004);
  const __m512i v = _mm512_maskz_broadcast_i64x4(0xff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
  *lo = _mm512_and_si512(_mm512_srlv_epi16(v, sh_lo), m3);
  *hi = _mm512_and_si512(_mm512_srlv_epi16(v, sh_hi), m3);
}

template <bool kVnni>
int32_t dot_row(const uint8_t* w, const int8_t* x, int64_t nblocks) {
  __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    __m512i lo, hi;
    block_codes(w + blk * 32, &lo, &hi);
    a = dot_add<kVnni>(a, lo, _mm512_loadu_si512(x + blk * 128));
    b = dot_add<kVnni>(b, hi, _mm512_loadu_si512(x + blk * 128 + 64));
  }
  return reduce_add(_mm512_add_epi32(a, b));
}

void unpack_chunk(const uint8_t* packed, int64_t rb, int64_t n, int rows, int64_t k0, int64_t klen, uint8_t* codes) {
  for (int r = 0; r < kNr; ++r) {
    uint8_t* dst = codes + r * kChunk;
    if (r >= rows) {
      std::memset(dst, 0, static_cast<size_t>(klen));
      continue;
    }
    const uint8_t* src = packed + (n + r) * rb + (k0 / 128) * 32;
    for (int64_t blk = 0; blk < klen / 128; ++blk) {
      __m512i lo, hi;
      block_codes(src + blk * 32, &lo, &hi);
      _mm512_store_si512(dst + blk * 128, lo);
      _mm512_store_si512(dst + blk * 128 + 64, hi);
    }
  }
}

// One activation row against the kNr code rows of this k step.
template <bool kVnni>
inline void row_step(__m512i& a0, __m512i& a1, __m512i& a2, __m512i& a3, const __m512i* c, __m512i xv) {
  a0 = dot_add<kVnni>(a0, c[0], xv);
  a1 = dot_add<kVnni>(a1, c[1], xv);
  a2 = dot_add<kVnni>(a2, c[2], xv);
  a3 = dot_add<kVnni>(a3, c[3], xv);
}

// MR (<= kMr) activation rows x kNr unpacked weight rows over one chunk. The sixteen
// accumulators are named variables: as a __m512i[4][4] array GCC 12 shuffles them through
// extra register moves every step.
template <bool kVnni, int MR>
void micro(const uint8_t* codes, const int8_t* x, int64_t stride, int64_t klen, int32_t* acc) {
  static_assert(MR >= 1 && MR <= kMr && kNr == 4, "micro-tile shape");
  const __m512i z = _mm512_setzero_si512();
  __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
  __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
  for (int64_t k = 0; k < klen; k += 64) {
    __m512i c[kNr];
    for (int r = 0; r < kNr; ++r) c[r] = _mm512_load_si512(codes + r * kChunk + k);
    row_step<kVnni>(a00, a01, a02, a03, c, _mm512_loadu_si512(x + k));
    if constexpr (MR > 1) row_step<kVnni>(a10, a11, a12, a13, c, _mm512_loadu_si512(x + stride + k));
    if constexpr (MR > 2) row_step<kVnni>(a20, a21, a22, a23, c, _mm512_loadu_si512(x + 2 * stride + k));
    if constexpr (MR > 3) row_step<kVnni>(a30, a31, a32, a33, c, _mm512_loadu_si512(x + 3 * stride + k));
  }
  const __m512i all[kMr][kNr] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < kNr; ++r) acc[i * kNr + r] += reduce_add(all[i][r]);
}

template <bool kVnni>
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
        for (; i + kMr <= mc; i += kMr) micro<kVnni, kMr>(codes, xb + i * px.stride, px.stride, klen, acc.data() + i * kNr);
        const int64_t rest = mc - i;
        int32_t* a = acc.data() + i * kNr;
        const int8_t* xr = xb + i * px.stride;
        if (rest == 3) micro<kVnni, 3>(codes, xr, px.stride, klen, a);
        if (rest == 2) micro<kVnni, 2>(codes, xr, px.stride, klen, a);
        if (rest == 1) micro<kVnni, 1>(codes, xr, px.stride, klen, a);
      }
      for (int64_t i = 0; i < mc; ++i) store_outputs(p, px, mb + i, n, acc.data() + i * kNr, rows);
    }
  }
}

template <bool kVnni>
void rows(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  if (p.M >= 4) {
    gemm<kVnni>(p, px, n0, n1);
    return;
  }
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = px.kp / 128;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t m = 0; m < p.M; ++m) {
      const int32_t dot = dot_row<kVnni>(p.packed + n * rb, px.x + m * px.stride, nblocks);
      store_outputs(p, px, m, n, &dot, 1);
    }
  }
}

}  // namespace

void matmul_rows_avx512(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  if (use_vnni512()) {
    rows<true>(p, px, n0, n1);
  } else {
    rows<false>(p, px, n0, n1);
  }
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
