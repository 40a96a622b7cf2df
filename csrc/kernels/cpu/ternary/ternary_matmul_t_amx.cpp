// AMX-BF16 body of the transposed ternary product out = grad @ (W_q * w_scale) (training dX).
//
// The result stays an fp32 sum of EXACT products, as on the AVX paths: W_q in {-1, 0, 1} is
// exact in bf16, and each fp32 grad value g is split into three bf16 terms hi + mid + lo
// whose sum is g exactly (truncation to the top 8 significand bits three times: 3 x 8 bits
// cover fp32's 24; the CUDA mma kernel does the same, see ternary.h). TDPBF16PS multiplies
// bf16 pairs exactly and accumulates in fp32, so all three terms are fed against the same
// decoded weight tile: C[m, k] += hi[m, n] w[n, k] + mid[m, n] w[n, k] + lo[m, n] w[n, k].
//
// Differences from the AVX-512/AVX2 bodies, rounding only:
//  * summation order: those add g * (w * w_scale) one n at a time into each output (a
//    rounded product g * w_scale per term); here the tile unit adds exact products pairwise
//    (two n) into fp32, the hi terms into one accumulator and the mid + lo terms into a
//    second (2^-8 the magnitude), and out = (acc_hi + acc_ml) * w_scale. Both are fp32 sums
//    within the usual accumulation bound ~ (3N) eps sum |g w|.
//  * TDPBF16PS treats bf16 denormals as zero and flushes denormal results (DAZ/FTZ, MXCSR
//    ignored): a lo (or mid) term below 2^-126 is dropped, so grads below ~2^-110 in
//    magnitude lose low bits. Gradients that small are far below anything that matters.
//  * a non-finite g gets mid = lo = 0 (so +-inf stays +-inf instead of inf - inf = NaN).
//
// Data: the three terms are prepared once per call as bf16 matrices [Mp, Np] (M, N rounded
// up to 32, zero padded), 6 bytes per grad element. Each task owns (up to 128 rows x one
// 128-column panel); it walks N in chunks of 128 weight rows, decoding the chunk's 2-bit
// codes into bf16 tiles in the VNNI pair layout (32 KiB), and per 16 rows x 32 columns keeps
// 2 hi + 2 mid/lo C tiles (5 tile loads per 6 TDPBF16PS), stored between chunks in two fp32
// block buffers (64 KiB each, L2).
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "common/ternary_format.h"
#include "cpu/parallel.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {
namespace {

constexpr int64_t kChunkRows = 128;  // weight rows (n) decoded per chunk
constexpr int64_t kSteps = kChunkRows / 32;
constexpr int64_t kBlockRows = 128;  // grad rows per task
constexpr int kColTiles = static_cast<int>(kTPanelCols / 16);

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
    cfg.colsb[t] = 64;  // C: 16 fp32; A: 32 bf16 (n); B: 16 columns x a bf16 pair (n, n+1)
  }
  _tile_loadconfig(&cfg);
}

// bf16 of the weights of rows [n0, n0 + kChunkRows) (rows >= N are 0) for columns
// k0 .. k0+127 in the VNNI pair layout: tile (t, s) = columns k0+16t.., rows n0+32s.., at
// b + (t * kSteps + s) * 512 halves; its row q holds [w(n, k), w(n+1, k)] for the 16 k,
// n = n0 + 32 s + 2 q.
void decode_chunk(const TernaryMatmulTParams& p, int64_t n0, int64_t k0, uint16_t* b) {
  const int64_t rb = ternary::row_bytes(p.K);
  const __m512i m3 = _mm512_set1_epi16(3);
  // code -> bf16: 0 -> -1 (0xBF80), 1 -> 0, 2 -> +1 (0x3F80), 3 (unused) -> 0
  alignas(64) uint16_t lut_h[32] = {0xBF80, 0, 0x3F80, 0};
  const __m512i lut = _mm512_load_si512(lut_h);
  alignas(64) int16_t lo_idx[32], hi_idx[32];
  for (int i = 0; i < 32; ++i) {
    lo_idx[i] = static_cast<int16_t>((i % 2) * 32 + i / 2);
    hi_idx[i] = static_cast<int16_t>((i % 2) * 32 + 16 + i / 2);
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int64_t r = 0; r < kChunkRows; r += 2) {
    const int64_t n = n0 + r;
    const int64_t s = r / 32, q = (r % 32) / 2;
    __m512i va = _mm512_setzero_si512(), vb = _mm512_setzero_si512();
    // 32 codes bytes per row, widened to 16-bit lanes; rows >= N stay "all zero weights".
    const bool have_a = n < p.N, have_b = n + 1 < p.N;
    if (have_a) va = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.packed + n * rb + (k0 / 128) * 32)));
    if (have_b) vb = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.packed + (n + 1) * rb + (k0 / 128) * 32)));
    for (int j = 0; j < 4; ++j) {
      const __m128i sh = _mm_cvtsi32_si128(2 * j);
      // columns k0 + 32 j + b (b = 0..31) are bit pair j of byte b
      __m512i wa = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srl_epi16(va, sh), m3), lut);
      __m512i wb = _mm512_permutexvar_epi16(_mm512_and_si512(_mm512_srl_epi16(vb, sh), m3), lut);
      if (!have_a) wa = _mm512_setzero_si512();
      if (!have_b) wb = _mm512_setzero_si512();
      const int t0 = 2 * j, t1 = 2 * j + 1;
      _mm512_store_si512(b + ((t0 * kSteps + s) * 16 + q) * 32, _mm512_permutex2var_epi16(wa, ilo, wb));
      _mm512_store_si512(b + ((t1 * kSteps + s) * 16 + q) * 32, _mm512_permutex2var_epi16(wa, ihi, wb));
    }
  }
}

