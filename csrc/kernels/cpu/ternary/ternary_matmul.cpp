// CPU ternary matrix product: entry point, activation preparation, output rescale and the
// scalar path. The AVX2 / AVX-512 bodies live in ternary_matmul_avx2.cpp / _avx512.cpp.
//
// Work split: threads take disjoint ranges of output rows n (weight rows), so every
// packed weight byte is read by one thread; each range is processed for all M activation
// rows (the ISA bodies pick a GEMV loop for small M and an unpack-once GEMM for larger M).
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/float_convert.h"
#include "common/ternary_format.h"
#include "cpu/cpu_features.h"
#include "cpu/parallel.h"
#include "cpu/ternary/ternary_cpu.h"

namespace mmfree {
namespace cpu {
namespace ternary_detail {

void store_outputs(const TernaryMatmulParams& p, const PreparedX& px, int64_t m, int64_t n0, const int32_t* dot,
                   int64_t count) {
  const float xs = p.x_scale[m];
  const float ws = *p.w_scale;
  const int32_t rs = px.row_sum[m];
  const int64_t base = m * p.N + n0;
  switch (p.out_dtype) {
    case DType::kFloat32: {
      float* o = static_cast<float*>(p.out) + base;
      for (int64_t i = 0; i < count; ++i) o[i] = (static_cast<float>(dot[i] - rs) * xs) * ws;
      break;
    }
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(p.out) + base;
      for (int64_t i = 0; i < count; ++i) o[i] = float_to_bf16_bits((static_cast<float>(dot[i] - rs) * xs) * ws);
      break;
    }
    case DType::kFloat16: {
      uint16_t* o = static_cast<uint16_t*>(p.out) + base;
      for (int64_t i = 0; i < count; ++i) o[i] = float_to_fp16_bits((static_cast<float>(dot[i] - rs) * xs) * ws);
      break;
    }
    case DType::kFloat64: {
      double* o = static_cast<double*>(p.out) + base;
      for (int64_t i = 0; i < count; ++i) o[i] = (static_cast<float>(dot[i] - rs) * xs) * ws;
      break;
    }
  }
}

int64_t gemm_row_block(int64_t kp) {
  // About 192 KiB of activations per block: stays in a 512 KiB-1 MiB L2 next to the codes.
  const int64_t rows = (192 * 1024) / std::max<int64_t>(kp, 1);
  return std::max<int64_t>(8, std::min<int64_t>(256, rows)) & ~int64_t{3};
}

void matmul_rows_scalar(const TernaryMatmulParams& p, const PreparedX& px, int64_t n0, int64_t n1) {
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t nblocks = ternary::blocks_per_row(p.K);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = p.packed + n * rb;
    for (int64_t m = 0; m < p.M; ++m) {
      const int8_t* x = px.x + m * px.stride;
      int32_t dot = 0;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const uint8_t* wb = w + blk * ternary::kBlockBytes;
        const int8_t* xb = x + blk * ternary::kBlockWeights;
        for (int b = 0; b < ternary::kBlockBytes; ++b) {
          const uint8_t v = wb[b];
          dot += (v & 3) * xb[b] + ((v >> 2) & 3) * xb[32 + b] + ((v >> 4) & 3) * xb[64 + b] + (v >> 6) * xb[96 + b];
        }
      }
      store_outputs(p, px, m, n, &dot, 1);
    }
  }
}

int64_t gemv_x512_bytes(int64_t k) { return (ternary::blocks_per_row(k) + 1) / 2 * 256; }

RowsPlan plan_rows(int64_t m) {
  const Isa isa = active_isa();
  (void)isa;
  (void)m;
#if defined(MMFREE_HAVE_AVX512_KERNELS)
  if (isa == Isa::kAvx512) {
    if (m < kGemvMaxM && use_vnni512()) return {&gemv_rows_avx512, XLayout::kGemv512};
#if defined(MMFREE_HAVE_AMX_KERNELS)
    if (m >= kAmxMinM && use_amx_int8()) return {&matmul_rows_amx, XLayout::kAmx};
#endif
    return {&matmul_rows_avx512, XLayout::kPadded};
  }
#endif
#if defined(MMFREE_HAVE_AVX2_KERNELS)
  if (isa >= Isa::kAvx2) {
    if (m < kGemvMaxM && use_vnni256()) return {&gemv_rows_avxvnni, XLayout::kPadded};
    return {&matmul_rows_avx2, XLayout::kPadded};
  }
#endif
  return {&matmul_rows_scalar, XLayout::kPadded};
}

int64_t prepared_row_bytes(XLayout layout, int64_t k) {
  if (layout == XLayout::kGemv512) return gemv_x512_bytes(k);
  return ternary::blocks_per_row(k) * ternary::kBlockWeights;
}

