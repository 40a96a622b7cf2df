// CPU quantization/packing of ternary weights. Not on a hot path (it runs once per
// weight at load or once per training step), so it is plain C++ parallel over rows.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/float_convert.h"
#include "common/ternary_format.h"
#include "cpu/parallel.h"
#include "pack.h"

namespace mmfree {
namespace cpu {
namespace {

// Sum of |W| in double over fixed-size chunks added in a fixed order, so the scale does
// not depend on the thread count.
constexpr int64_t kSumChunk = 1 << 16;

template <class T, class Load>
double abs_sum(const T* w, int64_t n, Load load) {
  const int64_t chunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Eight double lanes: vectorizes, stays deterministic, and keeps mean|W| within an ulp
      // of the exact mean (float lanes of 128 sequential adds drifted ~12 ulps on constant rows).
      const int64_t end = std::min(n, (c + 1) * kSumChunk);
      double s = 0.0;
      for (int64_t i0 = c * kSumChunk; i0 < end; i0 += 1024) {
        double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        const int64_t i1 = std::min(end, i0 + 1024);
        int64_t i = i0;
        for (; i + 8 <= i1; i += 8) {
          for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(std::fabs(load(w[i + l])));
        }
        for (; i < i1; ++i) lane[0] += static_cast<double>(std::fabs(load(w[i])));
        for (double v : lane) s += v;
      }
      partial[static_cast<size_t>(c)] = s;
    }
  });
  double total = 0.0;
  for (double s : partial) total += s;
  return total;
}

// clamp(round_half_away(v * inv), -1, 1) without a rounding call: the thresholds are the
// rounding ties, so this is exact and vectorizes. NaN compares false and gives 0.
inline int8_t ternary_code_of(float v, float inv) {
  const float x = v * inv;
  return static_cast<int8_t>((x >= 0.5f) - (x <= -0.5f));
}

template <class T, class Load>
void quantize_typed(const TernaryQuantizeParams& p, const T* w, Load load) {
  const int64_t n = p.rows * p.in_features;
  const float mean = n > 0 ? static_cast<float>(abs_sum(w, n, load) / static_cast<double>(n)) : 0.f;
  const float scale = std::max(mean, 1e-5f);
  const float inv = 1.0f / scale;  // s_w of SPEC.md, applied as a multiply like the reference
  *p.scale = scale;
  const int64_t k_total = p.in_features;
  const int64_t nblocks = ternary::blocks_per_row(k_total);
  parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) {
    uint8_t codes[ternary::kBlockWeights];
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = w + r * k_total;
      uint8_t* row = p.packed + r * nblocks * ternary::kBlockBytes;
      for (int64_t blk = 0; blk < nblocks; ++blk) {
        const int64_t k0 = blk * ternary::kBlockWeights;
        const int64_t valid = std::min<int64_t>(ternary::kBlockWeights, k_total - k0);
        for (int64_t i = 0; i < valid; ++i) codes[i] = static_cast<uint8_t>(ternary_code_of(load(src[k0 + i]), inv) + 1);
        for (int64_t i = valid; i < ternary::kBlockWeights; ++i) codes[i] = ternary::kZeroCode;
        uint8_t* dst = row + blk * ternary::kBlockBytes;
        for (int b = 0; b < ternary::kBlockBytes; ++b) {
          dst[b] = static_cast<uint8_t>(codes[b] | (codes[32 + b] << 2) | (codes[64 + b] << 4) | (codes[96 + b] << 6));
        }
      }
    }
  });
}

}  // namespace

void ternary_quantize(const TernaryQuantizeParams& p) {
  switch (p.weight_dtype) {
    case DType::kFloat32:
      quantize_typed(p, static_cast<const float*>(p.weight), [](float v) { return v; });
      break;
    case DType::kFloat64:
      quantize_typed(p, static_cast<const double*>(p.weight), [](double v) { return static_cast<float>(v); });
      break;
    case DType::kBFloat16:
      quantize_typed(p, static_cast<const uint16_t*>(p.weight), [](uint16_t v) { return bf16_bits_to_float(v); });
      break;
    case DType::kFloat16:
      quantize_typed(p, static_cast<const uint16_t*>(p.weight), [](uint16_t v) { return fp16_bits_to_float(v); });
      break;
  }
}

void ternary_unpack(const TernaryUnpackParams& p) {
  const int64_t rb = ternary::row_bytes(p.in_features);
  std::vector<int64_t> bad(static_cast<size_t>(std::max<int64_t>(p.rows, 1)), 0);
  parallel_for(0, p.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = p.packed + r * rb;
      int64_t invalid = 0;
      for (int64_t byte = 0; byte < rb; ++byte) {
        const int64_t k0 = (byte / ternary::kBlockBytes) * ternary::kBlockWeights + byte % ternary::kBlockBytes;
        for (int j = 0; j < 4; ++j) {
          const int64_t k = k0 + j * ternary::kBlockBytes;
          const uint8_t code = (row[byte] >> (2 * j)) & 3;
          if (k < p.in_features) {
            invalid += code == 3;
            p.out[r * p.in_features + k] = ternary::decode(code);
          } else {
            invalid += code != ternary::kZeroCode;  // padding must hold zero codes too
          }
        }
      }
      bad[static_cast<size_t>(r)] = invalid;
    }
  });
  int64_t total = 0;
  for (int64_t b : bad) total += b;
  *p.invalid_count = total;
}

}  // namespace cpu
}  // namespace mmfree
