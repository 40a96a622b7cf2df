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

// sigmoid(y) and 1 - sigmoid(y) = exp(-y) sigmoid(y) without cancellation. The exponent is
// capped at 88 (finite, so 0 * inf never appears); NaN passes through the comparison.
template <bool kFast>
__device__ __forceinline__ void sigmoid2(float y, float& sg, float& one_minus_sg) {
  float a = -y;
  a = a > 88.0f ? 88.0f : a;
  const float e = exp_<kFast>(a);
  sg = recip_1p<kFast>(e);
  one_minus_sg = e * sg;
}

// sigmoid of the input gate: sigmoid2, except that past the exponent cap sigmoid(x) keeps
// shrinking (divided by what lies past the cap), so that silu(-1e30) = -0 and silu(-inf) =
// -inf * 0 = NaN as in the reference and the CPU kernels (not -3e-9 and -inf). Nothing
// changes for x >= -88.
template <bool kFast>
__device__ __forceinline__ void input_sigmoid2(float x, float& s, float& one_minus_s) {
  float a = -x;
  a = a > 88.0f ? 88.0f : a;
  const float e = exp_<kFast>(a);
  s = recip_1p<kFast>(e);
  if (x < -88.0f) s = s / (1.0f + (-88.0f - x));
  one_minus_s = e * s;
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

}  // namespace mlgru
}  // namespace cuda
}  // namespace mmfree