// Three bf16 terms of 16 fp32 values, hi + mid + lo == g exactly (non-finite: hi only).
inline void split16(__m512 g, __m256i* hi, __m256i* mid, __m256i* lo) {
  const __m512i top = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512 h = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(g), top));
  const __mmask16 finite =
      _mm512_cmplt_epu32_mask(_mm512_and_si512(_mm512_castps_si512(g), _mm512_set1_epi32(0x7fffffff)),
                              _mm512_set1_epi32(0x7f800000));
  const __m512 r1 = _mm512_maskz_sub_ps(finite, g, h);
  const __m512 md = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(r1), top));
  const __m512 l = _mm512_sub_ps(r1, md);
  *hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(h), 16));
  *mid = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(md), 16));
  *lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(l), 16));
}

// Rows [m0, m1) of the three term matrices (each [mp, np] halves, zero padded).
void split_rows(const TernaryMatmulTParams& p, int64_t np, int64_t m0, int64_t m1, uint16_t* terms, int64_t term) {
  for (int64_t m = m0; m < m1; ++m) {
    uint16_t* h = terms + m * np;
    uint16_t* md = h + term;
    uint16_t* l = md + term;
    if (m >= p.M) {
      std::memset(h, 0, sizeof(uint16_t) * static_cast<size_t>(np));
      std::memset(md, 0, sizeof(uint16_t) * static_cast<size_t>(np));
      std::memset(l, 0, sizeof(uint16_t) * static_cast<size_t>(np));
      continue;
    }
    const float* g = p.grad + m * p.N;
    for (int64_t n = 0; n < np; n += 16) {
      const int64_t cnt = std::min<int64_t>(16, p.N - n);
      const __mmask16 mask = cnt >= 16 ? static_cast<__mmask16>(0xffff)
                                       : static_cast<__mmask16>(cnt > 0 ? (1u << cnt) - 1u : 0u);
      __m256i a, b, c;
      split16(_mm512_maskz_loadu_ps(mask, g + n), &a, &b, &c);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(h + n), a);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(md + n), b);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(l + n), c);
    }
  }
}

