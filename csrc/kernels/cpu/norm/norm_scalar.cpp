// Scalar (W = 1) instantiation of the generic norm row math: the fallback on any CPU,
// running the very same operation sequence as the vector paths.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float_convert.h"
#include "cpu/norm/norm_rows.h"

namespace mmfree {
namespace cpu {
namespace {

struct Scalar {
  using V = float;
  static constexpr int W = 1;
  static V zero() { return 0.f; }
  static V set1(float a) { return a; }
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V load_bf16(const uint16_t* p) { return bf16_bits_to_float(*p); }
  static void store_bf16(uint16_t* p, V v) { *p = float_to_bf16_bits(v); }
  static V load_f16(const uint16_t* p) { return fp16_bits_to_float(*p); }
  static void store_f16(uint16_t* p, V v) { *p = float_to_fp16_bits(v); }
  static V round_to_bf16(V v) { return bf16_bits_to_float(float_to_bf16_bits(v)); }
  static V round_to_f16(V v) { return fp16_bits_to_float(float_to_fp16_bits(v)); }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V div(V a, V b) { return a / b; }
  static V fma(V a, V b, V c) { return a * b + c; }  // contracted where the target has FMA
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V abs(V a) { return std::fabs(a); }
  static float hsum(V a) { return a; }
  static float hmax(V a) { return a; }
  static V round_away(V x) {
    const float t = std::trunc(x);  // x - t is exact, so the tie test is too
    return std::fabs(x - t) >= 0.5f ? t + std::copysign(1.0f, x) : t;
  }
  static V round_nearest(V x) { return std::nearbyint(x); }
  static V pow2i(V n) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static void store_i8(int8_t* p, V v) { *p = static_cast<int8_t>(static_cast<int32_t>(v)); }
};

using VT_ = Scalar;
#include "cpu/norm/norm_rows.inl"

}  // namespace

namespace norm_rows {
MMFREE_NORM_ENTRIES(scalar)
}  // namespace norm_rows

}  // namespace cpu
}  // namespace mmfree
