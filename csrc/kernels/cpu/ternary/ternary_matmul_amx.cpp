// AMX-INT8 body of the CPU ternary product (M >= kAmxMinM activation rows), exact int32.
//
// The weights are the A operand and the activations the B operand, so neither side needs a
// transpose of the 2-bit data: TDPBUSD multiplies unsigned bytes of A (the offset codes
// c = w + 1, decoded in natural k order by shifts + masks, one 32-row block of W at a time
// into an L2-sized buffer) by signed bytes of B (the int8 activations, rearranged once per
// call into the VNNI tile layout: tile row q holds k = 4q..4q+3 of 16 activation rows), and
// adds groups of four products into int32: C[n, m] = sum_k c[n, k] * x[m, k], exact. The
// output is then acc - row_sum(x[m]) as on every other path.
//
// Blocking: 2 x 2 accumulator tiles (32 weight rows x 32 activation rows), 2 A + 2 B tiles
// per 64-k step: 4 TDPBUSD (64 cycles) per 4 KiB of tile loads from L1/L2. The tiles are
// configured on entry and released on exit of every call (per thread).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "common/ternary_format.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;  // C tiles: 16 int32; A: 64 codes; B: 16 rows x 4 activations
  }
  _tile_loadconfig(&cfg);
}

// Codes of weight rows [n, n + rows) (rows <= 32; missing rows get code 0, which adds
// nothing) for all kp columns, natural order, 32 rows x kp bytes.
void decode_block(const uint8_t* packed, int64_t rb, int64_t kp, int64_t n, int rows, uint8_t* codes) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const __m512i sh_lo = _mm512_set_epi32(0x00020002, 0x00020002, 0x00020002, 0x00020002, 0x00020002, 0x00020002,
                                         0x00020002, 0x00020002, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i sh_hi = _mm512_set_epi32(0x00060006, 0x00060006, 0x00060006, 0x00060006, 0x00060006, 0x00060006,
                                         0x00060006, 0x00060006, 0x00040004, 0x00040004, 0x00040004, 0x00040004,
                                         0x00040004, 0x00040004, 0x00040004, 0x00040004);
  for (int r = 0; r < 32; ++r) {
    uint8_t* dst = codes + r * kp;
    if (r >= rows) {
      std::memset(dst, 0, static_cast<size_t>(kp));
      continue;
    }
    const uint8_t* src = packed + (n + r) * rb;
    for (int64_t blk = 0; blk < kp / 128; ++blk) {
      const __m512i v = _mm512_maskz_broadcast_i64x4(0xff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + blk * 32)));
      _mm512_storeu_si512(dst + blk * 128, _mm512_and_si512(_mm512_srlv_epi16(v, sh_lo), m3));
      _mm512_storeu_si512(dst + blk * 128 + 64, _mm512_and_si512(_mm512_srlv_epi16(v, sh_hi), m3));
    }
  }
}

// out[m, n .. n + rows) from column j of the C tiles (weight rows along the tile's rows):
// gathered 16 at a time, rescaled as store_outputs does ((float(acc - row_sum) * x_scale) *
// w_scale, the same fp32 operations) and rounded as it does (bf16: round to nearest even
// with quiet NaNs, the integer trick of float_to_bf16_bits).
void store_column(const TernaryMatmulParams& p, const PreparedX& px, int64_t m, int64_t n, const int32_t* c_lo,
                  const int32_t* c_hi, int rows) {
  if (p.out_dtype != DType::kFloat32 && p.out_dtype != DType::kBFloat16) {
    alignas(64) int32_t dots[32];
    for (int r = 0; r < rows; ++r) dots[r] = (r < 16 ? c_lo : c_hi)[(r % 16) * 16];
    store_outputs(p, px, m, n, dots, rows);
    return;
  }
  const __m512i idx = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80, 64, 48, 32, 16, 0);
  const __m512i rs = _mm512_set1_epi32(px.row_sum[m]);
  const __m512 xs = _mm512_set1_ps(p.x_scale[m]), ws = _mm512_set1_ps(*p.w_scale);
  for (int half = 0; half * 16 < rows; ++half) {
    const int cnt = std::min(16, rows - half * 16);
    const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
    const __m512i acc = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, idx, half ? c_hi : c_lo, 4);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xffff, _mm512_sub_epi32(acc, rs)), xs), ws);
    const int64_t at = m * p.N + n + half * 16;
    if (p.out_dtype == DType::kFloat32) {
      _mm512_mask_storeu_ps(static_cast<float*>(p.out) + at, mask, v);
    } else {
      const __m512i u = _mm512_castps_si512(v);
      const __m512i one = _mm512_set1_epi32(1);
      const __m512i hi = _mm512_maskz_srli_epi32(0xffff, u, 16);
      const __m512i rounded = _mm512_maskz_srli_epi32(
          0xffff, _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, one))), 16);
      const __m512i nan = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
      const __mmask16 is_nan =
          _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
      const __m512i bits = _mm512_mask_blend_epi32(is_nan, rounded, nan);
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.out) + at, mask, _mm512_maskz_cvtepi32_epi16(0xffff, bits));
    }
  }
}

}  // namespace