int32_t prepare_x_row(XLayout layout, const int8_t* x, int64_t k, int8_t* dst) {
  int32_t s = 0;
  for (int64_t i = 0; i < k; ++i) s += x[i];
#if defined(MMFREE_HAVE_AVX512_KERNELS)
  if (layout == XLayout::kGemv512) {
    gemv_prepare_x512(x, k, dst);
    return s;
  }
#endif
  const int64_t kp = prepared_row_bytes(XLayout::kPadded, k);
  std::memcpy(dst, x, static_cast<size_t>(k));
  std::memset(dst + k, 0, static_cast<size_t>(kp - k));
  return s;
}

}  // namespace ternary_detail

void ternary_matmul(const TernaryMatmulParams& p) {
  using namespace ternary_detail;
  if (p.M <= 0 || p.N <= 0) return;
  const RowsPlan plan = plan_rows(p.M);
  const int64_t kp = ternary::blocks_per_row(p.K) * ternary::kBlockWeights;
  const int64_t row_bytes_x = prepared_row_bytes(plan.layout, p.K);

  // Activations: used in place when already padded rows of the padded layout, else
  // prepared (padded with zeros / reordered for the GEMV). Decode-sized buffers (<= 1 MiB)
  // are per-thread and kept between calls, so a decode step allocates nothing here.
  // Row sums are exact int32 (|sum| <= 128 * K).
  constexpr size_t kKeepBytes = size_t{1} << 20;
  thread_local std::vector<int8_t> keep_x;
  thread_local std::vector<int32_t> keep_sums;
  std::vector<int8_t> big_x;
  std::vector<int32_t> big_sums;
  const size_t x_bytes = static_cast<size_t>(p.M * row_bytes_x + 64);
  std::vector<int8_t>& xbuf = x_bytes <= kKeepBytes ? keep_x : big_x;
  std::vector<int32_t>& row_sum = x_bytes <= kKeepBytes ? keep_sums : big_sums;
  row_sum.resize(static_cast<size_t>(p.M));
  const bool in_place = plan.layout == XLayout::kPadded && kp == p.K;
  PreparedX px{p.x_q, p.x_row_stride, kp, row_sum.data()};
  if (plan.layout == XLayout::kAmx) {
#if defined(MMFREE_HAVE_AMX_KERNELS)
    const int64_t mpad = (p.M + 31) / 32 * 32;
    std::vector<int8_t> xv(static_cast<size_t>(amx_x_bytes(p.M, kp) + 64));
    int8_t* base = xv.data() + ((64 - reinterpret_cast<uintptr_t>(xv.data()) % 64) % 64);
    int32_t* sums = row_sum.data();
    parallel_for(0, mpad, std::max<int64_t>(16, 65536 / kp), [&](int64_t m0, int64_t m1) {
      amx_prepare_x(p.x_q, p.x_row_stride, p.M, p.K, kp, m0, m1, base);
      for (int64_t m = m0; m < std::min(m1, p.M); ++m) {
        const int8_t* src = p.x_q + m * p.x_row_stride;
        int32_t s = 0;
        for (int64_t k = 0; k < p.K; ++k) s += src[k];
        sums[m] = s;
      }
    });
    const PreparedX pa{base, kp, kp, sums};
    // Blocks of 32 weight rows per task (the AMX tile block).
    parallel_for(0, (p.N + 31) / 32, 4, [&](int64_t t0, int64_t t1) {
      matmul_rows_amx(p, pa, t0 * 32, std::min(p.N, t1 * 32));
    });
    return;
#endif
  }
  if (!in_place) {
    if (xbuf.size() < x_bytes) xbuf.resize(x_bytes);
    int8_t* base = xbuf.data() + ((64 - reinterpret_cast<uintptr_t>(xbuf.data()) % 64) % 64);
    px.x = base;
    px.stride = row_bytes_x;
  }
  int32_t* sums = row_sum.data();
  int8_t* xdst = const_cast<int8_t*>(px.x);
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / kp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* src = p.x_q + m * p.x_row_stride;
      if (in_place) {
        int32_t s = 0;
        for (int64_t k = 0; k < p.K; ++k) s += src[k];
        sums[m] = s;
      } else {
        sums[m] = prepare_x_row(plan.layout, src, p.K, xdst + m * row_bytes_x);
      }
    }
  });

  const auto body = plan.body;
  // Grain: enough rows that a task reads >= 64 KiB of weights (and at least 4 rows, the
  // GEMM tile), so small layers do not pay for thread wake-ups.
  const int64_t rb = ternary::row_bytes(p.K);
  const int64_t grain = std::max<int64_t>(4, ((65536 / std::max<int64_t>(rb * std::min<int64_t>(p.M, 16), 1)) + 3) & ~int64_t{3});
  // Tasks aligned to 4 rows so each ISA body sees whole tiles except at the very end.
  const int64_t tiles = (p.N + 3) / 4;
  parallel_for(0, tiles, std::max<int64_t>(1, grain / 4), [&](int64_t t0, int64_t t1) {
    body(p, px, t0 * 4, std::min(p.N, t1 * 4));
  });
}

}  // namespace cpu
}  // namespace mmfree
