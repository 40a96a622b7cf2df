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

}  // namespace ternary_detail

void ternary_matmul(const TernaryMatmulParams& p) {
  using namespace ternary_detail;
  if (p.M <= 0 || p.N <= 0) return;
  const int64_t kp = ternary::blocks_per_row(p.K) * ternary::kBlockWeights;

  // Pad rows to Kp with zeros unless they already are a multiple of 128 long. Row sums are
  // exact int32 (|sum| <= 128 * K).
  std::vector<int8_t> padded;
  std::vector<int32_t> row_sum(static_cast<size_t>(p.M));
  PreparedX px{p.x_q, p.x_row_stride, kp, row_sum.data()};
  if (kp != p.K) {
    padded.assign(static_cast<size_t>(p.M * kp), 0);
    px.x = padded.data();
    px.stride = kp;
  }
  parallel_for(0, p.M, std::max<int64_t>(1, 65536 / kp), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int8_t* src = p.x_q + m * p.x_row_stride;
      if (kp != p.K) std::memcpy(padded.data() + m * kp, src, static_cast<size_t>(p.K));
      int32_t s = 0;
      for (int64_t k = 0; k < p.K; ++k) s += src[k];
      row_sum[static_cast<size_t>(m)] = s;
    }
  });

  auto body = &matmul_rows_scalar;
  switch (active_isa()) {
#if defined(MMFREE_HAVE_AVX512_KERNELS)
    case Isa::kAvx512: body = &matmul_rows_avx512; break;
#endif
#if defined(MMFREE_HAVE_AVX2_KERNELS)
    case Isa::kAvx2: body = &matmul_rows_avx2; break;
#endif
    default: break;
  }
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