// out[m0:m1, k0:k1) for one panel: over all N in chunks, the hi terms accumulate in one fp32
// block (acc_hi) and the mid + lo terms in another (acc_ml, 2^-8 the magnitude, so its
// roundings are 2^-8 smaller); out = (acc_hi + acc_ml) * w_scale. One accumulator for all
// three terms measured ~2.5x the fp32 path's error on the loss tests (3N roundings at the
// full magnitude); this keeps the error at the level of an N-term fp32 sum.
void panel_tile(const TernaryMatmulTParams& p, const uint16_t* terms, int64_t np, int64_t term, int64_t m0,
                int64_t m1, int64_t k0, int64_t k1, uint16_t* wbuf, float* acc_hi, float* acc_ml) {
  const int64_t rows = m1 - m0, rows_p = (rows + 15) / 16 * 16;
  const int64_t cols = k1 - k0, cols_p = (cols + 31) / 32 * 32;
  std::memset(acc_hi, 0, sizeof(float) * static_cast<size_t>(kBlockRows * kTPanelCols));
  std::memset(acc_ml, 0, sizeof(float) * static_cast<size_t>(kBlockRows * kTPanelCols));
  constexpr int64_t ldc = kTPanelCols * 4;  // bytes between acc rows
  const int64_t lda = np * 2;
  for (int64_t n0 = 0; n0 < np; n0 += kChunkRows) {
    decode_chunk(p, n0, k0, wbuf);
    const int64_t steps = std::min<int64_t>(kSteps, (np - n0) / 32);
    for (int64_t mb = 0; mb < rows_p; mb += 16) {
      const uint16_t* a = terms + (m0 + mb) * np + n0;
      for (int64_t kb = 0; kb < cols_p; kb += 32) {
        const int t = static_cast<int>(kb / 16);
        float* ch = acc_hi + mb * kTPanelCols + kb;
        float* cm = acc_ml + mb * kTPanelCols + kb;
        _tile_loadd(0, ch, ldc);
        _tile_loadd(1, ch + 16, ldc);
        _tile_loadd(2, cm, ldc);
        _tile_loadd(3, cm + 16, ldc);
        for (int64_t s = 0; s < steps; ++s) {
          _tile_loadd(4, wbuf + (t * kSteps + s) * 512, 64);
          _tile_loadd(5, wbuf + ((t + 1) * kSteps + s) * 512, 64);
          _tile_loadd(6, a + s * 32, lda);  // hi
          _tile_dpbf16ps(0, 6, 4);
          _tile_dpbf16ps(1, 6, 5);
          _tile_loadd(7, a + term + s * 32, lda);  // mid
          _tile_dpbf16ps(2, 7, 4);
          _tile_dpbf16ps(3, 7, 5);
          _tile_loadd(6, a + 2 * term + s * 32, lda);  // lo
          _tile_dpbf16ps(2, 6, 4);
          _tile_dpbf16ps(3, 6, 5);
        }
        _tile_stored(0, ch, ldc);
        _tile_stored(1, ch + 16, ldc);
        _tile_stored(2, cm, ldc);
        _tile_stored(3, cm + 16, ldc);
      }
    }
  }
  const __m512 ws = _mm512_set1_ps(*p.w_scale);
  for (int64_t r = 0; r < rows; ++r) {
    float* o = p.out + (m0 + r) * p.K + k0;
    const float* h = acc_hi + r * kTPanelCols;
    const float* l = acc_ml + r * kTPanelCols;
    for (int64_t c = 0; c < cols; c += 16) {
      const int64_t cnt = std::min<int64_t>(16, cols - c);
      const __mmask16 mask = static_cast<__mmask16>(cnt >= 16 ? 0xffffu : (1u << cnt) - 1u);
      const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, h + c), _mm512_maskz_loadu_ps(mask, l + c));
      _mm512_mask_storeu_ps(o + c, mask, _mm512_mul_ps(sum, ws));
    }
  }
}

}  // namespace

void matmul_t_amx_bf16(const TernaryMatmulTParams& p) {
  const int64_t mp = (p.M + 31) / 32 * 32, np = (p.N + 31) / 32 * 32;
  const int64_t term = mp * np;  // halves between the hi, mid and lo matrices
  // Freed on every exit (a task may throw through parallel_for).
  std::unique_ptr<uint16_t, void (*)(void*)> owner(
      static_cast<uint16_t*>(std::aligned_alloc(64, static_cast<size_t>((3 * term * 2 + 63) / 64 * 64))), &std::free);
  if (owner == nullptr) throw std::bad_alloc();
  uint16_t* terms = owner.get();
  parallel_for(0, mp, 16, [&](int64_t r0, int64_t r1) { split_rows(p, np, r0, r1, terms, term); });
  const int64_t panels = (p.K + kTPanelCols - 1) / kTPanelCols;
  const int64_t row_blocks = (p.M + kBlockRows - 1) / kBlockRows;
  parallel_for(0, panels * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) static thread_local uint16_t wbuf[kColTiles * kSteps * 512];
    alignas(64) static thread_local float acc_hi[kBlockRows * kTPanelCols];
    alignas(64) static thread_local float acc_ml[kBlockRows * kTPanelCols];
    configure_tiles();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t panel = t % panels, rblk = t / panels;
      const int64_t k0 = panel * kTPanelCols, m0 = rblk * kBlockRows;
      panel_tile(p, terms, np, term, m0, std::min(p.M, m0 + kBlockRows), k0, std::min(p.K, k0 + kTPanelCols), wbuf,
                 acc_hi, acc_ml);
    }
    _tile_release();
  });
}

}  // namespace ternary_detail
}  // namespace cpu
}  // namespace mmfree
