// The MLGRU gate math of one token, shared by the scan kernels (mlgru_scan.cu) and the fused
// decode step (cuda/decode/), so that both compute bit-identical gates from one source.
#pragma once

#include "cuda/common.cuh"

namespace mmfree {
namespace cuda {
namespace mlgru {

// exp and reciprocal: for 16-bit inputs the hardware approximations (__expf: ~2 ulp plus
// |x|*2^-22 relative from the argument scaling; __fdividef: 2 ulp), far below the output's
// rounding; for fp32 inputs the accurate expf and IEEE division, which the doubled bytes per
// element pay for.
template <bool kFast>
__device__ __forceinline__ float exp_(float x) {
  return kFast ? __expf(x) : expf(x);
}
template <bool kFast>
__device__ __forceinline__ float recip_1p(float e) {
  return kFast ? __fdividef(1.0f, 1.0f + e) : 1.0f / (1.0f + e);
}

// The exponent cap. __fdividef(1, d) returns 0 for d in [2^126, 2^128] (the PTX div.approx
// range), so for 16-bit inputs the cap is 87 (e^87 = 6.1e37 < 2^126 = 8.5e37): at 88 a gate
// input below -87.34 gave sigmoid 0 and 1 - sigmoid = e * 0 = 0 instead of 1, which dropped
// c_t (and dL/di, a dL/dlb term) of that token. fp32 (IEEE division) keeps 88.
template <bool kFast>
constexpr float kExpCap = kFast ? 87.0f : 88.0f;

// sigmoid(y) and 1 - sigmoid(y) = exp(-y) sigmoid(y) without cancellation. The exponent is
// capped (finite, so 0 * inf never appears); NaN passes through the comparison.
template <bool kFast>
__device__ __forceinline__ void sigmoid2(float y, float& sg, float& one_minus_sg) {
  float a = -y;
  a = a > kExpCap<kFast> ? kExpCap<kFast> : a;
  const float e = exp_<kFast>(a);
  sg = recip_1p<kFast>(e);
  one_minus_sg = e * sg;
}

// sigmoid of the input gate: sigmoid2, except past the exponent cap, so that silu(-1e30) = -0
// and silu(-inf) = -inf * 0 = NaN as in the reference and the CPU kernels (not -3e-9 and
// -inf). Nothing changes above the cap. For 16-bit inputs sigmoid(x < -87) < 1.7e-38 is below
// the output's precision (the smallest normal bf16/fp16 is 1.2e-38 / 6e-5), so it is flushed to
// 0 (a select; an IEEE division here was one of the costliest steps of the gate); fp32 keeps
// shrinking it past the cap (divided by what lies past it).
template <bool kFast>
__device__ __forceinline__ void input_sigmoid2(float x, float& s, float& one_minus_s) {
  constexpr float cap = kExpCap<kFast>;
  float a = -x;
  a = a > cap ? cap : a;
  const float e = exp_<kFast>(a);
  s = recip_1p<kFast>(e);
  if constexpr (kFast) {
    const bool past = x < -cap;
    s = past ? 0.0f : s;
    one_minus_s = past ? 1.0f : e * s;
  } else {
    if (x < -cap) s = s / (1.0f + (-cap - x));
    one_minus_s = e * s;
  }
}

// Gates of one token for V channels: f_t and c_t (c = 0 where masked or out of range).
template <bool kFast, int V>
__device__ __forceinline__ void gate_token(const float (&xi)[V], const float (&xf)[V], const float (&lb)[V],
                                           const float (&omlb)[V], bool valid, bool in_range, float (&ft)[V],
                                           float (&c)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float sg, omsg, si, omsi;
    sigmoid2<kFast>(xf[k], sg, omsg);
    input_sigmoid2<kFast>(xi[k], si, omsi);
    const float f_t = lb[k] + omlb[k] * sg;
    const float cc = xi[k] * si * (omlb[k] * omsg);
    ft[k] = in_range ? f_t : 1.0f;
    c[k] = (in_range && valid) ? cc : 0.0f;
  }
}

// Backward of one token for V channels, walking time in reverse: from dL/dh_t (gh) and the
// flow e from h_{t+1}, writes dL/di and dL/df, adds into dL/dlb, and leaves in e the flow
// into h_{t-1}. hp = h_{t-1}, ft = f_t (1 past the range end, where nothing is added).
template <bool kFast, int V>
__device__ __forceinline__ void token_backward(const float (&xi)[V], const float (&xf)[V], const float (&gh)[V],
                                               const float (&hp)[V], const float (&ft)[V], const float (&omlb)[V],
                                               bool valid, bool in_range, float (&e)[V], float (&dlb)[V],
                                               float (&di)[V], float (&df)[V]) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    float sg, omsg, si, omsi;
    sigmoid2<kFast>(xf[k], sg, omsg);
    input_sigmoid2<kFast>(xi[k], si, omsi);
    const float delta = gh[k] + e[k];
    const float silu = valid ? xi[k] * si : 0.0f;
    const float dsilu = si * (1.0f + xi[k] * omsi);
    di[k] = valid ? delta * (omlb[k] * omsg) * dsilu : 0.0f;
    const float dft = delta * (hp[k] - silu);
    df[k] = dft * omlb[k] * (sg * omsg);
    dlb[k] += in_range ? dft * omsg : 0.0f;
    e[k] = ft[k] * delta;
  }
}

}  // namespace mlgru
}  // namespace cuda
}  // namespace mmfree