int64_t amx_x_bytes(int64_t m, int64_t kp) { return (m + 31) / 32 * 32 * kp; }

void amx_prepare_x(const int8_t* x, int64_t stride, int64_t m, int64_t k, int64_t kp, int64_t m0, int64_t m1,
                   int8_t* xv) {
  // Blocks of 16 rows: block b holds kp/4 tile rows of 64 bytes, row q = [x[16b + j][4q .. 4q+3], j = 0..15].
  const int64_t full = k / 4;
  for (int64_t r = m0; r < m1; ++r) {
    int8_t* blk = xv + (r / 16) * 16 * kp + (r % 16) * 4;
    int64_t q = 0;
    if (r < m) {
      const int8_t* src = x + r * stride;
      for (; q < full; ++q) std::memcpy(blk + q * 64, src + 4 * q, 4);
      if (q < kp / 4 && 4 * q < k) {
        int8_t quad[4] = {0, 0, 0, 0};
        std::memcpy(quad, src + 4 * q, static_cast<size_t>(k - 4 * q));
        std::memcpy(blk + q * 64, quad, 4);
        ++q;
      }
    }
    for (; q < kp / 4; ++q) std::memset(blk + q * 64, 0, 4);
  }
}

void matmul_rows_amx(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t kp = px.kp;
  const int64_t mblocks = (p.M + 31) / 32;
  // Codes of kSuper weight rows (kSuper * kp bytes, <= 864 KiB at K = 6912: L2), kept between
  // calls. Each 32-activation-row block of x (32 * kp bytes) is then reused from L1/L2 for
  // all kSuper / 32 row blocks of codes, so x streams from L3 once per kSuper weight rows.
  constexpr int64_t kSuper = 128;
  thread_local uint8_t* codes = nullptr;
  thread_local int64_t codes_bytes = 0;
  if (codes_bytes < kSuper * kp) {
    std::free(codes);
    codes = static_cast<uint8_t*>(std::aligned_alloc(64, static_cast<size_t>(kSuper * kp)));
    codes_bytes = kSuper * kp;
  }
  alignas(64) int32_t c[4][16 * 16];
  configure_tiles();
  for (int64_t ns = n0; ns < n1; ns += kSuper) {
    const int64_t nsub = std::min(kSuper, n1 - ns);
    for (int64_t sb = 0; sb * 32 < nsub; ++sb) {
      decode_block(p.packed, rb, kp, ns + sb * 32, static_cast<int>(std::min<int64_t>(32, nsub - sb * 32)),
                   codes + sb * 32 * kp);
    }
    for (int64_t mb = 0; mb < mblocks; ++mb) {
      const int8_t* xb0 = px.x + (2 * mb) * 16 * kp;
      const int8_t* xb1 = xb0 + 16 * kp;
      for (int64_t sb = 0; sb * 32 < nsub; ++sb) {
        const int64_t n = ns + sb * 32;
        const int rows = static_cast<int>(std::min<int64_t>(32, n1 - n));
        const uint8_t* cb = codes + sb * 32 * kp;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t k = 0; k < kp; k += 64) {
          _tile_loadd(4, cb + k, kp);
          _tile_loadd(5, cb + 16 * kp + k, kp);
          _tile_loadd(6, xb0 + k * 16, 64);
          _tile_loadd(7, xb1 + k * 16, 64);
          _tile_dpbusd(0, 4, 6);
          _tile_dpbusd(1, 4, 7);
          _tile_dpbusd(2, 5, 6);
          _tile_dpbusd(3, 5, 7);
        }
        _tile_stored(0, c[0], 64);
        _tile_stored(1, c[1], 64);
        _tile_stored(2, c[2], 64);
        _tile_stored(3, c[3], 64);
        // c[2 * a + b][i * 16 + j]: weight row n + 16a + i, activation row 32 mb + 16 b + j.
        for (int64_t j = 0; j < 32; ++j) {
          const int64_t m = 32 * mb + j;
          if (m >= p.M) break;
          const int b = static_cast<int>(j / 16), jj = static_cast<int>(j % 16);
          store_column(p, px, m, n, c[b] + jj, c[2 + b] + jj, rows);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
